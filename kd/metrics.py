"""Classification metrics over whole splits (predictions gathered from every process)."""

from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred == target).float().mean()) if target.numel() else float("nan")


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (as scikit-learn does)."""
    if target.numel() == 0:
        return float("nan")
    tp = torch.bincount(target[pred == target], minlength=num_classes).float()
    predicted = torch.bincount(pred, minlength=num_classes).float()
    actual = torch.bincount(target, minlength=num_classes).float()
    present = (predicted + actual) > 0
    f1 = 2 * tp / (predicted + actual).clamp_min(1)
    return float(f1[present].mean())


def split_metrics(student_pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  *, teacher_pred: torch.Tensor | None, loss: float) -> dict[str, float | None]:
    """The eval event's metrics: student accuracy and macro F1, teacher accuracy, agreement, loss."""
    return {
        "student_acc": accuracy(student_pred, labels),
        "student_f1": macro_f1(student_pred, labels, num_classes),
        "teacher_acc": accuracy(teacher_pred, labels) if teacher_pred is not None else None,
        "agreement": accuracy(student_pred, teacher_pred) if teacher_pred is not None else None,
        "loss": loss,
    }
