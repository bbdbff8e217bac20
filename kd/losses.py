"""Distillation loss and alpha schedules: pure functions, no state, no device logic.

loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 factor (Hinton et al., 2015) keeps the soft-target gradients on the same scale as the hard
ones when T changes, so alpha means the same thing at every temperature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd.config import DistillationConfig
from kd.errors import TrainingError

LOSS_PARTS = ("total", "ce", "kd")


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample T^2 * KL(softmax(teacher/T) || softmax(student/T)), computed in float32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # log_target=True stays finite where the teacher puts (numerically) zero mass on a class.
    return F.kl_div(s, t, reduction="none", log_target=True).sum(-1) * temperature**2


def per_sample_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *, alpha: float,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Per-sample total, ce and kd; `teacher_logits=None` is plain supervised training (kd is zero).

    `labels` are class indices (batch,) or class probabilities (batch, classes), e.g. mixed by mixup.
    """
    if student_logits.shape[0] == 0:
        raise TrainingError("empty batch: the data loader produced a batch with no samples")
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
    if teacher_logits is None:
        return {"total": ce, "ce": ce, "kd": torch.zeros_like(ce)}
    if teacher_logits.shape != student_logits.shape:
        raise TrainingError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
            "differ in shape: the two models must predict the same label space"
        )
    kd = kd_divergence(student_logits, teacher_logits.to(student_logits.device), temperature)
    return {"total": (1.0 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *, alpha: float,
    temperature: float,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (loss, parts) where parts holds the batch means of total, ce and kd.

    `sample_weight` (one non-negative weight per sample, e.g. to up-weight hard negatives) turns
    every mean into a weighted mean.
    """
    parts = per_sample_losses(student_logits, teacher_logits, labels, alpha=alpha, temperature=temperature)
    if sample_weight is None:
        means = {name: value.mean() for name, value in parts.items()}
    else:
        w = sample_weight.to(device=labels.device, dtype=torch.float32)
        denom = w.sum().clamp_min(torch.finfo(torch.float32).tiny)
        means = {name: (value * w).sum() / denom for name, value in parts.items()}
    return means["total"], means


def alpha_at(cfg: DistillationConfig, progress: float) -> float:
    """The KD weight at `progress` in [0, 1] of training, following `cfg.alpha_schedule`."""
    start = cfg.alpha if cfg.alpha_start is None else cfg.alpha_start
    end = cfg.alpha if cfg.alpha_end is None else cfg.alpha_end
    p = min(max(progress, 0.0), 1.0)
    if cfg.alpha_schedule == "constant":
        return cfg.alpha
    if cfg.alpha_schedule == "linear":
        return start + (end - start) * p
    if cfg.alpha_schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    if cfg.alpha_schedule == "step":
        return start if p < cfg.alpha_step_at else end
    raise ValueError(f"unknown alpha_schedule {cfg.alpha_schedule!r}")  # config validation prevents this


def raise_if_not_finite(values: dict[str, float], step: int, hints: dict[str, str] | None = None) -> None:
    """Raise a TrainingError naming each loss component that is NaN or infinite."""
    bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
    if not bad:
        return
    names = [b.split("=")[0] for b in bad]
    advice = "; ".join(hints[n] for n in names if hints and n in hints)
    raise TrainingError(
        f"non-finite loss at step {step}: {', '.join(bad)}"
        + (f" ({advice})" if advice else "")
        + "; try a lower train.lr, train.mixed_precision: bf16 instead of fp16, or teacher.dtype: fp32"
    )
