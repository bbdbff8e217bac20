"""Token-level LM distillation losses: properties against direct computations (kd/lm/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from kd.lm.losses import TopK, divergence, token_kd_loss

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)]


def direct(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float, temperature: float) -> torch.Tensor:
    """The definitions written out with probabilities, in float64, row by row."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl":
        d = kl(p, q)
    elif kind == "reverse_kl":
        d = kl(q, p)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * kl(p, m) + (1 - beta) * kl(q, m)
    return d * temperature**2


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_equals_a_direct_computation_and_is_zero_for_identical_logits(kind, beta, temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11) * 2, torch.randn(2, 5, 11) * 2
    mask = torch.ones(2, 5, dtype=torch.bool)
    total, count = token_kd_loss(student, teacher, mask, kind=kind, beta=beta, temperature=temperature, chunk_size=3)
    assert int(count) == 10
    assert float(total) == pytest.approx(float(direct(student, teacher, kind, beta, temperature).sum()), rel=1e-4)
    same, _ = token_kd_loss(teacher, teacher, mask, kind=kind, beta=beta, temperature=temperature)
    assert abs(float(same)) < 1e-5


def test_jsd_endpoints_are_the_two_kls():
    torch.manual_seed(1)
    log_p, log_q = torch.randn(4, 9).log_softmax(-1), torch.randn(4, 9).log_softmax(-1)
    assert torch.allclose(divergence(log_p, log_q, "jsd", 0.0), divergence(log_p, log_q, "forward_kl"))
    assert torch.allclose(divergence(log_p, log_q, "jsd", 1.0), divergence(log_p, log_q, "reverse_kl"))
    assert (divergence(log_p, log_q, "jsd", 0.5) <= math.log(2) + 1e-6).all()  # JSD is bounded by log 2


@pytest.mark.parametrize("kind,beta", KINDS)
def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_loss(kind, beta):
    torch.manual_seed(2)
    student, teacher = torch.randn(3, 4, 13), torch.randn(3, 4, 13) * 3
    mask = torch.rand(3, 4) > 0.3
    full, _ = token_kd_loss(student, teacher, mask, kind=kind, beta=beta, temperature=1.0)
    logp = teacher.log_softmax(-1)
    values, indices = logp.topk(13, dim=-1)
    top, _ = token_kd_loss(student, TopK(indices, values), mask, kind=kind, beta=beta, temperature=1.0)
    assert float(top) == pytest.approx(float(full), rel=1e-4, abs=1e-5)


def test_top_k_tail_bucket_makes_a_proper_distribution():
    """k < V: the loss equals the divergence over the k tokens plus one tail bucket, computed by hand."""
    torch.manual_seed(3)
    student, teacher = torch.randn(1, 1, 50), torch.randn(1, 1, 50) * 4
    values, indices = teacher.log_softmax(-1).topk(5, dim=-1)
    loss, _ = token_kd_loss(student, TopK(indices, values), torch.ones(1, 1, dtype=torch.bool), kind="forward_kl")
    p_top, q = values.exp()[0, 0].double(), student.softmax(-1)[0, 0].double()
    q_top = q[indices[0, 0]]
    p = torch.cat([p_top, 1 - p_top.sum(0, keepdim=True)])
    qq = torch.cat([q_top, 1 - q_top.sum(0, keepdim=True)])
    assert float(loss) == pytest.approx(float((p * (p.log() - qq.log())).sum()), rel=1e-4)


def test_masked_positions_contribute_nothing_and_a_fully_masked_batch_is_finite():
    torch.manual_seed(4)
    student = torch.randn(2, 6, 7, requires_grad=True)
    teacher = torch.randn(2, 6, 7)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :3] = True
    total, count = token_kd_loss(student, teacher, mask, kind="jsd", beta=0.5)
    changed = teacher.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10  # anything at masked positions
    assert float(token_kd_loss(student, changed, mask, kind="jsd",
                               beta=0.5)[0].detach()) == pytest.approx(float(total.detach()))
    total.backward()
    assert student.grad[~mask].abs().max() == 0 and student.grad[mask].abs().max() > 0
    student.grad = None
    none, zero = token_kd_loss(student, teacher, torch.zeros(2, 6, dtype=torch.bool), kind="reverse_kl")
    none.backward()
    assert int(zero) == 0 and float(none.detach()) == 0.0 and torch.isfinite(student.grad).all()


def test_chunking_keeps_only_the_inputs_for_backward():
    """Bytes autograd keeps for backward, with bf16 logits and the JSD: chunked, the selected bf16
    rows of student and teacher; the same loss written plainly keeps fp32 log-probabilities (and the
    mixture's) of every position."""
    torch.manual_seed(5)
    positions, vocab = 256, 2048
    student = torch.randn(1, positions, vocab, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(1, positions, vocab, dtype=torch.bfloat16)
    mask = torch.ones(1, positions, dtype=torch.bool)

    def saved_bytes(chunk: int) -> tuple[int, torch.Tensor]:  # storage bytes autograd keeps
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = token_kd_loss(student, teacher, mask, kind="jsd", chunk_size=chunk)
        return sum(seen.values()), loss

    chunked, a = saved_bytes(32)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the same loss written plainly
        from kd.lm.losses import _bucket_log_probs

        b = divergence(*_bucket_log_probs(student[mask], teacher[mask], 1.0), "jsd").sum()
    plain = sum(seen.values())
    inputs = 2 * positions * vocab * 2  # the selected bf16 student rows and the teacher's
    assert chunked <= 1.1 * inputs and plain > 3 * inputs
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5)
    a.backward()
    assert torch.isfinite(student.grad).all()
