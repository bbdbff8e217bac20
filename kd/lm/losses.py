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

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> "TopK":
        """The k most likely tokens of full logits (..., V), with their log-probabilities."""
        logprobs, indices = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return cls(indices, logprobs)


def _flat_parts(teacher: torch.Tensor | TopK | None) -> tuple[torch.Tensor, ...]:
    """The teacher as 2-D (positions, ...) tensors: (logits,), (indices, logprobs), or () for none."""
    if isinstance(teacher, TopK):
        return (teacher.indices.reshape(-1, teacher.indices.shape[-1]),
                teacher.logprobs.reshape(-1, teacher.logprobs.shape[-1]))
    return (teacher.reshape(-1, teacher.shape[-1]),) if teacher is not None else ()


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


IGNORE = -100  # label of a position that is not learnt (padding, prompt), as in transformers


def token_kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, mask: torch.Tensor,
                  *, kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of T^2 * divergence over the positions where `mask` is true, their number).

    `student_logits` (batch, seq, V) and the teacher are aligned position by position (shift them
    before calling). Masked-out positions (padding, prompt) are never computed; with no position
    left the sum is a zero that still reaches the student's graph (no NaN, no missing gradient).
    """
    _, kd_sum, count = token_loss_sums(student_logits, teacher, None, mask, kind=kind, beta=beta,
                                       temperature=temperature, chunk_size=chunk_size)
    return kd_sum, count


def token_loss_sums(student_logits: torch.Tensor, teacher: torch.Tensor | TopK | None, labels: torch.Tensor | None,
                    mask: torch.Tensor, *, kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                    chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE sum, T^2-scaled divergence sum, positions) over the positions where `mask` is true.

    Chunks of `chunk_size` positions are gathered from the logits one at a time (a (chunk, V) copy,
    never one of the whole batch) and each chunk runs under activation checkpointing when the
    student needs gradients. `labels` None: no CE (zero); `teacher` None: no divergence (zero).
    """
    vocab = student_logits.shape[-1]
    flat = student_logits.reshape(-1, vocab)
    positions = mask.reshape(-1).nonzero().squeeze(-1)
    count = mask.sum()
    zero = flat.sum() * 0.0  # keeps the result in the student's graph even with nothing to learn
    if positions.numel() == 0:
        return zero.float(), zero.float(), count
    flat_labels = labels.reshape(-1) if labels is not None else None
    t_flat = _flat_parts(teacher)

    def chunk_sums(s_chunk: torch.Tensor, label_chunk: torch.Tensor | None, *t_parts: torch.Tensor) -> torch.Tensor:
        ce = s_chunk.new_zeros((), dtype=torch.float32)
        kd = s_chunk.new_zeros((), dtype=torch.float32)
        if label_chunk is not None:
            ce = F.cross_entropy(s_chunk.float(), label_chunk, reduction="sum")
        if t_parts:
            moved = [part.to(s_chunk.device) for part in t_parts]  # the teacher may run on another device
            t_chunk = TopK(*moved) if len(moved) == 2 else moved[0]
            log_p, log_q = _bucket_log_probs(s_chunk, t_chunk, temperature)
            kd = divergence(log_p, log_q, kind, beta).sum()
        return torch.stack([ce, kd])

    total = zero.float().expand(2)
    for start in range(0, positions.numel(), chunk_size):
        rows = positions[start:start + chunk_size]
        s_chunk = flat.index_select(0, rows)
        label_chunk = flat_labels.index_select(0, rows) if flat_labels is not None else None
        t_chunk = tuple(part.index_select(0, rows.to(part.device)) for part in t_flat)
        if s_chunk.requires_grad:  # recomputed in backward: only the chunk's inputs are kept alive
            sums = checkpoint(chunk_sums, s_chunk, label_chunk, *t_chunk, use_reentrant=False)
        else:
            sums = chunk_sums(s_chunk, label_chunk, *t_chunk)
        total = total + sums
    return total[0], total[1] * temperature**2, count


def token_distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor | TopK | None, labels: torch.Tensor,
                            *, alpha: float, kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                            chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, parts) for next-token training: per learnt token, (1 - alpha) * CE + alpha * divergence.

    `labels` (batch, seq) hold the next token at each position, IGNORE where nothing is learnt.
    Parts are per-token means of total, ce and kd (kd is zero without a teacher, and then the loss is CE)."""
    mask = labels != IGNORE
    ce_sum, kd_sum, count = token_loss_sums(student_logits, teacher, labels.clamp_min(0), mask, kind=kind, beta=beta,
                                            temperature=temperature, chunk_size=chunk_size)
    denom = count.clamp_min(1).float()
    ce, kd = ce_sum / denom, kd_sum / denom
    total = ce if teacher is None else (1.0 - alpha) * ce + alpha * kd
    return total, {"total": total, "ce": ce, "kd": kd}


@torch.no_grad()
def token_eval_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor | TopK | None, labels: torch.Tensor,
                    *, kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                    chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Per-row sums for evaluation over the learnt positions, each (batch,): student and teacher
    negative log-likelihood, student and teacher top-1 correct, student/teacher top-1 agreement,
    the T^2-scaled divergence, and the number of positions. Per row, so multi-process evaluation
    can gather rows and drop the duplicates of uneven shards.

    A top-k teacher's probability of a token outside its k is its tail mass spread evenly over the
    other V - k tokens (its perplexity is then an estimate; its top-1 is exact)."""
    batch, seq, vocab = student_logits.shape
    flat, flat_labels = student_logits.reshape(-1, vocab), labels.reshape(-1)
    positions = (flat_labels != IGNORE).nonzero().squeeze(-1)
    t_flat = _flat_parts(teacher_logits)
    names = ("nll", "correct", "teacher_nll", "teacher_correct", "agree", "kd")
    sums = {name: torch.zeros(batch, device=flat.device) for name in names}
    for start in range(0, positions.numel(), chunk_size):
        rows = positions[start:start + chunk_size]
        owner = rows // seq
        s, y = flat.index_select(0, rows).float(), flat_labels.index_select(0, rows)
        s_top = s.argmax(-1)
        sums["nll"].index_add_(0, owner, F.cross_entropy(s, y, reduction="none"))
        sums["correct"].index_add_(0, owner, (s_top == y).float())
        if t_flat:
            parts = [part.index_select(0, rows.to(part.device)).to(s.device) for part in t_flat]
            if len(parts) == 2:
                t = TopK(parts[0].long(), parts[1].float())
                t_top = t.indices.gather(-1, t.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
                tail = _log1mexp(torch.logsumexp(t.logprobs, -1)) - math.log(max(1, vocab - t.indices.shape[-1]))
                hit = t.indices == y.unsqueeze(-1)
                t_logp_y = torch.where(hit.any(-1), (t.logprobs * hit).sum(-1), tail)
                sums["teacher_nll"].index_add_(0, owner, -t_logp_y)
            else:
                t = parts[0].float()
                t_top = t.argmax(-1)
                sums["teacher_nll"].index_add_(0, owner, F.cross_entropy(t, y, reduction="none"))
            sums["teacher_correct"].index_add_(0, owner, (t_top == y).float())
            sums["agree"].index_add_(0, owner, (t_top == s_top).float())
            log_p, log_q = _bucket_log_probs(s, t, temperature)
            sums["kd"].index_add_(0, owner, divergence(log_p, log_q, kind, beta) * temperature**2)
    sums["count"] = (labels != IGNORE).sum(-1).float()
    return sums
