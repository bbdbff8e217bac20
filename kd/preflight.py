"""Pre-flight memory estimate: will this run fit the VRAM budget, and if not, what to change.

Weights, gradients and optimizer state follow from parameter counts and dtypes. Activations are
measured: on a GPU, as the peak of a probe step on one micro-batch that runs what training runs
(the batch copied over, the on-device features, the teacher's forward, the student's forward and
backward, under the run's autocast and memory layout); on the CPU, analytically, by counting the
bytes autograd saves for backward in a small probe step (`saved_tensors_hooks`) plus the teacher's
largest intermediate tensors and the batch itself, scaled to the micro-batch. The CUDA context and
the libraries' workspaces are not visible to PyTorch's allocator but count against the device: on
a GPU they are read from NVML after the probe (this process's device memory less what the
allocator reserved; 0.81 GB on an H100 with torch 2.11 / CUDA 13, bench/RESULTS.md), elsewhere a
0.5 GB constant stands in.
"""

from __future__ import annotations

import math
import os
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from accelerate.utils import send_to_device
from torch import nn

from kd.memory import cuda_index
from kd.students import student_logits
from kd.teachers.loading import teacher_logits

CUDA_CONTEXT_BYTES = int(0.5e9)
ADAMW_STATE_PER_PARAM = 8  # exp_avg + exp_avg_sq in float32
GB = 1e9


@dataclass
class Estimate:
    teacher_weights: int
    student_weights: int
    grads: int
    optimizer: int
    activations: int
    cuda_context: int
    total: int
    teacher_activations: int  # the part of `activations` only the teacher's forward needs (its peak over the student's)
    method: str  # "measured" (GPU probe) or "analytic" (CPU)
    logits: int = 0  # language models: the teacher's logits held through the student's step + the chunked loss
    loss_work: int = 0  # the part of `logits` that the loss's memory.loss_chunk-wide work tensors take
    # On-policy distillation: sampling's KV cache and prompt forward. Alive while the student samples, not
    # with activations and logits, so `total` is the larger of the two moments (`with_generation`).
    generation: int = 0

    def as_telemetry(self) -> dict[str, Any]:
        return asdict(self)


def with_generation(est: Estimate, generation: int) -> Estimate:
    """The estimate with the on-policy sampling counted: weights, gradients, optimizer state and context
    stay; sampling's memory replaces the training step's activations and logits while it runs."""
    sampling = est.total - est.activations - est.logits + generation
    return replace(est, generation=generation, total=max(est.total, sampling))


def param_bytes(model: nn.Module | None) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0


def estimate_memory(teacher: nn.Module | None, student: nn.Module, batch: dict[str, Any], input_key: str,
                    *, micro_batch: int, mixed_precision: str, teacher_on_gpu: bool, device: torch.device,
                    loss_chunk: int = 1024, features: Callable | None = None,
                    autocast: Callable[[], ContextManager] = nullcontext) -> Estimate:
    """Estimate the GPU memory of training with this micro-batch (`batch`, as collated on the host,
    may be smaller: it is scaled).

    The probe runs what a training step runs on the device, in its order: the batch copied over,
    the model inputs computed from the waveform (`features`, data.features_on_device), the teacher's
    forward, the student's forward and backward, both under `autocast` (the Accelerator's). The
    batch and its features count: they live on the device through the whole step.

    Language models (3-D logits) also count their logits, which autograd's saved tensors do not show:
    the student's logits and their gradient (analytic only; the GPU probe measures them), the teacher's
    logits, alive from its forward to the loss, and the loss's (loss_chunk, vocabulary) fp32 work tensors."""
    # Gradients and AdamW moments exist for the parameters that train (a LoRA student: its adapters).
    n_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    # The probe must leave no trace: its random draws (dropout in torch, SpecAugment-style masks in
    # NumPy, anything in `random`) come from saved and restored generators, and the running
    # statistics its train-mode forward updates (BatchNorm) are put back afterwards.
    buffers = {name: b.detach().clone() for name, b in student.named_buffers()}
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            student_act, teacher_act, shape = _measured_activations(teacher, student, batch, input_key, device=device,
                                                                    features=features, autocast=autocast)
            method = "measured"
        else:
            batch = dict(batch)
            if features is not None:
                batch["inputs"] = features(batch["waveform"])
            saved, teacher_act, shape = _analytic_activations(teacher, student, batch, input_key)
            if mixed_precision != "no":
                saved //= 2  # autocast keeps most saved activations in 16 bits
            # The batch (and its features) stays on the device through the whole step, under both forwards.
            inputs = batch_bytes(batch)
            student_act, teacher_act = saved + inputs, teacher_act + inputs
            method = "analytic"
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    with torch.no_grad():
        for name, b in student.named_buffers():
            b.copy_(buffers[name])
    scale = micro_batch / max(1, int(batch["labels"].shape[0]))
    student_act, teacher_act = int(student_act * scale), int(teacher_act * scale)
    logits = loss_work = 0
    if len(shape) == 3:  # (batch, positions, vocabulary): a language model
        per_row = shape[1] * shape[2] * 4
        loss_work = 6 * min(loss_chunk, micro_batch * shape[1]) * shape[2] * 4
        logits = per_row * micro_batch * ((teacher is not None) + 2 * (method == "analytic")) + loss_work
    if not teacher_on_gpu:
        teacher_act = 0
    # The teacher's forward and the student's step run one after the other, and the teacher's
    # intermediates are freed before the student starts (only its logits stay): the peak is the
    # larger of the two, not their sum (the sum overestimated the flagship by 1.45x on an H100).
    teacher_extra = max(0, teacher_act - student_act)
    context = (measured_cuda_context(device) if device.type == "cuda" else None) or CUDA_CONTEXT_BYTES
    parts = {
        "teacher_weights": param_bytes(teacher) if teacher_on_gpu else 0,
        "student_weights": param_bytes(student),
        "grads": n_trainable * 4,
        "optimizer": n_trainable * ADAMW_STATE_PER_PARAM,
        "activations": student_act + teacher_extra,
        "cuda_context": context,
        "logits": logits,
    }
    return Estimate(**parts, total=sum(parts.values()), teacher_activations=teacher_extra, method=method,
                    loss_work=loss_work)


