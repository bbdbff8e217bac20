"""The soft-target source a config asks for: the one place that knows every source."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from kd.config import Config
from kd.data import PreparedData
from kd.lm.vocabulary import cut_to_tokenizer
from kd.teachers.cached import open_cached_teacher
from kd.teachers.loading import load_teacher
from kd.teachers.online import TeacherForward
from kd.teachers.remote.source import open_remote_teacher
from kd.teachers.source import SoftTargetSource


class LazyTeacher:
    """teacher.model, loaded on first use and kept: a source and the student's initialisation share one load.
    `tokens`: a causal LM's tokenizer length; logits past it (padding) are cut as they come out."""

    def __init__(self, cfg: Config, tokens: int | None = None):
        self.cfg, self.tokens = cfg, tokens
        self.model: torch.nn.Module | None = None  # None until something asked for it

    def __call__(self) -> torch.nn.Module:
        if self.model is None:
            t = self.cfg.teacher
            self.model = load_teacher(t.model, self.cfg.data.modality, t.revision, t.dtype)
            cut = cut_to_tokenizer(self.model, self.tokens) if self.tokens is not None else None
            if cut:
                print(f"Teacher {cut}")
        return self.model


def open_soft_targets(cfg: Config, accelerator: Accelerator, data: PreparedData, processor: Any,
                      *, teacher: LazyTeacher, plan_only: bool = False,
                      precompute: bool = False) -> SoftTargetSource | None:
    """The run's source of soft targets (None: no distillation, the student learns from the labels):
    a server (teacher.endpoint), the on-disk store with the teacher filling what it lacks
    (distillation.teacher_cache), or the teacher's forward on every batch. `plan_only`: a store
    that does not exist yet is not created (the plan counts the teacher instead)."""
    if not cfg.distillation.enabled:
        return None
    if cfg.remote_teacher:
        # The teacher's weights are compared with the server's answers only where the run loads them anyway.
        at_hand = teacher if cfg.student.init_from_teacher and cfg.teacher.model else None
        return open_remote_teacher(cfg, processor, data, accelerator, local_teacher=at_hand)
    cached = open_cached_teacher(cfg, accelerator, data, processor, teacher=teacher, create=not plan_only,
                                 precompute=precompute)
    return cached if cached is not None else TeacherForward(teacher())
