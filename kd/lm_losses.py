"""Token-level distillation losses for causal language models: pure functions, chunked over positions.

Per position t the student's next-token distribution Q_t is pulled towards the teacher's P_t:

- forward KL   KL(P || Q)            mass-covering (the classic Hinton loss)
- reverse KL   KL(Q || P)            mode-seeking
- generalised JSD with beta in [0, 1] (TRL GKD's definition, Agarwal et al. 2024):
      M = beta * P + (1 - beta) * Q,   JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)
  beta = 0 is forward KL and beta = 1 reverse KL (the endpoints are computed as those KLs).

Both distributions are taken at temperature T and the result is scaled by T^2, as for classifiers.
The teacher is either full logits (batch, seq, vocab) or its top k as `TopK` (indices and
log-probabilities): then both distributions are compared over k + 1 buckets, the k tokens and one
tail holding the rest of the mass, so a cached or remote teacher's top k is still a proper
distribution (with k = vocab this is exactly the full loss). With top-k, T applies to the k
log-probabilities and the tail bucket as to k + 1 classes (exact at T = 1).

Memory: logits are the big tensor of LM distillation (49k vocab x 2k tokens x 4 B = 400 MB per
sequence in fp32). The loss is computed over `chunk_size` positions at a time, each chunk under
activation checkpointing, so backward keeps only the inputs, never fp32 probabilities of the
whole batch; only positions where `mask` is true are computed at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class TopK:
    """A teacher's top-k next-token log-probabilities: `indices` and `logprobs`, (batch, seq, k)."""

    indices: torch.Tensor
    logprobs: torch.Tensor

    def select(self, mask: torch.Tensor) -> "TopK":
        return TopK(self.indices[mask], self.logprobs[mask])


def _log1mexp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_x)) for log_x <= 0, stable at both ends, finite (at worst the smallest float)."""
    x = log_x.clamp(max=0.0)
    out = torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return out.clamp_min(math.log(torch.finfo(torch.float32).tiny))


def _bucket_log_probs(student: torch.Tensor, teacher: torch.Tensor | TopK, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P, log Q) over the same support, (positions, V) or (positions, k + 1), at temperature T."""
    s = student.float()
    if not isinstance(teacher, TopK):
        return F.log_softmax(teacher.float() / temperature, -1), F.log_softmax(s / temperature, -1)
    # Bucket the student at T = 1 onto the teacher's k tokens + tail, then temper both bucket sets.
    log_q_all = F.log_softmax(s, -1)
    log_q_top = log_q_all.gather(-1, teacher.indices.long())
    log_q_tail = _log1mexp(torch.logsumexp(log_q_top, -1, keepdim=True))
    log_p_top = teacher.logprobs.float()
    log_p_tail = _log1mexp(torch.logsumexp(log_p_top, -1, keepdim=True))
    log_p = torch.cat([log_p_top, log_p_tail], -1)
    log_q = torch.cat([log_q_top, log_q_tail], -1)
    if temperature != 1.0:
        log_p, log_q = F.log_softmax(log_p / temperature, -1), F.log_softmax(log_q / temperature, -1)
    return log_p, log_q


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) per row from log-probabilities (0 * log 0 counts as 0)."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher P and student Q given as log-probabilities."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def token_kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, mask: torch.Tensor,
                  kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of T^2 * divergence over the positions where `mask` is true, their number).

    `student_logits` (batch, seq, V) and the teacher are aligned position by position (shift them
    before calling). Masked-out positions (padding, prompt) are never computed; with no position
    left the sum is a zero that still reaches the student's graph (no NaN, no missing gradient).
    """
    mask = mask.bool()
    count = mask.sum()
    if not bool(mask.any()):
        return student_logits.sum() * 0.0, count
    s = student_logits[mask]
    t = teacher.select(mask) if isinstance(teacher, TopK) else teacher[mask]

    def chunk_loss(s_chunk: torch.Tensor, *t_parts: torch.Tensor) -> torch.Tensor:
        t_chunk = TopK(*t_parts) if isinstance(teacher, TopK) else t_parts[0]
        log_p, log_q = _bucket_log_probs(s_chunk, t_chunk, temperature)
        return divergence(log_p, log_q, kind, beta).sum()

    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk_size):
        end = start + chunk_size
        parts = (t.indices[start:end], t.logprobs[start:end]) if isinstance(t, TopK) else (t[start:end],)
        if s.requires_grad:  # recomputed in backward: only the chunk's inputs are kept alive
            total = total + checkpoint(chunk_loss, s[start:end], *parts, use_reentrant=False)
        else:
            total = total + chunk_loss(s[start:end], *parts)
    return total * temperature**2, count
