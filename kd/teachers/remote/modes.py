"""What a remote teacher is asked, and how its answers become a batch's soft targets, per mode.

kd/teachers/remote/source.py owns the connection, the cache and the prefetch; a mode owns the content:

- `Score` (teacher.endpoint.mode: score): the teacher scores the data's own text. Each row's tokens
  go to /completions with echo; the batch stays as it is and position t learns from the teacher's
  distribution of token t + 1.
- `Generate` (mode: generate): the teacher answers each row's prompt, on /completions (token ids)
  or /chat/completions (messages). The batch is rebuilt as prompt + answer (+ the end token when the
  answer stopped): the answer's tokens are the labels (CE) and its top k per token the soft targets;
  prompt positions learn nothing.

Every mode answers `probe` (check the server can do it, once, at start; it keeps `probe_sample`:
the tokens, the position of the first answered row and the answer, to compare with a local
teacher), `body` (the request for a row at k), `cache_request` (what the answer's cache key
hashes), `read` (an answer -> `Scored`) and `assemble` (a batch + its rows' answers -> the batch
trained on, with its `TopK`).

A row is a dataset row: `input_ids` (the text, or the prompt), and in chat mode `messages_json`.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import torch

from kd.config import EndpointConfig
from kd.errors import KDError
from kd.lm.losses import IGNORE, TopK
from kd.teachers.remote.client import RemoteTeacherError
from kd.teachers.remote.protocol import (
    ProtocolError,
    Scored,
    TokenMap,
    answer_text,
    chat_logprobs,
    chat_prompt_ids,
    chat_request,
    check_alignment,
    completion_logprobs,
    completion_request,
    score_request,
)

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Distillation moves knowledge from a teacher to a student."
PROBE_QUESTION = "Name the three primary colours of light, in one short sentence."
PROBE_TOKENS = 8  # new tokens a generate probe asks for

# probe(ask): `ask(path, body_at_k)` sends one request (with retries) and returns (answer, k).
Ask = Callable[[str, Callable[[int], dict[str, Any]]], tuple[dict[str, Any], int]]


class Score:
    name = "score"
    path = "/completions"

    def __init__(self, ep: EndpointConfig, tokens: TokenMap):
        self.ep, self.tokens = ep, tokens
        self.probe_sample: tuple[list[int], int, Scored] | None = None

    def probe(self, ask: Ask) -> str:
        ids = self.tokens.tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
        answer, k = ask(self.path, lambda k: score_request(self.ep.model, ids, k))
        try:
            tokens, values, top = completion_logprobs(answer)
            if any(t is not None for t in top[:1]) or len(tokens) < len(ids):
                raise ProtocolError("the answer does not echo the prompt with logprobs (echo: true)")
            kind = self.tokens.detect(tokens[:len(ids)], ids)
            self.tokens.top(top[1:len(ids)], k)  # every top token maps to a student id
            check_alignment(tokens[:len(ids)], values[:len(ids)], top[:len(ids)])
            self.probe_sample = (ids, 0, self.read(answer, {"input_ids": ids}, k))
        except ProtocolError as exc:
            raise RemoteTeacherError(f"{self.ep.url} ({self.ep.model}) cannot score text for distillation: {exc}"
                                     ) from None
        return f"scores text (echo + logprobs, top {k}), tokens as {kind}"

    def body(self, row: dict[str, Any], k: int) -> dict[str, Any]:
        return score_request(self.ep.model, list(row["input_ids"]), k)

    def cache_request(self, row: dict[str, Any], k: int) -> dict[str, Any]:
        return {"mode": "score", "prompt": list(row["input_ids"]), "k": k}

    def read(self, answer: dict[str, Any], row: dict[str, Any], k: int) -> Scored:
        ids = list(row["input_ids"])
        tokens, _, top = completion_logprobs(answer)
        if len(tokens) < len(ids) or not all(self.tokens.matches(t, i) for t, i in zip(tokens, ids)):
            raise ProtocolError("the echoed tokens are not the ones sent")
        top_ids, top_lps = self.tokens.top(top[1:len(ids)], k)
        return Scored(np.asarray(ids, dtype=np.int32), top_ids, top_lps)

    def assemble(self, batch: dict[str, Any], rows: list[dict[str, Any]], answers: list[Scored]
                 ) -> dict[str, Any]:
        """The batch as it is; row r, position t <- the teacher's distribution of token t + 1."""
        labels = batch["labels"]
        k = min(a.k for a in answers)
        top_ids = torch.zeros((*labels.shape, k), dtype=torch.long)
        top_lps = torch.zeros((*labels.shape, k), dtype=torch.float32)
        sent = batch["inputs"]["input_ids"].tolist()  # one copy from the device for the whole batch
        for r, answer in enumerate(answers):
            n = len(answer.top_ids)  # positions 0 .. n-1 (a row's last token predicts nothing here)
            if sent[r][:n + 1] != answer.ids.tolist():
                # The rows the sampler announced are not the loader's: training on them would pair a
                # row with another row's teacher. Never expected; stop rather than learn from noise.
                raise KDError(f"remote teacher: row {r} of a batch is not the row its answer was asked for "
                              "(the loader and its sampler disagree); please report this with the config")
            top_ids[r, :n] = torch.from_numpy(answer.top_ids[:, :k].astype(np.int64))
            top_lps[r, :n] = torch.from_numpy(answer.top_logprobs[:, :k])
        return {**batch, "soft_targets": TopK(top_ids.to(labels.device), top_lps.to(labels.device))}


