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
  twice.
- Outages: a server that is down (at start, or once a request's retries are spent) is waited for
  (`outage_wait_s`, probed with backoff), then the run stops and says so; a loop waiting on it
  gets `warning` events as it happens. A run never finishes on part of its data unless asked:
  with the server down it trains on cached answers only when they cover every sample, or when the
  operator said so (`--cache-read-only`: the cached samples, the missing ones counted).
- When the teacher's weights are at hand locally (the student starts from them), the probe's
  answers are compared with them: the agreement printed at start shows a server computing in
  another precision (vLLM serves bf16 unless told `--dtype float32`).

What is asked and how answers become soft targets depends on the mode (kd/teachers/remote/modes.py): score
(the teacher scores the data's text) or generate (it answers the data's prompts, and the batch is
rebuilt as prompt + answer).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from kd.config import Config, EndpointConfig
from kd.data import PreparedData
from kd.errors import ConfigError, KDError, TrainingError
from kd.lm.losses import TopK
from kd.teachers.identity import preprocessing_identity
from kd.teachers.remote.client import EndpointClient, GaveUp, RemoteTeacherError
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


WATCH_S = 5.0  # while the loop waits on an answer: how often it looks for retries to warn about


class RemoteTeacher(SoftTargetSource):
    source = "remote"
    telemetry_key = "remote_teacher"

    def __init__(self, cfg: Config, tokenizer: Any, say=print,
                 local_teacher: Callable[[], torch.nn.Module] | None = None):
        """`local_teacher`: the teacher's own weights, loaded on call (only passed where the run loads
        them anyway), to measure the server's answers against."""
        self.ep = ep = cfg.teacher.endpoint
        self.say = say
        self.warn: Callable[[str, str], None] = lambda code, message: say(f"Warning [{code}]: {message}")
        self.tokens = TokenMap(tokenizer)
        self.mode = make_mode(ep, self.tokens)
        self.client = EndpointClient(ep, api_key(ep), seed=cfg.run.seed)
        self.tokenizer_hash = preprocessing_identity(tokenizer)
        self.local_teacher = local_teacher
        self.agreement: dict[str, Any] | None = None
        self._outage_since: float | None = None  # monotonic time of the first failure of an outage in progress
        self.offline = False
        self.folder = cfg.distillation.cache_folder()
        self.ttl = ep.cache_ttl_days * 86400 if ep.cache_ttl_days else None
        self.cache: ResponseCache | None = None
        self.pending: dict[str, tuple[dict[str, Any], Future]] = {}  # row key -> (row, its answer to come)
        self.counts = {"cache_hits": 0, "fetched": 0, "wait_s": 0.0, "queue": 0}

    def report_to(self, warn: Callable[[str, str], None]) -> None:
        self.warn = warn

    def _endpoint_name(self) -> str:
        return f"{self.ep.url.rstrip('/')}#{self.ep.model}|{self.ep.mode}|{self.ep.precision}"

    # -- start -----------------------------------------------------------------------------------
    def connect(self, splits: dict[str, Any]) -> None:
        """Probe the server and open the answer cache. With the server down: train on cached answers
        if they cover every sample of `splits` (or, with --cache-read-only, on the samples they cover:
        `splits` loses the others); else wait for the server (outage_wait_s), then stop."""
        try:
            identity = self._probe()
        except GaveUp as exc:
            missing = self._uncached(splits)
            if missing is not None and self._cached_run(str(exc), splits, missing):
                return
            if not self.wait_for_server(str(exc)):
                raise RemoteTeacherError(self._still_down(str(exc), splits, missing)) from None
            identity = self._probe()
            self._answering_again()
        self.cache = ResponseCache(self.folder, identity, self.ttl, read_only=self.ep.cache_read_only)
        self.cache.remember_identity(self._endpoint_name())
        self.client.snapshot()  # step telemetry counts training's requests, not the probe's

    def _uncached(self, splits: dict[str, Any]) -> dict[str, list[int]] | None:
        """The server is down: per split, the samples whose answers are not cached, read from the
        answers this endpoint gave last (left open, read-only); None when it never answered here."""
        identity = ResponseCache.last_identity(self.folder, self._endpoint_name())
        if identity is None:
            return None
        self.cache = ResponseCache(self.folder, identity, self.ttl, read_only=True)
        return {role: self.missing(ds) for role, ds in splits.items()}

    def _cached_run(self, cause: str, splits: dict[str, Any], missing: dict[str, list[int]]) -> bool:
        """The server is down: whether this run trains on the cached answers (`missing`: what they lack)."""
        if not any(missing.values()):
            self.offline = True
            self.say(f"Remote teacher down ({cause}); every sample's answer is cached, so this run trains on them")
            return True
        if not self.ep.cache_read_only:
            self.cache.close()
            self.cache = None
            return False
        self.offline = True  # asked for: --cache-read-only trains on what is cached, the rest left out
        self.say(f"Remote teacher down ({cause}); --cache-read-only: training on the cached answers only")
        for role, absent in missing.items():
            ds, absent = splits[role], set(absent)
            if len(absent) == len(ds) and role == "train":
                raise TrainingError(f"the remote teacher is unreachable and none of the {len(ds)} training samples "
                                    "has a cached answer; start the server and run again")
            if len(absent) == len(ds):
                del splits[role]
                self.say(f"Remote teacher offline: no {role} sample is cached, so this run has no {role} evaluation")
                continue
            if absent:
                splits[role] = ds.select([i for i in range(len(ds)) if i not in absent])
            self.say(f"Remote teacher offline: {role} split {len(ds) - len(absent)}/{len(ds)} samples cached, "
                     f"{len(absent)} missing (left out of this run)")
        return True

    def _still_down(self, cause: str, splits: dict[str, Any], missing: dict[str, list[int]] | None) -> str:
        waited = f"still down after waiting {self.ep.outage_wait_s:g} s (teacher.endpoint.outage_wait_s)"
        if missing is None:
            return (f"{cause}; {waited}, and no answers of {self.ep.model} are cached: start the server and run "
                    "again (with --resume to continue from the last checkpoint)")
        absent = len(missing["train"])
        return (f"{cause}; {waited}, and {absent} of {len(splits['train'])} training samples have no cached answer: "
                "start the server and run again (with --resume to continue from the last checkpoint), or add "
                "--cache-read-only to train on the cached samples only")

    def wait_for_server(self, cause: str) -> bool:
        """Probe the server with backoff until it answers or the outage (which began at the first
        failure, however many requests fail in it) has lasted outage_wait_s; whether it answers."""
        wait, url = self.ep.outage_wait_s, self.ep.url
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            if wait > 0:
                self.warn("teacher_down", f"remote teacher at {url} is down ({cause}); waiting up to {wait:g} s for "
                                          "it (teacher.endpoint.outage_wait_s)")
        attempt = 0
        while (left := self._outage_since + wait - time.monotonic()) > 0:
            time.sleep(min(left, self.ep.max_backoff_s, self.ep.backoff_s * 2 ** attempt))
            attempt += 1
            if self.client.call(self.client.ping()) is None:
                return True  # it answers a listing; the failed requests are sent again
        return False

    def _answering_again(self) -> None:
        """A request got its answer: an outage in progress is over."""
        if self._outage_since is not None:
            self.warn("teacher_back", f"remote teacher at {self.ep.url} answers again after "
                                      f"{time.monotonic() - self._outage_since:.0f} s; training goes on")
            self._outage_since = None

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
        if self.local_teacher is not None:
            self._compare_with_local()
        # What changes its answers: the model and its weights or quantisation, the precision it computes
        # in (named by the config: no server reports it), our tokenizer, the mode.
        reported = {key: info[key] for key in ("root", "kd_revision", "revision", "quantization") if key in info}
        return {"model": ep.model, "reported": reported, "precision": ep.precision, "tokenizer": self.tokenizer_hash,
                "mode": self.mode.name, "format": f"{self.mode.name}/v1"}

    def _compare_with_local(self) -> None:
        """The probe's answer against the local teacher's own distribution of the same tokens."""
        sequence, offset, scored = self.mode.probe_sample
        if len(scored.top_ids) == 0:
            return  # a generate probe answered with the end token alone: nothing to compare
        self.agreement = agreement(self.local_teacher(), sequence, offset, scored)
        a = self.agreement
        line = (f"Remote teacher against the local one (teacher.model) on the probe: top-1 agrees at "
                f"{a['top1_agree']}/{a['positions']} positions, largest log-prob difference "
                f"{a['max_logprob_diff']:.2g} nats")
        named = self.ep.precision
        if a["top1_agree"] == a["positions"] and a["max_logprob_diff"] <= AGREEMENT_NATS:
            pass  # an fp32 server with these weights
        elif named is None:
            line += (" (more than precision noise: the server computes in another precision or holds other "
                     "weights; vLLM serves bf16 unless started with --dtype float32. Name it in "
                     "teacher.endpoint.precision so its answers are cached apart)")
        elif named.lower() in ("fp32", "float32"):
            line += (" (teacher.endpoint.precision says fp32, but this is more than fp32 noise: is the server "
                     "started with --dtype float32, and does it hold these weights?)")
        else:
            line += f" (as expected of a {named} server; an fp32 one agrees to about 1e-4 nats)"
        self.say(line)

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
        if key in self.pending:
            return self.pending[key][1]
        found = self._lookup(row)
        if found is not None:
            future = Future()
            future.set_result(found)
            future.cached = True
        elif self.offline:
            future = Future()
            future.set_exception(RemoteTeacherError(
                f"{self.ep.url} is unreachable and a sample's answer is not cached (--resume once the server is back)"))
            future.cached = False
        else:
            future = self.client.submit(self._fetch(row))
            future.cached = False
        self.pending[key] = (row, future)
        return future

    def prefetch(self, batches: Iterable[dict[str, Any]], upcoming: Iterator[list[dict[str, Any]]]
                 ) -> Iterator[dict[str, Any]]:
        """The batches in order, each with its soft targets (`soft_targets`; in generate mode the batch
        is rebuilt as prompt + answer). Before a batch is yielded, the requests of its rows and of the
        next `prefetch_batches` batches are sent; the rows come from `upcoming` (the same order as the
        loader), so the DataLoader's own end-of-epoch bookkeeping is untouched."""
        queued: collections.deque = collections.deque()  # per batch ahead: [(row, future)], None: not wanted
        ended = object()
        for batch in batches:
            while len(queued) <= self.ep.prefetch_batches:
                rows = next(upcoming, ended)
                if rows is ended:
                    break
                queued.append(None if rows is None else [(row, self.submit_row(row)) for row in rows])
            if not queued:
                raise KDError("remote teacher: the loader yielded more batches than its sampler listed")
            entries = queued.popleft()
            yield batch if entries is None else self._answered(batch, entries)

    def score(self, batch: dict[str, Any]) -> TopK:
        """A sampled batch's soft targets (score mode): one request per row, all sent at once; the
        answers are cached under the sampled ids like any other text's."""
        if self.ep.mode != "score":
            raise KDError("remote teacher: scoring the student's samples needs teacher.endpoint.mode: score")
        ids = batch["inputs"]["input_ids"].tolist()
        lengths = batch["inputs"]["attention_mask"].sum(-1).tolist()
        rows = [{"input_ids": row[:n]} for row, n in zip(ids, lengths)]
        return self._answered(batch, [(row, self.submit_row(row)) for row in rows])["soft_targets"]

    def _answered(self, batch: dict[str, Any], entries: list[tuple[dict[str, Any], Future]]) -> dict[str, Any]:
        """Wait for a batch's answers (the wait is what `wait_s` reports) and attach its soft targets."""
        rows = [row for row, _ in entries]
        if len(rows) != batch["labels"].shape[0]:
            raise KDError(f"remote teacher: a batch of {batch['labels'].shape[0]} rows was announced with {len(rows)}")
        self.counts["queue"] = sum(not f.done() for _, f in self.pending.values())
        started = time.perf_counter()
        answers, cached = [], []
        for row, future in entries:
            future = self._current(row, future)
            answers.append(self._result(row, future))
            cached.append(future.cached)
        self.counts["wait_s"] += time.perf_counter() - started
        for row, was_cached in zip(rows, cached):
            self.counts["cache_hits" if was_cached else "fetched"] += 1
            self.pending.pop(_row_key(row), None)  # a later batch with the same row asks again (from the cache)
        return self.mode.assemble(batch, rows, answers)

    def _current(self, row: dict[str, Any], future: Future) -> Future:
        """The row's newest request (one sent again after an outage replaces the failed one)."""
        entry = self.pending.get(_row_key(row))
        return entry[1] if entry is not None else future

    def _result(self, row: dict[str, Any], future: Future) -> Scored:
        """A row's answer. While waiting, retries are reported as `warning` events as they happen; when
        the retry budget is spent, the server is waited for (outage_wait_s) and every failed request
        sent again, so the batch trains on exactly the answers an uninterrupted run would."""
        seen = self.client.troubles
        while True:
            try:
                answer = future.result(timeout=WATCH_S)
                if not future.cached:
                    self._answering_again()
                return answer
            except concurrent.futures.TimeoutError:
                if self.client.troubles > seen:
                    self.warn("teacher_retrying", f"remote teacher at {self.ep.url}: {self.client.troubles - seen} "
                                                  f"failed tries while training waits; last: {self.client.last_cause}")
                    seen = self.client.troubles
            except GaveUp as exc:
                if not self.wait_for_server(str(exc)):
                    raise GaveUp(f"{exc}; the server is still down after waiting {self.ep.outage_wait_s:g} s "
                                 "(teacher.endpoint.outage_wait_s)") from None
                self._send_failed_again()
                future = self._current(row, future)
                if future.done() and future.exception() is not None:  # not pending any more: ask once more
                    future = self.client.submit(self._fetch(row))
                    future.cached = False
                seen = self.client.troubles

    def _send_failed_again(self) -> None:
        for key, (row, future) in list(self.pending.items()):
            if future.done() and isinstance(future.exception(), GaveUp):
                again = self.client.submit(self._fetch(row))
                again.cached = False
                self.pending[key] = (row, again)

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
                     "precision": ep.precision, "cache": str(self.cache.path), "cached_answers": self.cache.count(),
                     "read_only": self.cache.read_only, "offline": self.offline, "agreement": self.agreement}
        if ep.mode == "generate":
            described.update(api=ep.api, max_new_tokens=ep.max_new_tokens, temperature=ep.temperature)
        return described

    def close(self) -> None:
        for _, future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.client.close()
        if self.cache is not None:
            self.cache.close()

    @property
    def needs_teacher_inputs(self) -> bool:
        return False


