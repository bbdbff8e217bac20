"""The distillation loss by its properties, the alpha schedules, and non-finite detection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.config import DistillationConfig
from kd.errors import TrainingError
from kd.losses import alpha_at, distillation_loss, kd_divergence, raise_if_not_finite


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    return student, teacher, torch.randint(0, 5, (6,), generator=g)


def test_kl_is_zero_for_identical_logits(logits):
    s, _, _ = logits
    assert torch.allclose(kd_divergence(s, s.clone(), 3.0), torch.zeros(6), atol=1e-6)


def test_kl_equals_torch_kl_div_times_t_squared(logits):
    s, t, _ = logits
    for temperature in (1.0, 2.0, 5.0):
        expected = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                            reduction="batchmean") * temperature**2
        assert torch.allclose(kd_divergence(s, t, temperature).mean(), expected, atol=1e-5)


def test_kl_is_positive_for_different_logits(logits):
    s, t, _ = logits
    assert (kd_divergence(s, t, 2.0) > 0).all()


def test_t_squared_keeps_gradient_scale_comparable():
    """With the T^2 factor, soft-target gradients at high T approach (s - t) / N, independent of T."""
    s = torch.tensor([[0.5, -0.2, 0.1]], requires_grad=True)
    t = torch.tensor([[0.3, 0.0, -0.4]])
    grads = []
    for temperature in (10.0, 100.0):
        (g,) = torch.autograd.grad(kd_divergence(s, t, temperature).sum(), s)
        grads.append(g)
    centred = (s - t) - (s - t).mean()
    assert torch.allclose(grads[1], centred.detach() / 3, atol=1e-3)
    assert torch.allclose(grads[0], grads[1], rtol=0.05, atol=1e-3)


def test_alpha_limits(logits):
    s, t, y = logits
    ce = F.cross_entropy(s, y)
    kd = kd_divergence(s, t, 4.0).mean()
    loss0, parts0 = distillation_loss(s, t, y, alpha=0.0, temperature=4.0)
    loss1, _ = distillation_loss(s, t, y, alpha=1.0, temperature=4.0)
    loss_mid, _ = distillation_loss(s, t, y, alpha=0.3, temperature=4.0)
    assert torch.allclose(loss0, ce, atol=1e-6)
    assert torch.allclose(loss1, kd, atol=1e-6)
    assert torch.allclose(loss_mid, 0.7 * ce + 0.3 * kd, atol=1e-6)
    assert torch.allclose(parts0["ce"], ce) and torch.allclose(parts0["kd"], kd)


def test_no_teacher_is_plain_cross_entropy(logits):
    s, _, y = logits
    loss, parts = distillation_loss(s, None, y, alpha=0.9, temperature=4.0)
    assert torch.allclose(loss, F.cross_entropy(s, y)) and parts["kd"].item() == 0.0


def test_sample_weights_give_a_weighted_mean(logits):
    s, t, y = logits
    w = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 0.0])
    loss, _ = distillation_loss(s, t, y, alpha=0.5, temperature=2.0, sample_weight=w)
    keep = w > 0
    per = 0.5 * F.cross_entropy(s, y, reduction="none") + 0.5 * kd_divergence(s, t, 2.0)
    assert torch.allclose(loss, (per[keep] * w[keep]).sum() / w.sum(), atol=1e-6)
    unweighted, _ = distillation_loss(s, t, y, alpha=0.5, temperature=2.0, sample_weight=torch.ones(6))
    assert torch.allclose(unweighted, per.mean(), atol=1e-6)


def test_single_sample_batch_works():
    s, t, y = torch.randn(1, 4, requires_grad=True), torch.randn(1, 4), torch.tensor([2])
    loss, _ = distillation_loss(s, t, y, alpha=0.5, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and s.grad is not None


def test_empty_batch_is_a_clear_error():
    with pytest.raises(TrainingError, match="empty batch"):
        distillation_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), alpha=0.5,
                          temperature=2.0)


def test_label_space_mismatch_in_logits_is_a_clear_error():
    with pytest.raises(TrainingError, match="same label space"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), alpha=0.5,
                          temperature=2.0)


def test_half_precision_logits_are_handled_in_float32():
    s = torch.tensor([[60000.0, -60000.0]], dtype=torch.float16)
    t = torch.tensor([[-60000.0, 60000.0]], dtype=torch.float16)
    loss, parts = distillation_loss(s, t, torch.tensor([0]), alpha=0.5, temperature=1.0)
    assert all(math.isfinite(v.item()) for v in parts.values())


@pytest.mark.parametrize(
    ("schedule", "expect"),
    [
        ("constant", [0.5, 0.5, 0.5]),
        ("linear", [0.9, 0.5, 0.1]),
        ("cosine", [0.9, 0.5, 0.1]),
        ("step", [0.9, 0.1, 0.1]),
    ],
)
def test_alpha_schedules_go_from_start_to_end(schedule, expect):
    cfg = DistillationConfig(alpha=0.5, alpha_schedule=schedule, alpha_start=0.9, alpha_end=0.1, alpha_step_at=0.5)
    got = [alpha_at(cfg, p) for p in (0.0, 0.5, 1.0)]
    assert got == pytest.approx(expect)


def test_cosine_is_smooth_and_monotone():
    cfg = DistillationConfig(alpha_schedule="cosine", alpha_start=1.0, alpha_end=0.0)
    values = [alpha_at(cfg, i / 20) for i in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[5] > 0.5 + 1e-3  # cosine stays high early, unlike linear


def test_schedule_defaults_to_alpha_when_start_end_unset():
    cfg = DistillationConfig(alpha=0.3, alpha_schedule="linear")
    assert alpha_at(cfg, 0.0) == alpha_at(cfg, 1.0) == pytest.approx(0.3)


def test_non_finite_loss_names_the_component():
    raise_if_not_finite({"total": 1.0, "ce": 0.5, "kd": 0.2}, step=3)
    with pytest.raises(TrainingError) as info:
        raise_if_not_finite({"total": float("nan"), "ce": 0.5, "kd": float("inf")}, step=7,
                            hints={"kd": "teacher logits not finite"})
    text = str(info.value)
    assert "step 7" in text and "total=nan" in text and "kd=inf" in text and "ce=" not in text
    assert "teacher logits not finite" in text
