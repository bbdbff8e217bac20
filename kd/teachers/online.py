"""Online KD: the teacher's forward on every batch."""

from __future__ import annotations

from typing import Any

import torch

from kd.teachers.loading import teacher_logits
from kd.teachers.source import SoftTargetSource


class TeacherForward(SoftTargetSource):
    def __init__(self, teacher: torch.nn.Module):
        self._teacher = teacher

    @property
    def teacher(self) -> torch.nn.Module:
        return self._teacher

    def logits(self, batch: dict[str, Any], role: str) -> torch.Tensor:
        return teacher_logits(self._teacher, batch)

    def score(self, batch: dict[str, Any]) -> torch.Tensor:
        return teacher_logits(self._teacher, batch)
