"""Where a batch's soft targets come from: one interface, so the training loop never branches on it.

- `TeacherForward`: the teacher runs on every batch (online KD; the only choice with augmentation).
- `CachedTeacher`: rows come from the on-disk cache (kd/teacher_cache.py); misses are computed by the
  teacher, used and stored. Once every split is covered the teacher is dropped from memory and
  training goes on without it. With `require`, the teacher is never loaded at all.

Both answer `logits(batch, role)` for role train / eval / test and report what they did in `stats()`.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from kd.data import queued_copy
from kd.lm_losses import IGNORE, TopK
from kd.teacher_cache import CacheError, TeacherCache, TokenCache, cache_file, file_sha256
from kd.teachers import resolve_model_source, teacher_logits

ROLES = ("train", "eval", "test")


class SoftTargets:
    source = "teacher"
    teacher: torch.nn.Module | None = None
    telemetry_key = "cache"  # the step event's field for `stats()`

    def logits(self, batch: dict[str, Any], role: str) -> torch.Tensor:
        raise NotImplementedError

    def prefetch(self, batches: Iterable[dict[str, Any]], upcoming: Iterator[list[dict[str, Any]]]
                 ) -> Iterator[dict[str, Any]]:
        """The batches in order. `upcoming` yields the dataset rows of the same batches, in the same
        order, without loading them through the DataLoader: a source that fetches (a remote teacher)
        asks for later batches while the loop trains on the current one, and may hand a batch over
        rebuilt (a remote teacher in generate mode: prompt + the teacher's answer)."""
        return iter(batches)

    def close(self) -> None:
        """Release what the source holds open (connections, threads)."""

    def stats(self) -> dict[str, Any] | None:
        """Counts since the last call (None: nothing to report)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source}

    @property
    def needs_teacher_inputs(self) -> bool:
        """Whether the batch must carry the teacher's processed inputs (features on the device)."""
        return self.teacher is not None


class TeacherForward(SoftTargets):
    """Online KD: the teacher's forward on every batch."""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher = teacher

    def logits(self, batch: dict[str, Any], role: str) -> torch.Tensor:
        return teacher_logits(self.teacher, batch)


class CachedTeacher(SoftTargets):
    """Soft targets from the cache; a teacher, when given, fills what is missing."""

    source = "cache"

    def __init__(self, cache: TeacherCache, split_ids: dict[str, str], sizes: dict[str, int],
                 teacher: torch.nn.Module | None):
        self.cache, self.split_ids, self.sizes, self.teacher = cache, split_ids, sizes, teacher
        self.covered = {role: cache.coverage(split_ids[role]) for role in split_ids}
        self._hits = self._misses = 0

    def complete(self) -> bool:
        return all(self.covered[role] >= self.sizes[role] for role in self.split_ids)

    def refresh(self) -> None:
        self.covered = {role: self.cache.coverage(self.split_ids[role]) for role in self.split_ids}

    def logits(self, batch: dict[str, Any], role: str) -> torch.Tensor:
        split_id = self.split_ids[role]
        indices = list(batch["index"])
        found = self.cache.get(split_id, indices)
        counted = role == "train"  # step telemetry reports the training batches
        if len(found) == len(indices):
            self._hits += len(indices) * counted
            return self.from_rows(found, indices, batch)
        if self.teacher is None:
            raise CacheError(f"teacher cache {self.cache.path}: {len(indices) - len(found)} samples of split "
                             f"{role} are missing and the teacher is not loaded; fill the cache with "
                             "`python train_kd.py --config <your config> --precompute-teacher`")
        # The teacher's fresh outputs serve the whole batch (online and first-epoch results agree);
        # the rows the cache lacks are stored.
        out = teacher_logits(self.teacher, batch)
        new = [k for k, i in enumerate(indices) if i not in found]
        self.covered[role] += self.store(role, batch, out, new)
        self._hits += len(found) * counted
        self._misses += len(new) * counted
        return self.from_teacher(out)

    def from_rows(self, found: dict[int, Any], indices: list[int], batch: dict[str, Any]) -> torch.Tensor:
        """The batch's soft targets from stored rows."""
        return queued_copy(torch.from_numpy(np.stack([found[i] for i in indices])), batch["labels"].device)

    def from_teacher(self, out: torch.Tensor) -> torch.Tensor:
        """The batch's soft targets from the teacher's fresh outputs (as the stored ones will read)."""
        return out

    def store(self, role: str, batch: dict[str, Any], logits: torch.Tensor, rows: list[int] | None = None) -> int:
        """Store the teacher's outputs for `rows` of the batch (None: all); returns how many were new.
        The labels go along: a language model's cache stores the learnt positions only."""
        rows = list(range(len(batch["index"]))) if rows is None else rows
        if not rows:
            return 0
        return self.cache.put(self.split_ids[role], [int(batch["index"][k]) for k in rows], logits[rows],
                              batch["labels"][rows])

    def drop_teacher(self) -> None:
        """Every split is covered: free the teacher's memory (weights, and on a GPU its cached blocks)."""
        if self.teacher is None:
            return
        self.teacher = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def stats(self) -> dict[str, Any]:
        out = {"source": self.describe()["source"], "hits": self._hits, "misses": self._misses,
               "covered": {r: [self.covered[r], self.sizes[r]] for r in self.split_ids}}
        self._hits = self._misses = 0
        return out

    def describe(self) -> dict[str, Any]:
        return {"source": "cache" if self.teacher is None else "cache+teacher", "cache": str(self.cache.path),
                "coverage": {r: [self.covered[r], self.sizes[r]] for r in self.split_ids}}


class CachedTokenTeacher(CachedTeacher):
    """A language-model teacher's top-k soft targets from the cache (kd.teacher_cache.TokenCache), as
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


# ---------------------------------------------------------------------------------------------
# Building the cache's identity


def teacher_weight_files(spec: str, revision: str | None) -> list[Path]:
    """The teacher's safetensors files, local or from the Hugging Face cache (safetensors only)."""
    source, single = resolve_model_source(spec, "teacher.model", revision=revision)
    if single is not None:
        return [single]
    if Path(source).is_dir():
        return sorted(Path(source).glob("*.safetensors"))
    from huggingface_hub import snapshot_download

    folder = snapshot_download(source, revision=revision, allow_patterns=["*.safetensors", "*.json"])
    return sorted(Path(folder).glob("*.safetensors"))


def preprocessing_identity(processor: Any) -> Any:
    """What of the teacher's preprocessing can change its inputs: the processor's own config."""
    if processor is None:
        return None
    if hasattr(processor, "get_vocab"):  # a tokenizer: its class, vocabulary and special tokens
        vocab = processor.get_vocab()
        return {"class": type(processor).__name__,
                "vocab": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
                "special": {k: str(v) for k, v in sorted(processor.special_tokens_map.items())},
                "padding_side": getattr(processor, "padding_side", None)}
    config = processor.to_dict() if hasattr(processor, "to_dict") else {"class": type(processor).__name__}
    config.pop("processor_class", None)
    return config


def teacher_identity(cfg: Any, processor: Any, sampling_rate: int | None, device_kind: str,
                     features_on_device: bool) -> dict[str, Any]:
    files = teacher_weight_files(cfg.teacher.model, cfg.teacher.revision)
    half = cfg.teacher.dtype != "fp32"
    return {
        "weights": {p.name: file_sha256(p) for p in files},
        "dtype": cfg.teacher.dtype,
        "device": device_kind if half else "any",  # fp32 outputs are portable between CPU and CUDA
        "autocast": cfg.train.mixed_precision,
        "modality": cfg.data.modality,
        "preprocessing": preprocessing_identity(processor),
        "features_on_device": features_on_device if processor is not None else None,
        "sampling_rate": sampling_rate,
        "max_seconds": cfg.data.max_seconds if cfg.data.modality == "audio" else None,
        "max_length": cfg.data.max_length if cfg.data.modality in ("text", "causal_lm") else None,
        # causal_lm: the splits' fingerprints hash the token rows the teacher reads (template, packing
        # and truncation included); the chat template is named here too for a readable identity
        "chat_template": (hashlib.sha256(str(getattr(processor, "chat_template", "")).encode()).hexdigest()[:16]
                          if cfg.data.modality == "causal_lm" else None),
    }


def cache_path(cfg: Any, identity: dict[str, Any], num_labels: int) -> Path:
    """Where the cache of this teacher identity lives (the same name TeacherCache gives it)."""
    dist = cfg.distillation
    return cache_file(dist.cache_folder(), identity, num_labels, dist.cache_dtype, dist.cache_top_k)


def open_cache(cfg: Any, identity: dict[str, Any], num_outputs: int, label_names: list[str],
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
        cache = TokenCache(dist.cache_folder(), identity, num_outputs, dist.cache_dtype, dist.cache_top_k)
    else:
        cache = TeacherCache(dist.cache_folder(), identity, num_outputs, label_names, dist.cache_dtype,
                             dist.cache_top_k)
    names = cfg.data.split_names()
    split_ids = {role: cache.register_split(names[role], fingerprints[role], sizes[role]) for role in fingerprints}
    return cache, split_ids


# ---------------------------------------------------------------------------------------------
# Filling


def fill(targets: CachedTeacher, role: str, missing: list[int], dataset: Any, make_loader: Callable[[Any], Any],
         prepare: Callable[[dict[str, Any]], dict[str, Any]], rank: int = 0, world: int = 1,
         show: bool = True) -> int:
    """Compute and store the `missing` rows of one split. With `world` processes, each takes its own
    contiguous share (all must pass the same list, read before any of them writes: then no sample
    is computed twice). Returns rows written."""
    share = missing[rank * len(missing) // world:(rank + 1) * len(missing) // world]
    if not share:
        return 0
    written = 0
    loader = make_loader(dataset.select(share))
    with tqdm(total=len(share), desc=f"teacher -> cache ({role})", unit="sample", disable=not show,
              dynamic_ncols=True) as bar:
        for batch in loader:
            batch = prepare(batch)
            written += targets.store(role, batch, teacher_logits(targets.teacher, batch))
            bar.update(len(batch["index"]))
    return written

