"""A teacher behind an OpenAI-compatible server (teacher.endpoint) as a source of soft targets.

It answers the same `logits(batch, role)` as a local or cached teacher (kd/teachers/source.py), with the
teacher's top k per learnt position (`TopK`; the token loss puts the rest of the mass in a tail
bucket). What it adds:

- A probe at start: the model must be listed by the server, the mode must work (logprobs that
  are there and aligned; servers that return none or shift them are refused with the reason),
  and the server's tokens must map back to exactly the student's token ids.
- Prefetch: `prefetch(batches, upcoming)` sends the requests of a batch's rows and of the next
  `prefetch_batches` batches before the loop trains on it, and hands each batch over with its
  soft targets attached, waiting only for answers not back yet (`wait_s`).
- Every answer stored on arrival (kd/teachers/remote/response_cache.py): a restarted or resumed run asks nothing
  twice. With the server down, a run trains on the samples whose answers are cached and says how
  many are missing.

What is asked and how answers become soft targets depends on the mode (kd/teachers/remote/modes.py): score
(the teacher scores the data's text) or generate (it answers the data's prompts, and the batch is
rebuilt as prompt + answer).
"""

from __future__ import annotations

import collections
import os
import time
from concurrent.futures import Future
from typing import Any, Iterable, Iterator

from kd.config import Config, EndpointConfig
from kd.data import PreparedData
from kd.errors import ConfigError, KDError, TrainingError
from kd.lm.losses import TopK
from kd.teachers.identity import preprocessing_identity
from kd.teachers.remote.client import EndpointClient, RemoteTeacherError, Unreachable
from kd.teachers.remote.modes import make_mode
from kd.teachers.remote.protocol import ProtocolError, Scored, TokenMap
from kd.teachers.remote.response_cache import ResponseCache
from kd.teachers.source import SoftTargetSource


def api_key(ep: EndpointConfig) -> str | None:
    """The key from the environment variable the config names (checked before anything is loaded)."""
    if ep.api_key_env is None:
        return None
    key = os.environ.get(ep.api_key_env)
    if not key:
        raise ConfigError([f"teacher.endpoint.api_key_env: the environment variable {ep.api_key_env} is not set "
                           "(export it, or set api_key_env: null for a server without a key)"])
    return key


