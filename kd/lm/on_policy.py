"""On-policy distillation (distillation.on_policy): the student learns from the teacher on its own samples.

Token-level KD on fixed text trains the student on sequences it would not write itself; when it
generates, it drifts into states the teacher never labelled (exposure bias). GKD (Agarwal et al.
2024) mixes in batches the student writes: with probability `share` (GKD's lambda) a training
micro-batch is cut to its prompts, the student samples a continuation of each (no gradient, KV
cache on), the teacher scores exactly those tokens, and the loss is the divergence (reverse KL by
default) over the generated positions alone. There is no CE term on them: the student's own tokens
are no target. Off-policy micro-batches keep the usual loss.

Prompts: a row's tokens before its last learnt span (the completion of prompt/completion data, the
last assistant turn of a chat). A plain-text row is learnt from its first token, so its first
`prompt_tokens` tokens are the prompt. Prompts are cut from the left so that prompt + sample fit
in data.max_length: an on-policy row is never longer than an off-policy one, and the memory plan
(kd/lm/planner.py `generation_bytes`: the KV cache of sampling) holds for both.

Determinism: whether a micro-batch is on-policy depends on (run.seed, epoch, micro-batch index),
the same on every process; the sampling on (run.seed, epoch, micro-batch index, process). A resumed
run therefore draws exactly what the original drew, and two processes sample different text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from kd.config import OnPolicyConfig
from kd.lm.losses import IGNORE


def prompt_ids(batch: dict[str, Any], prompt_tokens: int, room: int) -> list[list[int]]:
    """Each row's prompt (see the module doc), at most `room` tokens (its end kept)."""
    ids = batch["inputs"]["input_ids"].tolist()
    lengths = batch["inputs"]["attention_mask"].sum(-1).tolist()
    learnt = (batch["labels"] != IGNORE).tolist()  # learnt[t]: token t + 1 is learnt
    out = []
    for row, n, mask in zip(ids, lengths, learnt):
        starts = [t for t in range(n) if mask[t] and (t == 0 or not mask[t - 1])]
        start = starts[-1] if starts else n - 1
        # A span learnt from its first token has no prompt of its own: take its first tokens.
        cut = start + 1 if start > 0 else min(prompt_tokens, max(1, n - 1))
        out.append(row[:cut][-room:])
    return out


@dataclass
class Sampled:
    """A micro-batch the student wrote: prompt + sample rows, the sample's positions learnt."""

    batch: dict[str, Any]
    generated: int  # sampled tokens, the end token included
    seconds: float


class OnPolicy:
    """Chooses the on-policy micro-batches and samples them (see the module doc)."""

    def __init__(self, cfg: OnPolicyConfig, *, max_length: int, seed: int, rank: int, pad_id: int, eos_id: int):
        self.cfg, self.seed, self.rank = cfg, seed, rank
        self.pad_id, self.eos_id = pad_id, eos_id
        self.room = max_length - cfg.max_new_tokens  # the longest prompt
        if self.room < 1:  # kd/config.py refuses such a config; a direct caller gets the same rule
            raise ValueError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in {max_length} tokens")
        greedy = cfg.temperature == 0
        # Plain sampling at the configured temperature: a model's own generation_config (top-k, top-p,
        # repetition penalties) would change the distribution the student learns on.
        self.generation = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else cfg.temperature, top_k=None if greedy else 0,
            top_p=None if greedy else 1.0, max_new_tokens=cfg.max_new_tokens, min_new_tokens=0, use_cache=True,
            pad_token_id=pad_id, eos_token_id=eos_id)

    def chosen(self, epoch: int, index: int) -> bool:
        """Whether micro-batch `index` of `epoch` is on-policy: the same answer on every process."""
        share = self.cfg.share
        if share <= 0.0 or share >= 1.0:
            return share >= 1.0
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch, index, 0))
        return bool(torch.rand((), generator=generator) < share)

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, batch: dict[str, Any], epoch: int, index: int) -> Sampled:
        """The batch rebuilt from the student's own continuation of each row's prompt (under the
        caller's autocast)."""
        started = time.perf_counter()
        device = batch["labels"].device
        prompts = prompt_ids(batch, self.cfg.prompt_tokens, self.room)
        longest = max(len(p) for p in prompts)
        # Left-padded, so every row's next token is sampled at the same position.
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, longest - len(p):] = torch.tensor(p)
            attention[r, longest - len(p):] = 1
        was_training = model.training
        model.eval()  # no dropout while sampling; the KV cache is on
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(_mix(self.seed, epoch, index, 1 + self.rank))
                out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                     generation_config=self.generation)
        finally:
            model.train(was_training)
        samples = [self._until_end(row) for row in out[:, longest:].tolist()]
        rebuilt = self._rows(prompts, samples, device)
        return Sampled(rebuilt, sum(len(s) for s in samples), time.perf_counter() - started)

    def _until_end(self, tokens: list[int]) -> list[int]:
        """A sample up to and including its end token (what follows is padding)."""
        return tokens[:tokens.index(self.eos_id) + 1] if self.eos_id in tokens else tokens

    def _rows(self, prompts: list[list[int]], samples: list[list[int]], device: torch.device) -> dict[str, Any]:
        """Right-padded rows prompt + sample; position p - 1 + j (p prompt tokens) learns sample token j."""
        seqs = [p + s for p, s in zip(prompts, samples)]
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for r, (seq, p, s) in enumerate(zip(seqs, prompts, samples)):
            ids[r, :len(seq)] = torch.tensor(seq)
            attention[r, :len(seq)] = 1
            labels[r, len(p) - 1:len(seq) - 1] = ids[r, len(p):len(seq)]
        return {"inputs": {"input_ids": ids.to(device), "attention_mask": attention.to(device)},
                "labels": labels.to(device), "on_policy": True}


def _mix(*values: int) -> int:
    """A 63-bit seed from a few integers (stable across runs and processes, unlike hash())."""
    seed = 0x9E3779B97F4A7C15
    for v in values:
        seed = ((seed ^ (int(v) + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return seed >> 1

