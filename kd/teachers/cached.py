"""Soft targets from the on-disk store (kd/teachers/store.py), the teacher filling what it lacks.

A batch whose rows are all stored trains from them; otherwise the teacher's fresh outputs serve the
whole batch and the missing rows are stored (online and first-epoch results agree). At the end of
the first epoch every process fills what the store still lacks (its own share of each split), and
once every split is covered the teacher is released from memory: the rest of training runs at the
student's speed. `--precompute-teacher` fills everything ahead; `require` never loads the teacher.

With augmentation the teacher's input changes every epoch, so nothing can be stored, unless each
clip has a fixed set of augmented versions (augment.views: k, kd/audio/augment.py): the training
split is then stored once per view, under keys train@0 .. train@k-1, each a split of its own in the
store whose fingerprint names the augmentation, the seed and the view.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from kd.data import PreparedData, queued_copy
from kd.errors import KDError
from kd.lm.losses import IGNORE, TopK
from kd.teachers.identity import teacher_identity
from kd.teachers.loading import load_model_config, teacher_logits
from kd.teachers.source import ROLES, SoftTargetSource, SplitRunner
from kd.teachers.store import CacheError, TeacherCache, TokenCache, cache_file


class CachedTeacher(SoftTargetSource):
    """Soft targets from the store; a teacher, when given, fills what is missing.

    `split_ids` and `sizes` are keyed by role (train / eval / test), or for a training split with
    augmented views by train@<view> (`view_key`)."""

    source = "cache"

    def __init__(self, cache: TeacherCache, split_ids: dict[str, str], sizes: dict[str, int],
                 teacher: torch.nn.Module | None):
        self.cache, self.split_ids, self.sizes, self._teacher = cache, split_ids, sizes, teacher
        self.covered = {role: cache.coverage(split_ids[role]) for role in split_ids}
        self._hits = self._misses = 0
        # On-policy distillation: the teacher scores the student's samples, so it stays loaded once the
        # store is complete (the store then serves the off-policy batches).
        self.keep_teacher = False

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self._teacher

    def complete(self) -> bool:
        return all(self.covered[role] >= self.sizes[role] for role in self.split_ids)

    def refresh(self) -> None:
        self.covered = {role: self.cache.coverage(self.split_ids[role]) for role in self.split_ids}

    def key(self, batch: dict[str, Any], role: str) -> str:
        """Where the batch's rows are stored: its role, or its view of the training split."""
        return view_key(batch["view"]) if role == "train" and "view" in batch else role

    def logits(self, batch: dict[str, Any], role: str) -> torch.Tensor:
        key = self.key(batch, role)
        if key not in self.split_ids:
            raise CacheError(f"teacher cache {self.cache.path}: no stored split for {key} (this run's splits: "
                             f"{', '.join(self.split_ids)})")
        split_id = self.split_ids[key]
        indices = list(batch["index"])
        found = self.cache.get(split_id, indices)
        counted = role == "train"  # step telemetry reports the training batches
        if len(found) == len(indices):
            self._hits += len(indices) * counted
            return self.from_rows(found, indices, batch)
        if self._teacher is None:
            raise CacheError(f"teacher cache {self.cache.path}: {len(indices) - len(found)} samples of split "
                             f"{role} are missing and the teacher is not loaded; fill the cache with "
                             "`python train_kd.py --config <your config> --precompute-teacher`")
        # The teacher's fresh outputs serve the whole batch (online and first-epoch results agree);
        # the rows the cache lacks are stored.
        out = teacher_logits(self._teacher, batch)
        new = [k for k, i in enumerate(indices) if i not in found]
        self.covered[key] += self.store(key, batch, out, new)
        self._hits += len(found) * counted
        self._misses += len(new) * counted
        return self.from_teacher(out)

    def score(self, batch: dict[str, Any]) -> torch.Tensor:
        """A sampled batch's full teacher logits (never stored: such rows are not seen twice)."""
        if self._teacher is None:
            raise CacheError("on-policy batches need the teacher, and this cache run has not loaded it")
        return teacher_logits(self._teacher, batch)

    def from_rows(self, found: dict[int, Any], indices: list[int], batch: dict[str, Any]) -> torch.Tensor:
        """The batch's soft targets from stored rows."""
        return queued_copy(torch.from_numpy(np.stack([found[i] for i in indices])), batch["labels"].device)

    def from_teacher(self, out: torch.Tensor) -> torch.Tensor:
        """The batch's soft targets from the teacher's fresh outputs (as the stored ones will read)."""
        return out

    def store(self, key: str, batch: dict[str, Any], logits: torch.Tensor, rows: list[int] | None = None) -> int:
        """Store the teacher's outputs for `rows` of the batch (None: all) under `key`; returns how many
        were new. The labels go along: a language model's cache stores the learnt positions only."""
        rows = list(range(len(batch["index"]))) if rows is None else rows
        if not rows:
            return 0
        return self.cache.put(self.split_ids[key], [int(batch["index"][k]) for k in rows], logits[rows],
                              batch["labels"][rows])

    def fill(self, runner: SplitRunner, roles: tuple[str, ...] = ROLES) -> int:
        """Compute the soft targets the store lacks for `roles` (every view of the training split),
        each process its own contiguous share; returns the rows this process wrote."""
        if self._teacher is None:
            return 0
        keys = tuple(k for k in self.split_ids if parse_key(k)[0] in roles)
        # Every process reads what is missing before any of them writes, so their shares agree and
        # no sample is computed twice.
        missing = {key: self.cache.missing(self.split_ids[key], self.sizes[key]) for key in keys}
        runner.barrier()
        written = 0
        with runner.autocast():  # the teacher runs as it does in training
            for key in keys:
                share = missing[key][runner.rank * len(missing[key]) // runner.world:
                                     (runner.rank + 1) * len(missing[key]) // runner.world]
                written += self._fill_rows(runner, key, share)
        runner.barrier()
        self.refresh()
        return written

    def _fill_rows(self, runner: SplitRunner, key: str, rows: list[int]) -> int:
        if not rows:
            return 0
        role, view = parse_key(key)
        written = 0
        with tqdm(total=len(rows), desc=f"teacher -> cache ({key})", unit="sample", disable=not runner.show,
                  dynamic_ncols=True) as bar:
            for batch in runner.loader(runner.splits[role].select(rows)):
                # Rows of a selection keep their split's index (kd/data.py), which a view is drawn from.
                batch = runner.prepare(batch, view)
                written += self.store(key, batch, teacher_logits(self._teacher, batch))
                bar.update(len(batch["index"]))
        return written

    def after_epoch(self, runner: SplitRunner) -> str | None:
        """After the first epoch: fill what the store still lacks, then train on without the teacher."""
        if self._teacher is None:
            return None
        self.fill(runner)
        if not self.complete() or self.keep_teacher:
            return None
        self._teacher = None  # every split is covered: free its weights, and on a GPU their cached blocks
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (f"Teacher cache complete ({self.coverage_text()}): the teacher is released, training goes on "
                "from the cache")

    def precompute(self, runner: SplitRunner) -> str:
        started = time.time()
        written = self.fill(runner) if not self.complete() else 0
        if not self.complete():
            raise KDError(f"teacher cache {self.cache.path} is still incomplete ({self.coverage_text()})")
        # Every process reports its own share (so a 2-process fill shows that none computed a sample twice).
        return (f"Teacher cache {self.cache.path}: {written} soft targets computed by process {runner.rank} in "
                f"{time.time() - started:.1f} s; coverage {self.coverage_text()}")

    def coverage_text(self) -> str:
        return ", ".join(f"{r} {self.covered[r]}/{self.sizes[r]}" for r in self.split_ids)

    def stats(self) -> dict[str, Any]:
        out = {"source": self.describe()["source"], "hits": self._hits, "misses": self._misses,
               "covered": {r: [self.covered[r], self.sizes[r]] for r in self.split_ids}}
        self._hits = self._misses = 0
        return out

    def describe(self) -> dict[str, Any]:
        return {"source": "cache" if self.teacher is None else "cache+teacher", "cache": str(self.cache.path),
                "coverage": {r: [self.covered[r], self.sizes[r]] for r in self.split_ids}}


class CachedTokenTeacher(CachedTeacher):
    """A language-model teacher's top-k soft targets from the cache (kd.teachers.store.TokenCache), as
    `TopK` (batch, seq, k) for the token loss. When the teacher has to run for a batch, its full
    logits are cut to the same top k, so the first epoch and the cached ones train on the same targets."""

    def from_teacher(self, out: torch.Tensor) -> TopK:
        return TopK.from_logits(out, self.cache.top_k)

    def from_rows(self, found: dict[int, tuple[np.ndarray, np.ndarray]], indices: list[int],
                  batch: dict[str, Any]) -> TopK:
        """Stored rows scattered back onto the learnt positions of the batch (others stay zero: unused)."""
        labels = batch["labels"]
        k = self.cache.top_k
        ids = torch.zeros((*labels.shape, k), dtype=torch.long)
        logp = torch.zeros((*labels.shape, k), dtype=torch.float32)
        learnt = (labels != IGNORE).cpu()
        for r, i in enumerate(indices):
            row_ids, row_logp = found[i]
            positions = learnt[r].nonzero().squeeze(-1)
            if len(positions) != len(row_ids):
                raise self.cache.corrupt(f"row {i} holds {len(row_ids)} positions but the sample has "
                                         f"{len(positions)} learnt ones (the data changed under the same key)")
            ids[r, positions] = torch.from_numpy(row_ids.astype(np.int64))
            logp[r, positions] = torch.from_numpy(row_logp)
        return TopK(ids.to(labels.device), logp.to(labels.device))


def cache_path(cfg: Any, identity: dict[str, Any], num_labels: int) -> Path:
    """Where the cache of this teacher identity lives (the same name TeacherCache gives it)."""
    dist = cfg.distillation
    return cache_file(dist.cache_folder(), identity, num_labels, dtype=dist.cache_dtype, top_k=dist.cache_top_k)


def open_cache(cfg: Any, identity: dict[str, Any], *, num_outputs: int, label_names: list[str],
               fingerprints: dict[str, str], sizes: dict[str, int], may_create: bool = True
               ) -> tuple[TeacherCache, dict[str, str]]:
    """The cache file of this identity and the split ids of the configured splits (`require` outside
    --precompute-teacher refuses to create one). `num_outputs`: labels, or a language model's vocabulary."""
    dist = cfg.distillation
    path = cache_path(cfg, identity, num_outputs)
    if not may_create and not path.is_file():
        raise CacheError(f"distillation.teacher_cache is 'require' but there is no cache for this teacher and "
                         f"preprocessing ({path} does not exist); fill it with `python train_kd.py --config "
                         "<your config> --precompute-teacher`, or set distillation.teacher_cache: auto")
    if cfg.data.modality == "causal_lm":
        cache = TokenCache(dist.cache_folder(), identity, num_outputs, dtype=dist.cache_dtype, top_k=dist.cache_top_k)
    else:
        cache = TeacherCache(dist.cache_folder(), identity, num_outputs, label_names, dtype=dist.cache_dtype,
                             top_k=dist.cache_top_k)
    names = cfg.data.split_names()
    aug = cfg.augment
    split_ids = {}
    if aug.enabled and aug.views and "train" in fingerprints:
        # Each view of the training split is a split of its own: its inputs are the augmented clips, so
        # its fingerprint names the augmentation, the seed that draws it and the view. Not the number of
        # views: a clip's version v is the same whatever k, so raising k keeps the views already stored.
        drawn = json.dumps({"augment": {**asdict(aug), "views": None}, "seed": cfg.run.seed}, sort_keys=True)
        for view in range(aug.views):
            fingerprint = hashlib.sha256(f"{fingerprints['train']}|{drawn}|{view}".encode()).hexdigest()[:16]
            split_ids[view_key(view)] = cache.register_split(f"{names['train']}@view{view}", fingerprint,
                                                             sizes["train"])
    for role in fingerprints:
        if role != "train" or not split_ids:
            split_ids[role] = cache.register_split(names[role], fingerprints[role], sizes[role])
    return cache, split_ids


def view_key(view: int) -> str:
    """The key of one augmented view of the training split (augment.views)."""
    return f"train@{view}"


def parse_key(key: str) -> tuple[str, int | None]:
    """A key's role and view: ('eval', None), ('train', 2) for train@2."""
    role, _, view = key.partition("@")
    return role, int(view) if view else None


def key_sizes(split_ids: dict[str, str], sizes: dict[str, int]) -> dict[str, int]:
    """Each key's number of samples: a view has its split's."""
    return {key: sizes[parse_key(key)[0]] for key in split_ids}


def open_cached_teacher(cfg: Any, accelerator: Accelerator, data: PreparedData, processor: Any,
                        *, teacher: Callable[[], torch.nn.Module], create: bool = True,
                        precompute: bool = False) -> CachedTeacher | None:
    """The store-backed source for this run (distillation.teacher_cache), or None for online KD;
    `teacher()` loads the teacher, called only when the store lacks something.

    `create=False` (planning): an absent store is not created, the plan then counts the teacher."""
    dist, say = cfg.distillation, accelerator.print
    if dist.teacher_cache == "off":
        return None
    lm = cfg.data.modality == "causal_lm"
    if lm and dist.cache_top_k is None:  # 'require' without top-k is a config error for causal_lm
        say("Teacher cache off: a language model's full next-token distributions are too large to store; set "
            "distillation.cache_top_k (e.g. 64) to cache its top k per token")
        return None
    if lm and dist.on_policy.share >= 1.0:
        say("Teacher cache off: with distillation.on_policy.share 1 every batch is the student's own samples, "
            "which the teacher scores as they come")
        return None
    if cfg.augment.enabled and not cfg.augment.views:  # 'require' here is a config error (kd/config.py)
        say("Teacher cache off: augment.enabled changes the teacher's inputs every epoch, so its outputs "
            "are computed online (augment.views: k gives each clip k fixed versions, which the cache can store)")
        return None
    device_kind = "cpu" if cfg.teacher.device == "cpu" else accelerator.device.type
    identity = teacher_identity(cfg, processor, sampling_rate=data.sampling_rate, device_kind=device_kind,
                                features_on_device=data.features is not None)
    sizes = {role: len(ds) for role, ds in data.splits.items()}
    outputs = load_model_config(cfg.teacher.model, "teacher.model").vocab_size if lm else len(data.label_names)
    if not create and dist.teacher_cache == "auto" and not cache_path(cfg, identity, outputs).is_file():
        return None  # planning: the teacher will run, so the plan counts it (require: open_cache refuses)
    with accelerator.main_process_first():  # one process creates the file and its tables
        cache, split_ids = open_cache(cfg, identity, num_outputs=outputs, label_names=data.label_names,
                                      fingerprints=data.fingerprints, sizes=sizes,
                                      may_create=precompute or dist.teacher_cache == "auto")
    cached = (CachedTokenTeacher if lm else CachedTeacher)(cache, split_ids, key_sizes(split_ids, sizes), teacher=None)
    if dist.teacher_cache == "require" and not cached.complete() and not precompute:
        raise CacheError(f"distillation.teacher_cache is 'require' but the cache {cache.path} is incomplete "
                         f"({cached.coverage_text()}); fill it with `python train_kd.py --config <your config> "
                         "--precompute-teacher`, or set distillation.teacher_cache: auto")
    share = dist.on_policy.share if lm else 0.0
    if share > 0 and not precompute:
        say(f"Teacher cache {cache.path}: {cached.coverage_text()}; it serves the off-policy batches only "
            f"({100 * (1 - share):.0f}% of them): the teacher stays loaded to score the student's samples "
            "(distillation.on_policy)")
        cached.keep_teacher = True
        cached._teacher = teacher()
        return cached
    if cached.complete():
        say(f"Teacher cache {cache.path}: {cached.coverage_text()} (complete: the teacher is not loaded)")
        return cached
    say(f"Teacher cache {cache.path}: {cached.coverage_text()} (the teacher fills what is missing)")
    cached._teacher = teacher()
    return cached