class Generate:
    name = "generate"

    def __init__(self, ep: EndpointConfig, tokens: TokenMap):
        self.ep, self.tokens = ep, tokens
        self.probe_sample: tuple[list[int], int, Scored] | None = None
        self.chat = ep.api == "chat"
        self.path = "/chat/completions" if self.chat else "/completions"
        self.as_ids = True  # ask for token ids (vLLM); the probe turns it off for servers that refuse it
        tokenizer = tokens.tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.vocab = len(tokenizer)

    def probe(self, ask: Ask) -> str:
        tokenizer = self.tokens.tokenizer
        if self.chat:
            messages = [{"role": "user", "content": PROBE_QUESTION}]
            row = {"input_ids": chat_prompt_ids(tokenizer, messages), "messages_json": json.dumps(messages)}
        else:
            row = {"input_ids": tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]}
        def short(k: int) -> dict[str, Any]:
            return {**self.body(row, k), "max_tokens": min(PROBE_TOKENS, self.ep.max_new_tokens)}

        try:
            answer, k = ask(self.path, short)
        except RemoteTeacherError as exc:
            if "return_tokens_as_token_ids" not in str(exc):
                raise
            self.as_ids = False  # e.g. OpenAI: "Unrecognized request argument"; token strings then
            answer, k = ask(self.path, short)
        try:
            tokens, _, top = self._lists(answer)
            text, _ = answer_text(answer, self.chat)
            if not tokens:
                raise ProtocolError("the answer has no tokens")
            kind = self.tokens.detect_text(tokens, text, top)
            scored = self.read(answer, row, k)
            prompt = list(row["input_ids"])
            self.probe_sample = (prompt + scored.ids.tolist(), len(prompt) - 1, scored)
        except ProtocolError as exc:
            raise RemoteTeacherError(f"{self.ep.url} ({self.ep.model}) cannot answer with logprobs for "
                                     f"distillation: {exc}") from None
        described = f"answers prompts on {self.path} with logprobs (top {k}), tokens as {kind}"
        prompt_tokens = (answer.get("usage") or {}).get("prompt_tokens")
        if isinstance(prompt_tokens, int) and prompt_tokens != len(row["input_ids"]):
            described += (f"; note: the server counts {prompt_tokens} prompt tokens where the student has "
                          f"{len(row['input_ids'])} (another chat template or system prompt on the server?)")
        return described

    def _lists(self, answer: dict[str, Any]):
        return chat_logprobs(answer) if self.chat else completion_logprobs(answer)

    def body(self, row: dict[str, Any], k: int) -> dict[str, Any]:
        ep = self.ep
        if self.chat:
            return chat_request(ep.model, json.loads(row["messages_json"]), k=k, max_tokens=ep.max_new_tokens,
                                temperature=ep.temperature,
                                as_ids=self.as_ids)
        return completion_request(ep.model, list(row["input_ids"]), k=k, max_tokens=ep.max_new_tokens,
                                  temperature=ep.temperature, as_ids=self.as_ids)

    def cache_request(self, row: dict[str, Any], k: int) -> dict[str, Any]:
        prompt = json.loads(row["messages_json"]) if self.chat else list(row["input_ids"])
        return {"mode": "generate", "api": self.ep.api, "prompt": prompt, "k": k,
                "temperature": self.ep.temperature, "max_tokens": self.ep.max_new_tokens}

    def read(self, answer: dict[str, Any], row: dict[str, Any], k: int) -> Scored:
        tokens, _, top = self._lists(answer)
        text, finish = answer_text(answer, self.chat)
        ids = self.tokens.answer_ids(tokens, text)
        stopped = finish == "stop" or bool(ids and ids[-1] == self.eos)
        if not ids and not stopped:
            raise ProtocolError("an empty answer that did not stop")
        none = (np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
        top_ids, top_lps = self.tokens.top(top, k) if ids else none
        return Scored(np.asarray(ids, dtype=np.int32), top_ids, top_lps, stopped=stopped)

    def assemble(self, batch: dict[str, Any], rows: list[dict[str, Any]], answers: list[Scored]
                 ) -> dict[str, Any]:
        """The rows prompt + answer (+ end token), right-padded: position p - 1 + j (p prompt
        tokens) predicts answer token j and learns from the teacher's distribution of it.

        An answer that stopped ends with the end token. vLLM lists that token with its distribution;
        servers that leave it out (OpenAI's) give none, so there the end token is appended and its
        position learns the teacher's choice as a one-hot target."""
        device = batch["labels"].device
        seqs, spans, appended = [], [], []
        for row, answer in zip(rows, answers):
            prompt, written = list(row["input_ids"]), answer.ids.tolist()
            append = bool(answer.stopped) and written[-1:] != [self.eos]
            seqs.append(prompt + written + ([self.eos] if append else []))
            spans.append((len(prompt), len(written)))
            appended.append(append)
        k = min((a.k for a in answers if len(a.ids)), default=1)  # an empty answer (only the end) has no k
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        top_ids = torch.zeros((len(seqs), longest, k), dtype=torch.long)
        top_lps = torch.zeros((len(seqs), longest, k), dtype=torch.float32)
        for r, (seq, (p, n), answer, append) in enumerate(zip(seqs, spans, answers, appended)):
            ids[r, :len(seq)] = torch.tensor(seq)
            attention[r, :len(seq)] = 1
            learnt = len(seq) - p  # the answer's tokens and the end token
            labels[r, p - 1:p - 1 + learnt] = ids[r, p:p + learnt]
            top_ids[r, p - 1:p - 1 + n] = torch.from_numpy(answer.top_ids[:, :k].astype(np.int64))
            top_lps[r, p - 1:p - 1 + n] = torch.from_numpy(answer.top_logprobs[:, :k])
            if append:
                top_ids[r, p - 1 + n] = self._one_hot_ids(k)
                top_lps[r, p - 1 + n] = torch.tensor([0.0] + [-1e4] * (k - 1))
        out = {**batch, "inputs": {"input_ids": ids.to(device), "attention_mask": attention.to(device)},
               "labels": labels.to(device), "soft_targets": TopK(top_ids.to(device), top_lps.to(device))}
        return out

    def _one_hot_ids(self, k: int) -> torch.Tensor:
        """The end token first, then k - 1 other distinct ids that carry no mass (exp(-1e4) = 0)."""
        others = [(self.eos + j) % self.vocab for j in range(1, k)]
        return torch.tensor([self.eos] + others, dtype=torch.long)


def make_mode(ep: EndpointConfig, tokens: TokenMap) -> Score | Generate:
    return Generate(ep, tokens) if ep.mode == "generate" else Score(ep, tokens)