def measured_cuda_context(device: torch.device) -> int | None:
    """This process's device memory outside PyTorch's allocator (CUDA context, cuBLAS/cuDNN
    workspaces), from NVML; None where NVML cannot say (then the constant is used)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(cuda_index(device))
            mine = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    if p.pid == os.getpid() and p.usedGpuMemory]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, or it refuses (containers often hide processes): not an error
        return None
    if not mine:
        return None
    return max(0, mine[0] - torch.cuda.memory_reserved(device))


def _analytic_activations(teacher, student, batch, input_key) -> tuple[int, int, tuple[int, ...]]:
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t.numel() * t.element_size()
        return t

    was_training = student.training
    student.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = student_logits(student, batch, input_key)
    shape = tuple(logits.shape)
    logits.float().sum().backward()
    student.zero_grad(set_to_none=True)
    student.train(was_training)
    teacher_act = 0
    if teacher is not None:
        largest: list[int] = []

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor):
                largest.append(out.numel() * out.element_size())

        handles = [m.register_forward_hook(hook) for m in teacher.modules() if not list(m.children())]
        try:
            teacher_logits(teacher, batch)
        finally:
            for h in handles:
                h.remove()
        # Without autograd (inference mode) a layer's input and output (and a workspace) are alive at once,
        # not the whole graph.
        teacher_act = 3 * max(largest, default=0)
    return sum(saved.values()), teacher_act, shape


def batch_bytes(batch: Any) -> int:
    """Bytes of every tensor in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, dict):
        return sum(batch_bytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(batch_bytes(v) for v in batch)
    return 0


def _measured_activations(teacher, student, batch, input_key, *, device, features,
                          autocast) -> tuple[int, int, tuple[int, ...]]:
    """Peaks of the step's two halves above what was allocated before the batch came over: the batch
    and its features are alive in both, as in training."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)

    def peak_since_reset() -> int:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    torch.cuda.reset_peak_memory_stats(device)
    on_device = send_to_device(batch, device)
    with autocast():
        if features is not None:
            on_device["inputs"] = features(on_device["waveform"])
        if teacher is not None and next(teacher.parameters()).is_cuda:
            teacher_logits(teacher, on_device)
    teacher_act = peak_since_reset()

    torch.cuda.reset_peak_memory_stats(device)
    with autocast():
        logits = student_logits(student, on_device, input_key)
    shape = tuple(logits.shape)
    logits.float().sum().backward()
    student_act = peak_since_reset()
    del logits, on_device
    student.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return student_act, teacher_act, shape


def largest_fitting_micro_batch(effective: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of `effective` for which `fits` holds (0 if none), trying large to small.

    Divisors only, so accumulation (effective / micro) keeps the effective batch exact.
    """
    for micro in sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True):
        if fits(micro):
            return micro
    return 0


