"""A teacher behind an OpenAI-compatible server (teacher.endpoint) as a source of soft targets.

It answers the same `logits(batch, role)` as a local or cached teacher (kd/soft_targets.py), with the
teacher's top k per learnt position (`TopK`; the token loss puts the rest of the mass in a tail
bucket). What it adds:

- A probe at start: the model must be listed by the server, scoring must work (echo with
  logprobs; servers that return none or shift them are refused with the reason), and the server's
  tokens must map back to exactly the student's token ids.
- Prefetch: `prefetch(batches)` sends the requests of the next `prefetch_batches` batches before the
  loop trains on the current one; `logits` waits only for answers not back yet (`wait_s`).
- Every answer stored on arrival (kd/response_cache.py): a restarted or resumed run asks nothing
  twice. With the server down, a run trains on the samples whose answers are cached and says how
  many are missing.

Score mode: each sample's tokens (padding dropped) are one /completions request with echo.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from kd.config import Config, EndpointConfig
from kd.errors import ConfigError
from kd.lm_losses import TopK
from kd.openai_api import (ProtocolError, Scored, TokenMap, check_alignment, completion_logprobs, score_request)
from kd.remote_client import EndpointClient, RemoteTeacherError, Unreachable
from kd.response_cache import ResponseCache
from kd.soft_targets import SoftTargets, preprocessing_identity

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Distillation moves knowledge from a teacher to a student."


def api_key(ep: EndpointConfig) -> str | None:
    """The key from the environment variable the config names (checked before anything is loaded)."""
    if ep.api_key_env is None:
        return None
    key = os.environ.get(ep.api_key_env)
    if not key:
        raise ConfigError([f"teacher.endpoint.api_key_env: the environment variable {ep.api_key_env} is not set "
                           "(export it, or set api_key_env: null for a server without a key)"])
    return key


def row_tokens(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's tokens without its padding (what the teacher scores)."""
    ids, mask = batch["inputs"]["input_ids"].cpu(), batch["inputs"]["attention_mask"].cpu().bool()
    return [ids[r][mask[r]].tolist() for r in range(ids.shape[0])]


