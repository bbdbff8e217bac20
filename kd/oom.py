"""Out of memory in training: what to do about it (retry the step with a smaller micro-batch, or stop
with a checkpoint), the advice that says how to fit next time, and fault injection that exercises
all of it on any device.

A shrink keeps the effective batch: the micro-batch becomes its largest divisor at most half as
large, and the accumulation grows by the same factor, so positions in the epoch stay exact and the
optimizer sees the same batches.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch

from kd.errors import TrainingError


@dataclass(frozen=True)
class Recovery:
    """The answer to an out-of-memory error at some micro-batch x accumulation."""

    advice: list[str]  # config changes that reduce memory, the most relevant first
    micro_batch: int | None = None  # the retry's sizes (None: no retry)
    grad_accum: int | None = None
    why_not: str | None = None  # why there is no retry


def plan_recovery(cfg: Any, phase: str, *, micro: int, accum: int, teacher_loaded: bool) -> Recovery:
    """Retry smaller (memory.on_oom: shrink, down to memory.min_micro_batch), or stop."""
    advice = oom_advice(cfg, phase, micro=micro, accum=accum, has_teacher=teacher_loaded)
    new_micro, mcfg = smaller_divisor(micro), cfg.memory
    if mcfg.on_oom == "fail":
        return Recovery(advice, why_not="memory.on_oom is 'fail'")
    if new_micro < mcfg.min_micro_batch:
        return Recovery(advice, why_not=f"the micro-batch cannot shrink below memory.min_micro_batch="
                                        f"{mcfg.min_micro_batch}")
    return Recovery(advice, micro_batch=new_micro, grad_accum=accum * (micro // new_micro))


def release_memory(device: torch.device) -> None:
    """Free what the failed step held: called once its tensors are unreachable (outside the except
    block, whose traceback keeps every frame of the step alive)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class OutOfMemoryFailure(TrainingError):
    """Out of memory with no way left to shrink (or memory.on_oom: fail): the run stops, checkpointed."""


def smaller_divisor(n: int) -> int:
    """The largest divisor of n that is at most n / 2 (n // 2 for even n): positions stay exact."""
    return next((d for d in range(n // 2, 0, -1) if n % d == 0), 0)


def oom_advice(cfg: Any, phase: str, *, micro: int, accum: int, has_teacher: bool) -> list[str]:
    """Concrete config changes that reduce memory, the most relevant to `phase` first."""
    half = max(1, micro // 2)
    advice = [f"train.batch_size={half} train.grad_accum={accum * (micro // half)} keeps the effective batch "
              "with half the activation memory"]
    if has_teacher:
        teacher = []
        if cfg.teacher.dtype == "fp32":
            teacher.append("teacher.dtype=bf16 (or fp16) halves the teacher's weights and activations")
        if cfg.teacher.device != "cpu":
            teacher.append("teacher.device=cpu keeps the teacher out of VRAM (slower teacher forward)")
        advice = teacher + advice if phase == "teacher_forward" else advice + teacher
    if cfg.train.mixed_precision == "no":
        advice.append("train.mixed_precision=bf16 (or fp16) halves activation memory")
    if cfg.data.modality == "audio":
        advice.append(f"data.max_seconds below {cfg.data.max_seconds} shortens every input")
    elif cfg.data.modality in ("text", "causal_lm"):
        advice.append(f"data.max_length below {cfg.data.max_length} shortens every input")
    if cfg.data.modality == "causal_lm":
        advice.append(f"memory.loss_chunk below {cfg.memory.loss_chunk} shrinks the (chunk x vocabulary) loss tensors")
        op = cfg.distillation.on_policy
        if op.share > 0:
            sampling = (f"distillation.on_policy.max_new_tokens below {op.max_new_tokens} shortens the samples and "
                        "the KV cache of sampling")
            advice.insert(0 if phase == "generate" else len(advice), sampling)
    return advice


class OomFault:
    """Fault injection: KD_FAULT_OOM_AT_STEP=N raises one out-of-memory error in optimizer step N.

    It hits the last micro-batch of that step (so with accumulation, a partly accumulated step has
    to be thrown away), in the phase KD_FAULT_OOM_PHASE names (generate, teacher_forward, student_forward,
    backward, optimizer; default backward). Works on any device, so recovery can be tested and
    shown without a GPU.
    """

    def __init__(self, step: int | None, phase: str):
        self.step, self.phase, self.fired = step, phase, False

    @classmethod
    def from_env(cls) -> "OomFault":
        raw = os.environ.get("KD_FAULT_OOM_AT_STEP")
        step = int(raw) if raw and raw.strip().isdigit() else None
        return cls(step, os.environ.get("KD_FAULT_OOM_PHASE", "backward"))

    def maybe_raise(self, step: int, phase: str) -> None:
        if self.step == step and phase == self.phase and not self.fired:
            self.fired = True
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by KD_FAULT_OOM_AT_STEP={step})")
