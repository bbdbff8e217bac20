"""The fit loop: accumulate, step, log, evaluate, checkpoint, export.

One optimizer step ("step" everywhere: telemetry, checkpoints, eval_every) is `train.grad_accum`
micro-batches, counted by `accelerator.accumulate`. Loss values stay on the device and are read
back to the host only every `telemetry.log_every` steps, so the hot loop does not synchronise.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, send_to_device
from tqdm.auto import tqdm
from transformers import get_scheduler

from kd.atomic import plain_modes
from kd.audio.augment import WaveformAugment, describe
from kd.build import Run
from kd.checkpoints import CHECKPOINT_DIR, list_checkpoints, write_manifest
from kd.config import save_config
from kd.data import make_loader
from kd.errors import KDError, TrainingError, first_line
from kd.export.onnx import export_saved_student
from kd.export.student import save_student
from kd.lm.on_policy import OnPolicy
from kd.losses import LOSS_PARTS, alpha_at, raise_if_not_finite
from kd.memory import GpuSampler, PhasePeaks, cuda_memory
from kd.objectives import make_objective
from kd.oom import OomFault, OutOfMemoryFailure, plan_recovery, release_memory
from kd.run_folder import CONFIG_FILE, STUDENT_DIR
from kd.stopping import StopAfterStep, Stopped, release_collectives
from kd.students import student_logits
from kd.teachers.source import SourceFailure, SplitRunner
from kd.telemetry import TelemetryWriter

LR_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so --resume continues on the next batch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of the current epoch already trained on (this process)
    samples: int = 0  # all processes together
    micro_batch: int = 0  # current sizes: an out-of-memory shrink changes them, a resume keeps them
    grad_accum: int = 0
    train_rows: int = 0  # the training split's size: an epoch's plan, which a resume must find unchanged

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class Window:
    """Loss sums and timings between two log lines, kept on the device until they are read."""

    def __init__(self, device: torch.device):
        self.device = device
        self._had: dict[tuple[str, ...], torch.Tensor] = {}  # which parts a micro-batch had, on the device
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        # Per loss part: its sum and how many micro-batches had it (an on-policy batch has no ce).
        self.sums = torch.zeros(2, len(LOSS_PARTS), device=self.device)
        self.micro_batches = 0
        self.on_policy = {"batches": 0, "generated": 0, "rows": 0, "generate_s": 0.0, "score_s": 0.0}
        self.steps = 0
        self.samples = 0
        self.tokens = torch.zeros((), device=self.device, dtype=torch.long)  # language models
        self.data_s = 0.0
        self.started = now

    def add(self, parts: dict[str, torch.Tensor], tokens: torch.Tensor | None) -> None:
        zero = self.sums.new_zeros(())
        values = torch.stack([parts[name].detach().float() if name in parts else zero for name in LOSS_PARTS])
        key = tuple(parts)
        if key not in self._had:  # copied to the device once per kind of micro-batch, not every time
            self._had[key] = torch.tensor([name in parts for name in LOSS_PARTS], dtype=torch.float32,
                                          device=self.device)
        self.sums += torch.stack([values, self._had[key]])
        if tokens is not None:
            self.tokens += tokens
        self.micro_batches += 1


class Trainer:
    def __init__(self, run: Run, record: bool = True):
        """`record=False` (--precompute-teacher): no telemetry file, nothing in the run folder."""
        self.run = run
        self.cfg = run.cfg
        self.acc = run.accelerator
        self.state = TrainState()
        self.output_dir = self.cfg.output_dir
        self.telemetry = TelemetryWriter(self.output_dir, enabled=record and self.acc.is_main_process)
        # Where soft targets come from (teacher forward, cache, ...); None: plain supervised training.
        self.targets = run.soft_targets
        self.features = run.data.features
        self.num_classes = len(run.data.label_names)
        self.objective = make_objective(self.cfg, self.num_classes)  # class labels or next tokens
        self.augment = None
        if self.cfg.augment.enabled:
            self.augment = WaveformAugment(self.cfg.augment, run.data.sampling_rate, self.num_classes,
                                           seed=self.cfg.run.seed, rank=self.acc.process_index)
            self.acc.print(f"Augmentation (training batches, teacher and student alike): {describe(self.cfg.augment)}")
        self.state.micro_batch, self.state.grad_accum = self.cfg.train.batch_size, self.cfg.train.grad_accum
        self.state.train_rows = len(run.data.splits["train"])
        if self.targets is not None:
            self.targets.report_to(self._warn)  # e.g. a teacher server retrying while the loop waits on it
        self.on_policy = self._on_policy()
        # The sizes may differ from those the Accelerator was created with (memory.auto_batch_size).
        self.acc.gradient_accumulation_steps = self.state.grad_accum
        # On a GPU, the fused AdamW: one kernel for the whole update, and under fp16 the gradient scaler
        # hands it the overflow flag on the device, where the default AdamW makes the scaler read the flag
        # back (the host waits for the GPU at every step). Sharded students (FSDP, DeepSpeed) keep the default.
        fused = self.acc.device.type == "cuda" and self.acc.distributed_type in (DistributedType.NO,
                                                                                 DistributedType.MULTI_GPU)
        # Only what trains has optimizer state: a LoRA student's adapters (its frozen weights have none).
        trainable = [p for p in run.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.cfg.train.lr,
                                           weight_decay=self.cfg.train.weight_decay, fused=True if fused else None)
        self.student, self.optimizer = self.acc.prepare(run.student, self.optimizer)
        self.train_micro = self.state.micro_batch  # the micro-batch train_dl was built with
        self.train_dl = self._loader("train", self.train_micro)
        self.eval_dls = {role: self._loader(role, self.cfg.train.batch_size)
                         for role in ("eval", "test") if role in run.data.splits}
        self.steps_per_epoch = math.ceil(len(self.train_dl) / self.cfg.train.grad_accum)
        self.phase = "teacher_forward"  # where in the step we are, for out-of-memory reports
        self.fault = OomFault.from_env()
        self.peaks = PhasePeaks(self.acc.device)
        self.gpu = GpuSampler(self.acc.device, self.cfg.telemetry.gpu_sample_s) if self.acc.is_main_process else None
        self._step_start = (0, 0)  # (batches_in_epoch, samples) when the current optimizer step began
        tcfg = self.cfg.train
        self.total_steps = tcfg.max_steps or tcfg.epochs * self.steps_per_epoch
        # Stepped by hand once per optimizer step (not via accelerator.prepare, which would step it
        # once per process and so run the schedule num_processes times too fast).
        self.scheduler = get_scheduler(LR_SCHEDULES[tcfg.lr_schedule], self.optimizer.optimizer,
                                       num_warmup_steps=int(tcfg.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.acc.register_for_checkpointing(self.scheduler, self.state)
        self.metrics: dict[str, dict[str, Any]] = {}
        self.stopper = StopAfterStep()  # SIGTERM or Ctrl-C: stop after the current step (kd/stopping.py)

    def _on_policy(self) -> OnPolicy | None:
        """distillation.on_policy: the sampler of the student's own batches (None: off)."""
        op = self.cfg.distillation.on_policy
        if self.targets is None or self.cfg.data.modality != "causal_lm" or op.share == 0:
            return None
        tokenizer = self.run.processor
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.acc.print(f"On-policy distillation: {100 * op.share:g}% of micro-batches are the student's own samples "
                       f"(up to {op.max_new_tokens} new tokens at temperature {op.temperature:g}), scored by the "
                       f"teacher, loss {op.divergence} over the sampled tokens")
        return OnPolicy(op, max_length=self.cfg.data.max_length, seed=self.cfg.run.seed, rank=self.acc.process_index,
                        pad_id=pad, eos_id=tokenizer.eos_token_id)

    def _loader(self, role: str, batch_size: int):
        """The role's DataLoader, prepared by Accelerate (sharded over processes, batches on the device)."""
        return self.acc.prepare(self._plain_loader(self.run.data.splits[role], batch_size, shuffle=role == "train"))

    def _plain_loader(self, ds, batch_size: int, shuffle: bool = False):
        return make_loader(ds, self.cfg.data, batch_size, collate=self.run.data.collate, shuffle=shuffle,
                           pin_memory=self.acc.device.type == "cuda", seed=self.cfg.run.seed)

    def _use_sizes(self, micro_batch: int, grad_accum: int) -> None:
        """Train on with another micro-batch / accumulation (after a shrink, or resuming after one)."""
        if micro_batch != self.train_micro:
            self.train_micro = micro_batch
            self.train_dl = self._loader("train", micro_batch)
        self.state.micro_batch, self.state.grad_accum = micro_batch, grad_accum
        self.acc.gradient_accumulation_steps = grad_accum
        self.acc.step = 0  # the next micro-batch opens a new optimizer step

    # -----------------------------------------------------------------------------------------
    def fit(self, resume_from: Path | None = None) -> dict[str, Any]:
        started = time.time()
        if resume_from is not None:
            try:
                self.acc.load_state(str(resume_from))
            except Exception as exc:  # a file that is there at its size but does not read back
                raise KDError(f"--resume: cannot load checkpoint {resume_from} ({first_line(exc)}); it is damaged: "
                              f"resume from an older one in {resume_from.parent}") from None
            rows = len(self.run.data.splits["train"])
            if self.state.train_rows and self.state.train_rows != rows:  # 0: a checkpoint from before the field
                raise KDError(f"--resume: the checkpoint's epochs are over {self.state.train_rows} training samples "
                              f"and this run has {rows}, so its place in the epoch cannot be found again; resume "
                              "with the data it was trained on (with a remote teacher down and --cache-read-only, "
                              "only the cached samples are left: start the server), or start a new run")
            self.state.train_rows = rows
            self._use_sizes(self.state.micro_batch, self.state.grad_accum)
            self._step_start = (self.state.batches_in_epoch, self.state.samples)
            self.acc.print(f"Resumed from {resume_from} at step {self.state.step}, epoch {self.state.epoch}")
        self._start(resume_from)
        status, error = "failed", None
        restore_signals = self.stopper.install(one_process=self.acc.num_processes == 1)
        try:
            self._train()
            self._finish()
            status = "completed"
            return self.metrics
        except Stopped as exc:
            status, error = "interrupted", f"stopped by {exc} after step {self.state.step}"
            raise
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by the user (Ctrl-C)"
            raise
        except Exception as exc:
            status = "oom" if isinstance(exc, OutOfMemoryFailure) else "failed"
            error = str(exc) if isinstance(exc, KDError) else f"{type(exc).__name__}: {exc}"
            raise
        finally:
            restore_signals()
            self.telemetry.emit("run_end", self.state.step, status=status, duration_s=time.time() - started,
                                metrics=self.metrics, peak=self.peaks.run_peak(), error=error)
            self.telemetry.close()
            if self.targets is not None:
                self.targets.close()
            if self.gpu is not None:
                self.gpu.close()
            self.acc.end_training()
            if self.acc.num_processes > 1:
                release_collectives()

    def _start(self, resume_from: Path | None) -> None:
        cfg, run = self.cfg, self.run
        effective = self.state.micro_batch * self.state.grad_accum * self.acc.num_processes
        plan = {"total_steps": self.total_steps, "micro_batch": self.state.micro_batch,
                "grad_accum": self.state.grad_accum, "effective_batch": effective,
                "vram_budget_bytes": int(cfg.memory.vram_budget_gb * 1e9), "steps_per_epoch": self.steps_per_epoch}
        if self.acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / CONFIG_FILE)
        self.telemetry.emit("run_start", self.state.step, config=cfg.to_dict(), env=run.env, params=run.params,
                            plan=plan, estimate=run.estimate.as_telemetry() if run.estimate else None,
                            labels=run.data.label_names,
                            soft_targets=self.targets.describe() if self.targets is not None else None,
                            resumed_from=str(resume_from) if resume_from else None)
        if run.estimate and run.estimate.total > plan["vram_budget_bytes"]:
            helps = "; ".join(t for t, _ in run.advice[:3]) or "no config change is estimated to help"
            self.telemetry.emit("warning", self.state.step, code="over_budget",
                                message=f"estimated {run.estimate.total / 1e9:.2f} GB is over the "
                                        f"{cfg.memory.vram_budget_gb} GB budget; {helps}")
        if cfg.telemetry.report_to:
            self.acc.init_trackers(cfg.run.name, config=_flat(cfg.to_dict()))
        self.acc.print(f"Training {self.total_steps} steps ({self.steps_per_epoch} per epoch), micro-batch "
                       f"{self.state.micro_batch} x accumulation {self.state.grad_accum} x {self.acc.num_processes} "
                       f"process(es) = effective batch {effective}; telemetry: {self.telemetry.path}")

    # -----------------------------------------------------------------------------------------
    def _train(self) -> None:
        state = self.state
        self.student.train()
        window = self.window = Window(self.acc.device)  # on-policy sampling adds its figures to it too
        # A context manager, so the bar is closed (and its line ended) before any error is printed.
        with tqdm(total=self.total_steps, initial=state.step, desc="train", unit="step",
                  disable=not self.acc.is_local_main_process, dynamic_ncols=True) as bar:
            while state.step < self.total_steps:
                oom = None
                try:
                    epoch_done = self._train_epoch(window, bar)
                except torch.OutOfMemoryError as exc:
                    oom = first_line(exc, default="CUDA out of memory")
                except SourceFailure as exc:  # e.g. a teacher server that stopped answering
                    raise type(exc)(f"{exc}; {self._save_before_failing()}") from None
                if oom is not None:
                    # Outside the except block: the traceback, and with it every tensor of the failed
                    # step, is gone by now, so emptying the cache below really frees memory.
                    self._recover_from_oom(oom, self.phase)
                    window.reset(time.perf_counter())  # recovery time stays out of throughput
                    continue
                if epoch_done:
                    note = self.targets.after_epoch(self.split_runner()) if self.targets is not None else None
                    if note:
                        self.acc.print(note)
                    state.epoch += 1
                    state.batches_in_epoch = 0
                    self._step_start = (0, state.samples)
                    self.peaks.new_epoch()

    def _train_epoch(self, window: Window, bar: tqdm) -> bool:
        """Train on the rest of the current epoch; False if training ended inside it."""
        acc, state = self.acc, self.state
        self.train_dl.set_epoch(state.epoch)
        loader = self.train_dl
        if state.batches_in_epoch:
            loader = acc.skip_first_batches(self.train_dl, state.batches_in_epoch)
        waited = time.perf_counter()
        for batch in self._ahead(loader, self.train_dl, "train", state.batches_in_epoch):
            window.data_s += time.perf_counter() - waited
            with acc.accumulate(self.student):
                parts, grad_norm, batch = self._micro_step(batch)
            window.add(parts, self.objective.tokens(batch))
            state.batches_in_epoch += 1
            batch_samples = batch["labels"].shape[0] * acc.num_processes
            state.samples += batch_samples
            window.samples += batch_samples
            if acc.sync_gradients:
                state.step += 1
                window.steps += 1
                self.scheduler.step()
                bar.update(1)
                self._step_start = (state.batches_in_epoch, state.samples)
                self._after_step(window, grad_norm, bar)
                if state.step >= self.total_steps:
                    return False
                signum = self.stopper.agreed(self.acc, state.step)
                if signum is not None:
                    self.save_checkpoint()
                    raise Stopped(signum)
            waited = time.perf_counter()
        return True

    def _ahead(self, loader, full_loader, role: str, skip: int = 0):
        """The loader's batches; a soft-target source that fetches (a remote teacher) is told which
        rows come next, read from the loader's batch sampler (the same order: same sampler, same epoch)."""
        if self.targets is None:
            return loader
        split = self.run.data.splits[role]
        # The epoch's batches are listed before the loader draws its own. Accelerate's seedable
        # sampler counts an epoch each time it is iterated to the end, so a list made after the
        # loader's pass ended (a one-batch epoch: its look-ahead ends it at once) would be the next
        # epoch's order. Listing first, then setting the epoch back, gives exactly the loader's.
        order = list(full_loader.batch_sampler)
        if role == "train":
            full_loader.set_epoch(self.state.epoch)

        def upcoming():
            for k, indices in enumerate(order[skip:], start=skip):
                # An on-policy batch's rows are not scored: the student writes its own.
                wanted = role != "train" or self.on_policy is None or not self.on_policy.chosen(self.state.epoch, k)
                yield [split[int(i)] for i in indices] if wanted else None

        return self.targets.prefetch(loader, upcoming())

    def _micro_step(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, Any]]:
        """One micro-batch forward and backward (the optimizer steps when it completes a step);
        returns the loss parts, the gradient norm of a completed step, and the batch trained on."""
        labels = batch["labels"]
        if labels.numel() == 0:
            raise TrainingError("empty batch: the data loader produced a batch with no samples")
        alpha = self.alpha()
        on_policy = self.on_policy is not None and self.on_policy.chosen(self.state.epoch, self.state.batches_in_epoch)
        with self.acc.autocast():
            if on_policy:
                self._enter("generate")
                batch = self._sample(batch)
            self._enter("teacher_forward")  # includes augmentation and the on-device feature extraction
            targets = self._augment(batch)
            self._add_features(batch)
            if on_policy:
                t_logits = self._score(batch)
            else:
                t_logits = self.targets.logits(batch, "train") if self.targets is not None else None
            self._enter("student_forward")
            s_logits = student_logits(self.student, batch, self.run.input_key)
        loss, parts = self.objective.loss(s_logits, t_logits, batch, targets=targets, alpha=alpha)
        del s_logits, t_logits  # drop our references: only what backward needs stays alive
        self._enter("backward")
        self.acc.backward(loss)
        grad_norm = None
        self._enter("optimizer")
        if self.acc.sync_gradients and self.cfg.train.max_grad_norm:
            grad_norm = self.acc.clip_grad_norm_(self.student.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()  # a no-op on accumulation steps (the prepared optimizer knows)
        self.optimizer.zero_grad(set_to_none=True)
        return parts, grad_norm, batch

    def _sample(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The micro-batch rebuilt from the student's own continuations of its prompts (kd/lm/on_policy.py)."""
        model = self.acc.unwrap_model(self.student, keep_torch_compile=False)
        sampled = self.on_policy.sample(model, batch, self.state.epoch, self.state.batches_in_epoch)
        stats = self.window.on_policy
        stats["batches"] += 1
        stats["generated"] += sampled.generated
        stats["rows"] += sampled.batch["labels"].shape[0]
        stats["generate_s"] += sampled.seconds
        return sampled.batch

    def _score(self, batch: dict[str, Any]) -> Any:
        """The teacher's soft targets of the student's samples, timed (the wait is on the device's work
        or on a teacher server)."""
        started = time.perf_counter()
        out = self.targets.score(batch)
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)
        self.window.on_policy["score_s"] += time.perf_counter() - started
        return out

    def _augment(self, batch: dict[str, Any]) -> torch.Tensor:
        """Augment the batch's waveform in place (augment.enabled); return the CE targets.

        The targets are the labels, or their mixed one-hot vectors when mixup mixed the clips.
        Seeded by (seed, epoch, batch index, process), so a resumed run draws what the original drew;
        with augment.views by (seed, view, clip), and the batch carries its view for the teacher cache.
        """
        if self.augment is None:
            return batch["labels"]
        waveform, mixed = self.augment(batch["waveform"], batch["labels"], self.state.epoch,
                                       self.state.batches_in_epoch, clips=batch.get("index"))
        batch["waveform"] = waveform
        view = self.augment.view(self.state.epoch)
        if view is not None:
            batch["view"] = view
        return batch["labels"] if mixed is None else mixed

    def _add_features(self, batch: dict[str, Any]) -> None:
        """The model inputs from the waveform, batched on the device (data.features_on_device);
        skipped when neither model needs them (a log-mel student with every soft target cached)."""
        wanted = self.run.input_key == "inputs" or (self.targets is not None and self.targets.needs_teacher_inputs)
        if self.features is not None and wanted:
            batch["inputs"] = self.features(batch["waveform"])

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The teacher model while one is loaded (None: no distillation, or every soft target cached)."""
        return self.targets.teacher if self.targets is not None else None

    # -----------------------------------------------------------------------------------------
    def split_runner(self) -> SplitRunner:
        """What a soft-target source needs to run its teacher over whole splits: batches made as in
        training but not sharded by Accelerate (each process computes its own share)."""

        def prepare(batch: dict[str, Any], view: int | None = None) -> dict[str, Any]:
            batch = send_to_device(batch, self.acc.device, non_blocking=self.cfg.data.pin_memory)
            if view is not None:  # a view's epoch is the view itself (view = epoch mod views)
                batch["waveform"], _ = self.augment(batch["waveform"], batch["labels"], view, 0, clips=batch["index"])
                batch["view"] = view
            self._add_features(batch)
            return batch

        return SplitRunner(splits=self.run.data.splits,
                           loader=lambda ds: self._plain_loader(ds, self.cfg.train.batch_size), prepare=prepare,
                           autocast=self.acc.autocast, barrier=self.acc.wait_for_everyone,
                           rank=self.acc.process_index, world=self.acc.num_processes,
                           show=self.acc.is_local_main_process)

    def precompute(self) -> None:
        """--precompute-teacher: every soft target of every configured split computed and stored."""
        if self.targets is None:
            raise KDError("--precompute-teacher: this run has no teacher cache (distillation.teacher_cache)")
        print(self.targets.precompute(self.split_runner()), flush=True)
        if self.acc.num_processes > 1:
            release_collectives()

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.peaks.enter(phase)
        if self.acc.sync_gradients:  # injected faults hit the micro-batch that completes the step
            self.fault.maybe_raise(self.state.step + 1, phase)

    def _warn(self, code: str, message: str) -> None:
        """A warning as it happens: a telemetry event (the monitor shows it) and a line on the console."""
        self.telemetry.emit("warning", self.state.step, code=code, message=message)
        self.acc.print(f"Warning [{code}]: {message}")

    def _save_before_failing(self) -> str:
        """Drop the unfinished step and checkpoint the state after the last finished one."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.batches_in_epoch, self.state.samples = self._step_start
        path = self.save_checkpoint()
        return f"the state after step {self.state.step} is saved in {path} (continue with --resume)"

    def _recover_from_oom(self, message: str, phase: str) -> None:
        """Drop the failed step, then retry it smaller (shrink) or checkpoint and stop (fail)."""
        state = self.state
        mem = cuda_memory(self.acc.device)
        self.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
        release_memory(self.acc.device)
        state.batches_in_epoch, state.samples = self._step_start  # the step restarts from its first sample
        old_micro, old_accum = state.micro_batch, state.grad_accum
        plan = plan_recovery(self.cfg, phase, micro=old_micro, accum=old_accum, teacher_loaded=self.teacher is not None)
        event = {"phase": phase, "micro_batch": old_micro, "grad_accum": old_accum, "mem": mem,
                 "message": message, "advice": plan.advice}
        if plan.micro_batch is None:
            path = self.save_checkpoint()
            self.telemetry.emit("oom", state.step, action="fail", new_micro_batch=None, new_grad_accum=None,
                                recovered=False, **event)
            raise OutOfMemoryFailure(
                f"out of memory in {phase} at step {state.step + 1} with micro-batch {old_micro} ({plan.why_not}); "
                f"the state after step {state.step} is saved in {path} (continue with --resume); "
                f"to fit: {'; '.join(plan.advice[:3])}")
        new_micro, new_accum = plan.micro_batch, plan.grad_accum
        state.batches_in_epoch *= old_micro // new_micro  # the same sample position, counted in smaller batches
        self._step_start = (state.batches_in_epoch, state.samples)
        self._use_sizes(new_micro, new_accum)
        self.telemetry.emit("oom", state.step, action="shrink", new_micro_batch=new_micro, new_grad_accum=new_accum,
                            recovered=True, **event)
        self.acc.print(f"Out of memory in {phase} at step {state.step + 1}: retrying the step with micro-batch "
                       f"{new_micro} x accumulation {new_accum} (was {old_micro} x {old_accum}); effective batch "
                       f"unchanged. To avoid the retry next time: train.batch_size={new_micro} "
                       f"train.grad_accum={new_accum}")

    def alpha(self) -> float:
        return alpha_at(self.cfg.distillation, self.state.step / max(1, self.total_steps))

    def _after_step(self, window: Window, grad_norm: torch.Tensor | None, bar: tqdm) -> None:
        cfg, step = self.cfg, self.state.step
        if step % cfg.telemetry.log_every == 0 or step == self.total_steps:
            self._log_step(window, grad_norm, bar)
        paused = False
        if step % cfg.train.eval_every == 0 and step < self.total_steps and "eval" in self.eval_dls:
            self.evaluate("eval")
            paused = True
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            self.save_checkpoint()
            paused = True
        if paused:  # evaluation and checkpoint time stay out of the throughput figures
            window.reset(time.perf_counter())

    def _log_step(self, window: Window, grad_norm: torch.Tensor | None, bar: tqdm) -> None:
        now = time.perf_counter()
        # Mean over the window and over all processes (every process logs at the same steps), read
        # back in one host sync; a NaN on any process therefore stops all of them.
        sums, had = self.acc.reduce(window.sums, reduction="sum")
        means = (sums / had.clamp_min(1)).tolist()
        # A part no micro-batch had (ce when every batch was on-policy) is None, not zero.
        values = {name: m if n else None for name, m, n in zip(LOSS_PARTS, means, had.tolist())}
        raise_if_not_finite({k: v for k, v in values.items() if v is not None}, self.state.step,
                            {"kd": "the teacher's logits or the student's are not finite"})
        elapsed = now - window.started
        warm = self.state.step > self.cfg.telemetry.warmup_steps  # the first steps include start-up costs
        rate = None
        if warm and window.steps and elapsed > 0:
            rate = {"samples_per_s": window.samples / elapsed, "steps_per_s": window.steps / elapsed}
            if self.objective.unit == "tokens":  # the tokens every process read, summed
                rate["tokens_per_s"] = float(self.acc.reduce(window.tokens, reduction="sum")) / elapsed
        step_time = {"step_s": elapsed / max(1, window.steps), "data_s": window.data_s / max(1, window.steps)}
        lr = self.scheduler.get_last_lr()[0]
        gn = float(grad_norm) if grad_norm is not None else None
        alpha = self.alpha() if self.targets is not None else 0.0
        cache = self.targets.stats() if self.targets is not None else None
        extra = {self.targets.telemetry_key: cache} if cache else {}
        if self.on_policy is not None:
            extra["on_policy"] = on_policy_figures(window)
        self.telemetry.emit("step", self.state.step, epoch=self.state.step / self.steps_per_epoch,
                            samples=self.state.samples, loss=values, alpha=alpha,
                            temperature=self.cfg.distillation.temperature, lr=lr, grad_norm=gn, rate=rate,
                            time=step_time, mem=self.peaks.snapshot(), gpu=self.gpu.read() if self.gpu else None,
                            memory=self.peaks.epoch_peaks(), **extra)
        if self.cfg.telemetry.report_to:
            scalars = {f"train/{k}": v for k, v in values.items() if v is not None}
            scalars.update({"train/lr": lr, "train/alpha": alpha})
            self.acc.log(scalars, step=self.state.step)
        postfix = {"loss": f"{values['total']:.3f}"}
        if rate:
            unit = self.objective.unit
            postfix[f"{unit}/s"] = f"{rate[f'{unit}_per_s']:.0f}"
        bar.set_postfix(postfix, refresh=False)
        window.reset(now)

    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, role: str) -> dict[str, Any]:
        started = time.perf_counter()
        self.student.eval()
        self.peaks.enter("eval")
        scorer = self.objective.scorer(self.acc, self.targets is not None, self.alpha())
        for batch in self._ahead(self.eval_dls[role], self.eval_dls[role], role):
            self._add_features(batch)
            with self.acc.autocast():
                t_logits = self.targets.logits(batch, role) if self.targets is not None else None
                s_logits = student_logits(self.student, batch, self.run.input_key)
            scorer.add(s_logits, t_logits, batch)
        self.student.train()
        metrics = scorer.metrics()
        split = self.cfg.data.split_names()[role]
        self.telemetry.emit("eval", self.state.step, split=split, metrics=metrics, samples=scorer.samples(),
                            duration_s=time.perf_counter() - started)
        if self.cfg.telemetry.report_to:
            self.acc.log({f"{role}/{k}": v for k, v in metrics.items() if v is not None}, step=self.state.step)
        shown = ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in metrics.items()
                          if v is not None)
        if self.acc.is_main_process:
            tqdm.write(f"[step {self.state.step}] {split}: {shown}")
        self.metrics[role] = metrics
        return metrics

    def save_checkpoint(self) -> Path:
        """accelerator.save_state into a .tmp folder, renamed into place once every process is done."""
        started = time.perf_counter()
        final = self.output_dir / CHECKPOINT_DIR / f"step_{self.state.step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            plain_modes(tmp)  # Accelerate saves weights with safetensors, which makes them 0600
            write_manifest(tmp, self.state.step)  # every process has written its files
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for stale in list_checkpoints(self.output_dir)[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(stale, ignore_errors=True)
            self.telemetry.emit("checkpoint", self.state.step, path=str(final), kind="periodic",
                                duration_s=time.perf_counter() - started)
        self.acc.wait_for_everyone()
        return final

    def _finish(self) -> None:
        for role in self.eval_dls:
            self.evaluate(role)
        self.acc.wait_for_everyone()
        started = time.perf_counter()
        # Under FSDP or DeepSpeed each process may hold a shard: gathering the whole weights is a
        # collective every process joins. Elsewhere the unwrapped model's own weights are saved.
        sharded = self.acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        state = self.acc.get_state_dict(self.student) if sharded else None
        if self.acc.is_main_process:
            processor = self.run.processor if self.run.input_key == "inputs" else None  # the student's own inputs
            model = self.acc.unwrap_model(self.student, keep_torch_compile=False)
            path = save_student(model, self.output_dir / STUDENT_DIR, self.run.data.label_names, processor,
                                state_dict=state)
            self.acc.print(f"Saved the student to {path}")
            onnx = export_saved_student(path, processor, self.cfg, self.run.data, say=self.acc.print) \
                if self.cfg.export.onnx else None
            self.telemetry.emit("checkpoint", self.state.step, path=str(path), kind="final",
                                duration_s=time.perf_counter() - started, **({"onnx": asdict(onnx)} if onnx else {}))
        # Every process leaves training together: a rank that returns while the main process is still
        # saving tears the process group down under it.
        self.acc.wait_for_everyone()


def on_policy_figures(window: Window) -> dict[str, Any]:
    """The step event's `on_policy` figures over the log window (this process): the share of its
    micro-batches the student wrote, sampled tokens per second of sampling, mean sample length, and
    the seconds spent sampling and waiting for the teacher's scores."""
    op = window.on_policy
    return {"batches": op["batches"], "share": op["batches"] / max(1, window.micro_batches),
            "generated_tokens": op["generated"],
            "generated_tokens_per_s": op["generated"] / op["generate_s"] if op["generate_s"] > 0 else None,
            "mean_sample_tokens": op["generated"] / op["rows"] if op["rows"] else None,
            "generate_s": op["generate_s"], "score_s": op["score_s"],
            "score_s_per_batch": op["score_s"] / op["batches"] if op["batches"] else None}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