class RemoteTeacher(SoftTargetSource):
    source = "remote"
    telemetry_key = "remote_teacher"

    def __init__(self, cfg: Config, tokenizer: Any, say=print):
        self.ep = ep = cfg.teacher.endpoint
        self.say = say
        self.tokens = TokenMap(tokenizer)
        self.mode = make_mode(ep, self.tokens)
        self.client = EndpointClient(ep, api_key(ep), seed=cfg.run.seed)
        self.tokenizer_hash = preprocessing_identity(tokenizer)
        self.offline = False
        ttl = ep.cache_ttl_days * 86400 if ep.cache_ttl_days else None
        folder = cfg.distillation.cache_folder()
        try:
            identity = self._probe()
        except Unreachable as exc:
            identity = ResponseCache.last_identity(folder, self._endpoint_name())
            if identity is None:
                self.client.close()
                raise RemoteTeacherError(f"{exc}; and no answers of {ep.model} are cached to train on") from None
            self.offline = True
            say(f"Remote teacher unreachable ({exc}); training on the answers cached earlier")
        self.cache = ResponseCache(folder, identity, ttl, read_only=ep.cache_read_only or self.offline)
        self.cache.remember_identity(self._endpoint_name())
        self.pending: dict[str, Future] = {}
        self.counts = {"cache_hits": 0, "fetched": 0, "wait_s": 0.0, "queue": 0}
        self.client.snapshot()  # step telemetry counts training's requests, not the probe's

    def _endpoint_name(self) -> str:
        return f"{self.ep.url.rstrip('/')}#{self.ep.model}|{self.ep.mode}"

    # -- probe -----------------------------------------------------------------------------------
    def _probe(self) -> dict[str, Any]:
        """Model listed, the mode supported, tokens mapping back: the teacher's identity."""
        ep = self.ep
        listing = self.client.call(self.client.get("/models"))
        models = {m.get("id"): m for m in listing.get("data", []) if isinstance(m, dict)}
        if ep.model not in models:
            raise RemoteTeacherError(f"{ep.url}: model {ep.model!r} is not served there; the server lists "
                                     f"{', '.join(map(str, models)) or 'no models'} (teacher.endpoint.model)")
        info = models[ep.model]
        described = self.mode.probe(lambda path, body: self.client.call(self.client.post(path, body)))
        self.say(f"Remote teacher {ep.model} at {ep.url}: {described}")
        # What changes its answers: the model and its weights or quantisation, our tokenizer, the mode.
        reported = {key: info[key] for key in ("root", "kd_revision", "revision", "quantization") if key in info}
        return {"model": ep.model, "reported": reported, "tokenizer": self.tokenizer_hash, "mode": self.mode.name,
                "format": f"{self.mode.name}/v1"}

    # -- requests --------------------------------------------------------------------------------
    def _lookup(self, row: dict[str, Any]) -> Scored | None:
        for k in dict.fromkeys((self.ep.top_k, self.ep.min_top_k)):
            found = self.cache.get(self.cache.key(self.mode.cache_request(row, k)))
            if found is not None:
                return found
        return None

    async def _fetch(self, row: dict[str, Any]) -> Scored:
        answer, k = await self.client.post(self.mode.path, lambda k: self.mode.body(row, k))
        try:
            scored = self.mode.read(answer, row, k)
        except ProtocolError as exc:
            raise RemoteTeacherError(f"{self.ep.url}: an answer could not be read ({exc})") from None
        self.cache.put(self.cache.key(self.mode.cache_request(row, k)), scored)  # stored on arrival
        return scored

    def submit_row(self, row: dict[str, Any]) -> Future:
        """The future answer of a row: cached, already in flight, or sent now."""
        key = _row_key(row)
        future = self.pending.get(key)
        if future is None:
            found = self._lookup(row)
            if found is not None:
                future = Future()
                future.set_result(found)
                future.cached = True
            elif self.offline:
                future = Future()
                future.set_exception(RemoteTeacherError(
                    f"{self.ep.url} is unreachable and a sample's answer is not cached (--resume once the "
                    "server is back)"))
                future.cached = False
            else:
                future = self.client.submit(self._fetch(row))
                future.cached = False
            self.pending[key] = future
        return future

    def prefetch(self, batches: Iterable[dict[str, Any]], upcoming: Iterator[list[dict[str, Any]]]
                 ) -> Iterator[dict[str, Any]]:
        """The batches in order, each with its soft targets (`soft_targets`; in generate mode the batch
        is rebuilt as prompt + answer). Before a batch is yielded, the requests of its rows and of the
        next `prefetch_batches` batches are sent; the rows come from `upcoming` (the same order as the
        loader), so the DataLoader's own end-of-epoch bookkeeping is untouched."""
        queued: collections.deque = collections.deque()  # per batch ahead: [(row, future)]
        for batch in batches:
            while len(queued) <= self.ep.prefetch_batches:
                rows = next(upcoming, None)
                if rows is None:
                    break
                queued.append([(row, self.submit_row(row)) for row in rows])
            if not queued:
                raise KDError("remote teacher: the loader yielded more batches than its sampler listed")
            yield self._answered(batch, queued.popleft())

    def _answered(self, batch: dict[str, Any], entries: list[tuple[dict[str, Any], Future]]) -> dict[str, Any]:
        """Wait for a batch's answers (the wait is what `wait_s` reports) and attach its soft targets."""
        rows = [row for row, _ in entries]
        if len(rows) != batch["labels"].shape[0]:
            raise KDError(f"remote teacher: a batch of {batch['labels'].shape[0]} rows was announced with {len(rows)}")
        self.counts["queue"] = sum(not f.done() for f in self.pending.values())
        started = time.perf_counter()
        answers = [future.result() for _, future in entries]
        self.counts["wait_s"] += time.perf_counter() - started
        for row, future in entries:
            self.counts["cache_hits" if future.cached else "fetched"] += 1
            self.pending.pop(_row_key(row), None)  # a later batch with the same row holds its own reference
        return self.mode.assemble(batch, rows, answers)

    def logits(self, batch: dict[str, Any], role: str) -> TopK:
        """The soft targets `prefetch` attached to the batch."""
        if "soft_targets" not in batch:
            raise KDError("remote teacher: a batch reached the loss without passing through prefetch()")
        return batch["soft_targets"]

    # -- coverage and figures --------------------------------------------------------------------
    def missing(self, dataset: Any) -> list[int]:
        """Indices of a split whose answers are not cached (to train on the rest when offline)."""
        return [i for i, row in enumerate(dataset) if self._lookup(row) is None]

    def stats(self) -> dict[str, Any]:
        client = self.client.snapshot()
        hits, fetched = self.counts["cache_hits"], self.counts["fetched"]
        out = {"source": "remote", **client, "cache_hits": hits, "fetched": fetched,
               "hit_rate": hits / (hits + fetched) if hits + fetched else None,
               "queue": self.counts["queue"], "wait_s": self.counts["wait_s"], "offline": self.offline}
        self.counts.update(cache_hits=0, fetched=0, wait_s=0.0)
        return out

    def describe(self) -> dict[str, Any]:
        ep = self.ep
        described = {"source": "remote", "url": ep.url, "model": ep.model, "mode": ep.mode, "top_k": ep.top_k,
                     "cache": str(self.cache.path), "cached_answers": self.cache.count(),
                     "read_only": self.cache.read_only, "offline": self.offline}
        if ep.mode == "generate":
            described.update(api=ep.api, max_new_tokens=ep.max_new_tokens, temperature=ep.temperature)
        return described

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.client.close()
        self.cache.close()

    @property
    def needs_teacher_inputs(self) -> bool:
        return False


def _row_key(row: dict[str, Any]) -> str:
    """A row's identity while its answer is in flight: its tokens (and, for chat, its messages)."""
    return ",".join(map(str, row["input_ids"])) + "|" + row.get("messages_json", "")


def open_remote_teacher(cfg: Config, tokenizer: Any, data: PreparedData, accelerator: Any) -> RemoteTeacher:
    """teacher.endpoint: probe the server (or, when it is down, fall back on the cached answers and
    train on the samples they cover, saying how many are missing)."""
    remote = RemoteTeacher(cfg, tokenizer, say=accelerator.print)
    if remote.offline:
        for role, ds in list(data.splits.items()):
            missing = set(remote.missing(ds))
            if len(missing) == len(ds) and role == "train":
                remote.close()
                raise TrainingError(f"the remote teacher is unreachable and none of the {len(ds)} training samples "
                                    "has a cached answer; start the server and run again")
            if len(missing) == len(ds):
                del data.splits[role]
                accelerator.print(f"Remote teacher offline: no {role} sample is cached, so this run has no {role} "
                                  "evaluation")
                continue
            if missing:
                data.splits[role] = ds.select([i for i in range(len(ds)) if i not in missing])
            accelerator.print(f"Remote teacher offline: {role} split {len(ds) - len(missing)}/{len(ds)} samples "
                              f"cached, {len(missing)} missing (left out of this run)")
    return remote
