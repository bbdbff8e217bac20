"""The OpenAI-compatible wire format of a remote teacher: requests, responses, and token mapping.

Pure functions and small classes, no network (kd/remote_client.py sends, kd/remote_teacher.py decides
what to ask). Two things are asked of a server:

- score: `/completions` with the sample's token ids as the prompt, `echo: true`, `logprobs: k` and
  `max_tokens: 1`. Entry i of the echoed logprobs is the teacher's distribution of prompt token i
  given the tokens before it (entry 0 has none), so position t of the student (which predicts token
  t + 1) learns from entry t + 1.
- chat (kd.serve_teacher answers it; the kit's training client does not use it yet):
  `/chat/completions` with `logprobs` and `top_logprobs`, each answer token with its top k.

Tokens come back as ids when the server honours vLLM's `return_tokens_as_token_ids` ("token_id:17"),
else as strings: the tokenizer's own token strings ("Ġworld") or their decoded text (" world"),
depending on the server. `TokenMap` maps all three to the student's ids; which one a server speaks
is found on the probe request, where the mapping must reproduce the ids that were sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kd.errors import KDError

TOKEN_ID_PREFIX = "token_id:"


class ProtocolError(KDError):
    """The server's answer does not have the shape this request needs (or cannot be mapped to tokens)."""


@dataclass
class Scored:
    """A teacher's answer as arrays: the tokens of the sequence it scored or wrote (`ids`, n) and, per
    position, its top k next-token ids and log-probabilities (`top_ids`, `top_logprobs`, (n, k)).
    Row i is the distribution the token at i was drawn from (score mode: row 0 is unused)."""

    ids: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"ids": self.ids, "top_ids": self.top_ids, "top_logprobs": self.top_logprobs}


# ---------------------------------------------------------------------------------------------
# Requests


def score_request(model: str, ids: list[int], k: int) -> dict[str, Any]:
    return {"model": model, "prompt": list(ids), "max_tokens": 1, "temperature": 0.0, "echo": True,
            "logprobs": k, "return_tokens_as_token_ids": True}


# ---------------------------------------------------------------------------------------------
# Responses


def completion_logprobs(response: dict[str, Any]) -> tuple[list[str], list[float | None], list[dict[str, float] | None]]:
    """(tokens, their log-probabilities, top log-probabilities per position) of a /completions answer."""
    try:
        logprobs = response["choices"][0]["logprobs"]
        tokens, values, top = logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ProtocolError("the /completions answer has no choices[0].logprobs with tokens, token_logprobs and "
                            "top_logprobs (the server ignored `logprobs`)") from None
    if not (len(tokens) == len(values) == len(top)):
        raise ProtocolError(f"the /completions logprobs lists differ in length ({len(tokens)} tokens, "
                            f"{len(values)} token_logprobs, {len(top)} top_logprobs)")
    return list(tokens), list(values), list(top)


def chat_logprobs(response: dict[str, Any]) -> tuple[list[str], list[float | None], list[dict[str, float] | None]]:
    """The same three lists from a /chat/completions answer (logprobs.content)."""
    try:
        content = response["choices"][0]["logprobs"]["content"]
        tokens = [entry["token"] for entry in content]
        values = [entry["logprob"] for entry in content]
        top = [{alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]} for entry in content]
    except (KeyError, IndexError, TypeError):
        raise ProtocolError("the /chat/completions answer has no choices[0].logprobs.content with token, logprob "
                            "and top_logprobs per token (the server ignored `logprobs` / `top_logprobs`)") from None
    return tokens, values, top


def server_error(body: Any) -> str:
    """The human part of an error body ({"error": {"message": ...}}, {"detail": ...}, or text)."""
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)[:300]
    return str(body)[:300]


# ---------------------------------------------------------------------------------------------
# Tokens


