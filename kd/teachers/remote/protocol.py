"""The OpenAI-compatible wire format of a remote teacher: requests, responses, and token mapping.

Pure functions and small classes, no network (kd/teachers/remote/client.py sends, kd/teachers/remote/source.py decides
what to ask). Two things are asked of a server:

- score: `/completions` with the sample's token ids as the prompt, `echo: true`, `logprobs: k` and
  `max_tokens: 1`. Entry i of the echoed logprobs is the teacher's distribution of prompt token i
  given the tokens before it (entry 0 has none), so position t of the student (which predicts token
  t + 1) learns from entry t + 1.
- generate: the teacher writes the answer to a prompt, on `/completions` (prompt token ids,
  `logprobs: k`) or `/chat/completions` (messages, `logprobs: true`, `top_logprobs: k`): entry i is
  the distribution answer token i was drawn from. vLLM lists the stop token that ends an answer
  (with its logprobs, not in the text); OpenAI leaves it out, and `finish_reason: "stop"` says
  there was one.

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
    Row i is the distribution the token at i was drawn from (score mode: row 0 is unused).
    `stopped` (generate mode): the answer ended with the stop token (the last of `ids` when the
    server listed it, else not among them)."""

    ids: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    stopped: bool | None = None

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"ids": self.ids, "top_ids": self.top_ids, "top_logprobs": self.top_logprobs}
        if self.stopped is not None:
            out["stopped"] = np.asarray(self.stopped, dtype=np.bool_)
        return out

    @classmethod
    def from_arrays(cls, arrays: Any) -> "Scored":
        stopped = bool(arrays["stopped"]) if "stopped" in arrays else None
        return cls(arrays["ids"], arrays["top_ids"], arrays["top_logprobs"], stopped)


# ---------------------------------------------------------------------------------------------
# Requests


def score_request(model: str, ids: list[int], k: int) -> dict[str, Any]:
    return {"model": model, "prompt": list(ids), "max_tokens": 1, "temperature": 0.0, "echo": True,
            "logprobs": k, "return_tokens_as_token_ids": True}


def completion_request(model: str, ids: list[int], *, k: int, max_tokens: int, temperature: float,
                       as_ids: bool = True) -> dict[str, Any]:
    """Generate: continue the prompt's token ids, with the top k of every new token."""
    body = {"model": model, "prompt": list(ids), "max_tokens": max_tokens, "temperature": temperature,
            "logprobs": k}
    if as_ids:
        body["return_tokens_as_token_ids"] = True
    return body


def chat_request(model: str, messages: list[dict[str, str]], *, k: int, max_tokens: int, temperature: float,
                 as_ids: bool = True) -> dict[str, Any]:
    """Generate: answer the conversation, with the top k of every answer token."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "logprobs": True, "top_logprobs": k}
    if as_ids:  # vLLM's extension; OpenAI refuses unknown fields, so the probe retries without it
        body["return_tokens_as_token_ids"] = True
    return body


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """A conversation as a chat server feeds it to the model before it answers: the chat template
    with the generation prompt, tokenised without added special tokens (the template writes its own).
    The kit's prompt data, its generate probe and kd.teachers.remote.server all render prompts this one way."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Responses


def completion_logprobs(response: dict[str, Any]
                        ) -> tuple[list[str], list[float | None], list[dict[str, float] | None]]:
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