def _row_key(row: dict[str, Any]) -> str:
    """A row's identity while its answer is in flight: its tokens (and, for chat, its messages)."""
    return ",".join(map(str, row["input_ids"])) + "|" + row.get("messages_json", "")


AGREEMENT_NATS = 0.01  # fp32 server and fp32 teacher agree to about 1e-4 nats; bf16 is off by tenths


def agreement(model: torch.nn.Module, sequence: list[int], offset: int, scored: Scored) -> dict[str, Any]:
    """How a server's answer (`scored`: row j is the distribution at position offset + j of
    `sequence`) compares with the local teacher's: positions whose top-1 is the same (ties go to the
    lower id, as servers break them) and the largest log-probability difference over the top k."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([sequence], device=device)).logits[0].float()
    rows = torch.log_softmax(logits, dim=-1)[offset:offset + len(scored.top_ids)].cpu()
    ids = torch.from_numpy(scored.top_ids.astype(np.int64))
    served = torch.from_numpy(scored.top_logprobs.astype(np.float32))
    return {"positions": len(ids), "top1_agree": int((rows.argmax(-1) == ids[:, 0]).sum()),
            "max_logprob_diff": float((rows.gather(1, ids) - served).abs().max())}


def open_remote_teacher(cfg: Config, tokenizer: Any, data: PreparedData, accelerator: Any,
                        local_teacher: Callable[[], torch.nn.Module] | None = None) -> RemoteTeacher:
    """teacher.endpoint: probe the server (see RemoteTeacher.connect for a server that is down)."""
    remote = RemoteTeacher(cfg, tokenizer, say=accelerator.print, local_teacher=local_teacher)
    try:
        remote.connect(data.splits)
    except BaseException:
        remote.close()
        raise
    return remote