class RemoteTeacher(SoftTargets):
    source = "remote"
    telemetry_key = "remote_teacher"

    def __init__(self, cfg: Config, tokenizer: Any, say=print):
        self.ep = ep = cfg.teacher.endpoint
        self.say = say
        self.tokens = TokenMap(tokenizer)
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
        return f"{self.ep.url.rstrip('/')}#{self.ep.model}"

    # -- probe -----------------------------------------------------------------------------------
    def _probe(self) -> dict[str, Any]:
        """Model listed, scoring supported and aligned, tokens mapping back: the teacher's identity."""
        ep = self.ep
        listing = self.client.call(self.client.get("/models"))
        models = {m.get("id"): m for m in listing.get("data", []) if isinstance(m, dict)}
        if ep.model not in models:
            raise RemoteTeacherError(f"{ep.url}: model {ep.model!r} is not served there; the server lists "
                                     f"{', '.join(map(str, models)) or 'no models'} (teacher.endpoint.model)")
        info = models[ep.model]
        ids = self.tokens.tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
        answer, k = self.client.call(self.client.post("/completions", lambda k: score_request(ep.model, ids, k)))
        try:
            tokens, values, top = completion_logprobs(answer)
            echoed = tokens[:len(ids)]
            kind = self.tokens.detect(echoed, ids)
            if any(t is not None for t in top[:1]) or len(tokens) < len(ids):
                raise ProtocolError("the answer does not echo the prompt with logprobs (echo: true)")
            self.tokens.top(top[1:len(ids)], k)  # every top token maps to a student id
            check_alignment(echoed, values[:len(ids)], top[:len(ids)])
        except ProtocolError as exc:
            raise RemoteTeacherError(f"{ep.url} ({ep.model}) cannot score text for distillation: {exc}") from None
        self.say(f"Remote teacher {ep.model} at {ep.url}: scores text (echo + logprobs, top {k}), tokens as {kind}")
        # What changes its answers: the model and its weights or quantisation, our tokenizer, the mode.
        reported = {key: info[key] for key in ("root", "kd_revision", "revision", "quantization") if key in info}
        return {"model": ep.model, "reported": reported, "tokenizer": self.tokenizer_hash, "mode": "score",
                "format": "score/v1"}

    # -- requests --------------------------------------------------------------------------------
    def _request(self, ids: list[int], k: int) -> dict[str, Any]:
        """What a cache key hashes (the request without the model name, which the identity holds)."""
        return {"mode": "score", "prompt": ids, "k": k}

    def _lookup(self, ids: list[int]) -> Scored | None:
        for k in dict.fromkeys((self.ep.top_k, self.ep.min_top_k)):
            found = self.cache.get(self.cache.key(self._request(ids, k)))
            if found is not None:
                return found
        return None

    async def _fetch(self, ids: list[int]) -> Scored:
        answer, k = await self.client.post("/completions", lambda k: score_request(self.ep.model, ids, k))
        try:
            tokens, _, top = completion_logprobs(answer)
            if len(tokens) < len(ids) or [self.tokens.to_id(t) for t in tokens[:len(ids)]] != ids:
                raise ProtocolError("the echoed tokens are not the ones sent")
            top_ids, top_lps = self.tokens.top(top[1:len(ids)], k)
        except ProtocolError as exc:
            raise RemoteTeacherError(f"{self.ep.url}: an answer could not be read ({exc})") from None
        scored = Scored(np.asarray(ids, dtype=np.int32), top_ids, top_lps)
        self.cache.put(self.cache.key(self._request(ids, k)), scored)  # stored on arrival: a kill loses nothing
        return scored

    def submit(self, batch: dict[str, Any]) -> None:
        """Send the requests of a batch's rows that are neither cached nor already in flight."""
        for ids in row_tokens(batch):
            self.submit_row(ids)

    def submit_row(self, ids: list[int]) -> None:
        key = _row_key(ids)
        if key not in self.pending:
            found = self._lookup(ids)
            if found is not None:
                future: Future = Future()
                future.set_result(found)
                future.cached = True
            elif self.offline:
                future = Future()
                future.set_exception(RemoteTeacherError(
                    f"{self.ep.url} is unreachable and a sample's answer is not cached (--resume once the "
                    "server is back)"))
                future.cached = False
            else:
                future = self.client.submit(self._fetch(ids))
                future.cached = False
            self.pending[key] = future

    def prefetch(self, batches: Iterable[dict[str, Any]], upcoming: Iterator[list[dict[str, Any]]]
                 ) -> Iterator[dict[str, Any]]:
        """The batches in order; before each is yielded, the requests of the batches up to
        `prefetch_batches` after it are sent (their rows come from `upcoming`, not the loader, so
        the DataLoader's own end-of-epoch bookkeeping is untouched)."""
        sent = 0
        for consumed, batch in enumerate(batches):
            while self.ep.prefetch_batches and sent <= consumed + self.ep.prefetch_batches:
                rows = next(upcoming, None)
                if rows is None:
                    break
                for row in rows:
                    self.submit_row(list(row["input_ids"]))
                sent += 1
            yield batch

    def logits(self, batch: dict[str, Any], role: str) -> TopK:
        """The batch's soft targets: row r, position t <- the teacher's distribution of token t + 1."""
        self.submit(batch)  # evaluation batches (and any batch prefetch did not see) are sent now
        keys = [_row_key(ids) for ids in row_tokens(batch)]
        self.counts["queue"] = sum(not f.done() for f in self.pending.values())
        started = time.perf_counter()
        answers = []
        for key in keys:
            future = self.pending[key]
            answers.append(future.result())
            if role == "train":
                self.counts["cache_hits" if future.cached else "fetched"] += 1
        for key in keys:
            self.pending.pop(key, None)
        self.counts["wait_s"] += time.perf_counter() - started
        labels = batch["labels"]
        k = min(a.k for a in answers)
        top_ids = torch.zeros((*labels.shape, k), dtype=torch.long)
        top_lps = torch.zeros((*labels.shape, k), dtype=torch.float32)
        for r, answer in enumerate(answers):
            n = len(answer.top_ids)  # positions 0 .. n-1 (the last token of a row predicts nothing here)
            top_ids[r, :n] = torch.from_numpy(answer.top_ids[:, :k].astype(np.int64))
            top_lps[r, :n] = torch.from_numpy(answer.top_logprobs[:, :k])
        return TopK(top_ids.to(labels.device), top_lps.to(labels.device))

    # -- coverage and figures --------------------------------------------------------------------
    def missing(self, dataset: Any) -> list[int]:
        """Indices of a split whose answers are not cached (to train on the rest when offline)."""
        return [i for i, row in enumerate(dataset) if self._lookup(list(row["input_ids"])) is None]

    def stats(self) -> dict[str, Any]:
        client = self.client.snapshot()
        hits, fetched = self.counts["cache_hits"], self.counts["fetched"]
        out = {"source": "remote", **client, "cache_hits": hits, "fetched": fetched,
               "hit_rate": hits / (hits + fetched) if hits + fetched else None,
               "queue": self.counts["queue"], "wait_s": self.counts["wait_s"], "offline": self.offline}
        self.counts.update(cache_hits=0, fetched=0, wait_s=0.0)
        return out

    def describe(self) -> dict[str, Any]:
        return {"source": "remote", "url": self.ep.url, "model": self.ep.model, "mode": "score",
                "top_k": self.ep.top_k, "cache": str(self.cache.path), "cached_answers": self.cache.count(),
                "read_only": self.cache.read_only, "offline": self.offline}

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.client.close()
        self.cache.close()

    @property
    def needs_teacher_inputs(self) -> bool:
        return False


def _row_key(ids: list[int]) -> str:
    return ",".join(map(str, ids))