def answer_text(response: dict[str, Any], chat: bool) -> tuple[str, str | None]:
    """(the answer's text, its finish_reason) of a /completions or /chat/completions answer."""
    try:
        choice = response["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
    except (KeyError, IndexError, TypeError):
        raise ProtocolError("the answer has no choices[0]" + (".message.content" if chat else ".text")) from None
    return text or "", choice.get("finish_reason")


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


class AmbiguousToken(ProtocolError):
    """A token string that several student ids write alike (e.g. the halves of a UTF-8 character,
    both decoded as U+FFFD): only ids, or the answer's text, say which one it was."""


class TokenMap:
    """Server token -> student token id, for the three ways servers write tokens (see the module doc).

    `kind` is "ids", "tokens" or "text"; `detect` (score) and `detect_text` (generate) pick the one
    under which a probe's tokens reproduce what was sent or written. Token strings that several ids
    write alike are ambiguous: in a top list they are left out (their mass joins the tail bucket);
    in an answer they are resolved by tokenising the answer's text, which must then agree with every
    unambiguous token."""

    KINDS = ("ids", "tokens", "text")
    AMBIGUOUS = -1

    def __init__(self, tokenizer: Any, kind: str = "ids"):
        self.tokenizer, self.kind = tokenizer, kind
        self._tables: dict[str, dict[str, int]] = {}

    def name(self, token_id: int, kind: str | None = None) -> str:
        """How a server of this kind writes the student's token `token_id`."""
        kind = kind or self.kind
        if kind == "ids":
            return f"{TOKEN_ID_PREFIX}{token_id}"
        if kind == "tokens":
            return self.tokenizer.convert_ids_to_tokens(token_id)
        return self.tokenizer.decode([token_id])

    def table(self, kind: str) -> dict[str, int]:
        if kind not in self._tables:
            size = len(self.tokenizer)
            if kind == "tokens":
                strings = self.tokenizer.convert_ids_to_tokens(list(range(size)))
            else:
                strings = [self.tokenizer.decode([i]) for i in range(size)]
            table: dict[str, int] = {}
            for i, s in enumerate(strings):
                table[s] = i if s not in table else self.AMBIGUOUS
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
        if found == self.AMBIGUOUS:
            raise AmbiguousToken(f"the server's token {token!r} is written alike by several student ids")
        return found

    def matches(self, token: str, token_id: int, kind: str | None = None) -> bool:
        """Whether the server's `token` can be the student's `token_id` (ambiguous strings included)."""
        try:
            return self.to_id(token, kind) == token_id
        except AmbiguousToken:
            return self.name(token_id, kind) == token

    def answer_ids(self, tokens: list[str], text: str, kind: str | None = None) -> list[int]:
        """The ids of an answer's tokens; ambiguous strings are resolved by tokenising `text`."""
        ids: list[int | None] = []
        for token in tokens:
            try:
                ids.append(self.to_id(token, kind))
            except AmbiguousToken:
                ids.append(None)
        if None not in ids:
            return ids
        again = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(again) != len(ids) or any(a is not None and a != b for a, b in zip(ids, again)):
            raise ProtocolError("the answer has token strings several student ids write alike, and its text "
                                "tokenises differently; use a server that returns token ids (vLLM)")
        return list(again)

    def detect(self, tokens: list[str], expected: list[int]) -> str:
        """The kind under which `tokens` are exactly `expected`; ProtocolError naming the first
        mismatch when none does (the server's tokenizer is not the student's)."""
        first_bad = None
        for kind in self.KINDS:
            try:
                agree = [self.matches(t, e, kind) for t, e in zip(tokens, expected)]
            except (ProtocolError, ValueError):
                continue
            if len(tokens) == len(expected) and all(agree):
                self.kind = kind
                return kind
            if first_bad is None:
                i = agree.index(False) if False in agree else min(len(tokens), len(expected))
                first_bad = (f"as {kind}, position {i}: server {tokens[i] if i < len(tokens) else '(end)'!r}, student "
                             f"{expected[i] if i < len(expected) else None} (lengths {len(tokens)} vs {len(expected)})")
        raise ProtocolError("the server's tokens do not map back to the student's token ids"
                            + (f" ({first_bad})" if first_bad else f" (first tokens {tokens[:4]!r})")
                            + "; teacher and student need the same tokenizer")

    def detect_text(self, tokens: list[str], text: str, top: list[dict[str, float] | None]) -> str:
        """Generate mode: the kind under which the answer's tokens decode to the answer's text and
        every token of its top lists is a student token."""
        for kind in self.KINDS:
            try:
                ids = self.answer_ids(tokens, text, kind)
                for entry in top:
                    for token in entry or {}:
                        try:
                            self.to_id(token, kind)
                        except AmbiguousToken:
                            pass
            except (ProtocolError, ValueError):
                continue
            if self.tokenizer.decode(ids, skip_special_tokens=True) == text:
                self.kind = kind
                return kind
        raise ProtocolError(f"the server's answer tokens ({tokens[:4]!r}...) do not decode to its text {text[:40]!r} "
                            "with the student's tokenizer; teacher and student need the same tokenizer")

    def top(self, entries: list[dict[str, float] | None], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per position, the k most likely ids and their log-probabilities, (n, k') with k' the
        smallest number of entries any position has (at most k; servers add the chosen token to
        the top k, and ambiguous token strings are left out)."""
        rows = []
        for entry in entries:
            if not entry:
                raise ProtocolError("a position has no top_logprobs")
            pairs = []
            for token, lp in entry.items():
                try:
                    pairs.append((float(lp), self.to_id(token)))
                except AmbiguousToken:
                    continue
            if not pairs:
                raise ProtocolError("a position's top_logprobs are all ambiguous token strings")
            # Most likely first; equal log-probabilities (bf16 answers have them) lower id first, as
            # the servers' own greedy choice (vLLM, torch.argmax) breaks them.
            rows.append(sorted(pairs, key=lambda pair: (-pair[0], pair[1]))[:k])
        width = min((len(r) for r in rows), default=k)
        ids = np.array([[i for _, i in r[:width]] for r in rows], dtype=np.int32).reshape(len(rows), width)
        lps = np.array([[lp for lp, _ in r[:width]] for r in rows], dtype=np.float32).reshape(len(rows), width)
        return ids, lps


def check_alignment(tokens: list[str], values: list[float | None], top: list[dict[str, float] | None],
                    tolerance: float = 1e-3) -> None:
    """Score mode: entry i must describe token i (llama-cpp-python's echo shifts them by one, #1983).
    Where token i appears in entry i's top log-probabilities (vLLM and kd.teachers.remote.server always add
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