def advice(est: Estimate, cfg: Any, budget: int, student: nn.Module | None) -> list[tuple[str, int]]:
    """Concrete changes with their estimated saving in bytes, largest first."""
    # LoRA changes what no other setting can: the gradients and optimizer state of a pretrained student.
    lora_saving = 0
    if cfg.student.type == "hf" and cfg.student.lora is None and (cfg.student.model or cfg.student.init_from_teacher):
        lora_saving = int((est.grads + est.optimizer) * 0.97)  # rank-16 adapters: ~1-3% of a model's weights
    lora = ("student.lora: {rank: 16} trains low-rank adapters only: gradients and optimizer state for a few "
            "percent of the student", lora_saving)
    # What no batch, precision or teacher setting changes: when that alone is over the budget,
    # the usual advice would send the user through changes that cannot help.
    floor = est.cuda_context + est.student_weights + est.grads + est.optimizer
    if floor - lora_saving > budget:
        return [(f"memory.vram_budget_gb: {math.ceil(floor / GB * 100) / 100:.2f} at least, or a smaller student: the "
                 f"CUDA context and the student's weights, gradients and optimizer state alone take {fmt(floor)}, so "
                 f"no batch, precision or teacher setting fits {fmt(budget)}", floor - budget)]
    options: list[tuple[str, int]] = [lora]
    teacher = est.teacher_weights + est.teacher_activations
    if est.teacher_weights and cfg.teacher.dtype == "fp32":
        options.append(("teacher.dtype: bf16 (or fp16) halves teacher weights and activations", teacher // 2))
    if est.teacher_weights:
        options.append(("teacher.device: cpu keeps the teacher out of VRAM (slower teacher forward)", teacher))
        if not cfg.augment.enabled:
            top_k = " with distillation.cache_top_k: 64" if cfg.data.modality == "causal_lm" else ""
            options.append((f"distillation.teacher_cache: require{top_k}, filled once with --precompute-teacher: "
                            "training never loads the teacher", teacher))
        if cfg.data.modality == "causal_lm":
            options.append(("teacher.endpoint: the teacher behind an OpenAI-compatible server, on another machine "
                            "(configs/remote_teacher.yaml)", teacher))
    micro, accum = cfg.train.batch_size, cfg.train.grad_accum
    if micro > 1:
        options.append((f"train.batch_size: {micro // 2} with train.grad_accum: {accum * 2} (same effective batch)",
                        est.activations // 2))
    if not cfg.student.gradient_checkpointing and getattr(student, "supports_gradient_checkpointing",
                                                          cfg.student.type == "hf"):
        options.append(("student.gradient_checkpointing: true recomputes activations in backward",
                        int((est.activations - est.teacher_activations) * 0.6)))
    if cfg.train.mixed_precision == "no":
        options.append(("train.mixed_precision: bf16 (or fp16 on older GPUs) halves activations", est.activations // 2))
    if cfg.data.modality == "audio":
        options.append((f"data.max_seconds: {cfg.data.max_seconds / 2:g} (shorter clips)", est.activations // 2))
    elif cfg.data.modality in ("text", "causal_lm"):
        options.append((f"data.max_length: {max(1, cfg.data.max_length // 2)} (shorter inputs)",
                        (est.activations + est.logits) // 2))
    if est.loss_work and cfg.memory.loss_chunk >= 64:
        options.append((f"memory.loss_chunk: {cfg.memory.loss_chunk // 4} (the loss works through fewer positions "
                        "at a time; a little slower)", est.loss_work * 3 // 4))
    return sorted((o for o in options if o[1] > 0), key=lambda o: -o[1])


def fmt(value: int) -> str:
    return f"{value / GB:.2f} GB" if value >= 0.1 * GB else f"{value / 1e6:.1f} MB"


def format_estimate(est: Estimate, budget: int, free: int | None = None) -> str:
    rows = [("teacher weights", est.teacher_weights), ("student weights", est.student_weights),
            ("gradients", est.grads), ("optimizer state (AdamW)", est.optimizer),
            (f"activations ({est.method})", est.activations), ("CUDA context", est.cuda_context)]
    if est.logits:
        rows.insert(5, ("logits and loss (LM)", est.logits))
    if est.generation:  # not added to the step's peak: the larger of the two moments is the total
        rows.insert(-1, ("sampling (on-policy, apart)", est.generation))
    lines = ["Pre-flight memory estimate (GPU)"]
    lines += [f"  {name:<26} {fmt(value):>10}" for name, value in rows]
    verdict = "fits" if est.total <= budget else "OVER BUDGET"
    lines.append(f"  {'total':<26} {fmt(est.total):>10}  vs budget {fmt(budget)}: {verdict}")
    if free is not None:
        lines.append(f"  {'free on the device now':<26} {fmt(free):>10}")
    return "\n".join(lines)


def choose_teacher_device(est_on_gpu: Estimate, budget: int) -> tuple[str, str]:
    """teacher.device: auto. GPU when the estimate fits the budget, else CPU if that makes it fit."""
    if est_on_gpu.total <= budget:
        return "gpu", f"the estimate {est_on_gpu.total / GB:.2f} GB fits the {budget / GB:.2f} GB budget"
    without = est_on_gpu.total - est_on_gpu.teacher_weights - est_on_gpu.teacher_activations
    if without <= budget:
        return "cpu", (f"with the teacher on the GPU the estimate is {est_on_gpu.total / GB:.2f} GB, over the "
                       f"{budget / GB:.2f} GB budget; on the CPU it is {without / GB:.2f} GB")
    return "gpu", (f"the estimate is {est_on_gpu.total / GB:.2f} GB even with the teacher on the CPU "
                   f"({without / GB:.2f} GB); see the advice")