class TokenMap:
    """Server token -> student token id, for the three ways servers write tokens (see the module doc).

    `kind` is "ids", "tokens" or "text"; `detect` picks the one under which a probe's echoed tokens
    reproduce the ids that were sent."""

    KINDS = ("ids", "tokens", "text")

    def __init__(self, tokenizer: Any, kind: str = "ids"):
        self.tokenizer, self.kind = tokenizer, kind
        self._tables: dict[str, dict[str, int]] = {}

    def table(self, kind: str) -> dict[str, int]:
        if kind not in self._tables:
            size = len(self.tokenizer)
            if kind == "tokens":
                strings = self.tokenizer.convert_ids_to_tokens(list(range(size)))
            else:
                strings = [self.tokenizer.decode([i]) for i in range(size)]
            table: dict[str, int] = {}
            for i, s in enumerate(strings):
                table.setdefault(s, i)  # the first id of a string that several ids decode to
            self._tables[kind] = table
        return self._tables[kind]

    def to_id(self, token: str, kind: str | None = None) -> int:
        kind = kind or self.kind
        if kind == "ids":
            if not token.startswith(TOKEN_ID_PREFIX):
                raise ProtocolError(f"token {token!r} is not written as {TOKEN_ID_PREFIX}<id>")
            return int(token[len(TOKEN_ID_PREFIX):])
        found = self.table(kind).get(token)
        if found is None:
            raise ProtocolError(f"the server's token {token!r} is not in the student's vocabulary")
        return found

    def detect(self, tokens: list[str], expected: list[int]) -> str:
        """The kind under which `tokens` map exactly to `expected`; ProtocolError naming the first
        mismatch when none does (the server's tokenizer is not the student's)."""
        first_bad = None
        for kind in self.KINDS:
            try:
                got = [self.to_id(t, kind) for t in tokens]
            except (ProtocolError, ValueError):
                continue
            if got == list(expected):
                self.kind = kind
                return kind
            if first_bad is None:
                i = next((j for j, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                first_bad = (f"as {kind}, position {i}: server {tokens[i] if i < len(tokens) else '(end)'!r} -> "
                             f"{got[i] if i < len(got) else None}, student {expected[i] if i < len(expected) else None}"
                             f" (lengths {len(got)} vs {len(expected)})")
        raise ProtocolError("the server's tokens do not map back to the student's token ids"
                            + (f" ({first_bad})" if first_bad else f" (first tokens {tokens[:4]!r})")
                            + "; teacher and student need the same tokenizer")

    def top(self, entries: list[dict[str, float] | None], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per position, the k most likely ids and their log-probabilities, (n, k') with k' the
        smallest number of entries any position has (at most k; servers add the chosen token to
        the top k, and two ids that write alike collapse into one string)."""
        rows = []
        for entry in entries:
            if not entry:
                raise ProtocolError("a position has no top_logprobs")
            pairs = sorted(((float(lp), self.to_id(tok)) for tok, lp in entry.items()), reverse=True)[:k]
            rows.append(pairs)
        width = min((len(r) for r in rows), default=k)
        ids = np.array([[i for _, i in r[:width]] for r in rows], dtype=np.int32).reshape(len(rows), width)
        lps = np.array([[lp for lp, _ in r[:width]] for r in rows], dtype=np.float32).reshape(len(rows), width)
        return ids, lps


def check_alignment(tokens: list[str], values: list[float | None], top: list[dict[str, float] | None],
                    tolerance: float = 1e-3) -> None:
    """Score mode: entry i must describe token i (llama-cpp-python's echo shifts them by one, #1983).
    Where token i appears in entry i's top log-probabilities (vLLM and kd.serve_teacher always add
    it), the value there must be token i's own log-probability."""
    checked = mismatched = 0
    for i in range(1, len(tokens)):
        entry = top[i] or {}
        if values[i] is None or tokens[i] not in entry:
            continue
        checked += 1
        mismatched += abs(float(entry[tokens[i]]) - float(values[i])) > tolerance
    if checked == 0 or mismatched:
        raise ProtocolError(f"the echoed log-probabilities are not aligned with the prompt tokens ({mismatched} of "
                            f"{checked} checked positions disagree); the server shifts or omits prompt logprobs "
                            "(llama.cpp-based servers do), so it cannot score text")
