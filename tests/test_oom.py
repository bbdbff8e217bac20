"""Out-of-memory recovery, driven by fault injection (KD_FAULT_OOM_AT_STEP), on the CPU."""

from __future__ import annotations

from collections import Counter

import pytest

from kd.build import build_run
from kd.config import config_from_dict
from kd.oom import smaller_divisor
from kd.telemetry import read_events
from kd.trainer import Trainer

from conftest import run_cli, tiny_config, write_config


def fingerprint(waveform) -> tuple:
    return tuple(round(float(w[:64].abs().sum()), 4) for w in waveform)


def recorded_run(cfg: dict, monkeypatch) -> tuple[Trainer, dict[int, list]]:
    """Fit in-process, recording which samples each optimizer step finally trained on."""
    trainer = Trainer(build_run(config_from_dict(cfg)))
    seen: dict[int, list] = {}
    micro_step, recover = trainer._micro_step, trainer._recover_from_oom

    def recording_micro_step(batch):
        clean = fingerprint(batch["waveform"])  # before augmentation replaces the waveform
        result = micro_step(batch)
        seen.setdefault(trainer.state.step + 1, []).extend(clean)
        return result

    def forgetting_recover(message, phase):
        seen.pop(trainer.state.step + 1, None)  # the failed attempt's samples are trained again
        return recover(message, phase)

    monkeypatch.setattr(trainer, "_micro_step", recording_micro_step)
    monkeypatch.setattr(trainer, "_recover_from_oom", forgetting_recover)
    trainer.fit()
    return trainer, seen


@pytest.mark.parametrize(("grad_accum", "phase", "augment"), [
    (1, "backward", False), (2, "teacher_forward", False), (2, "optimizer", False), (2, "student_forward", True)])
def test_shrink_retries_the_step_with_the_same_samples(tmp_path, tone_data, tiny_teacher, monkeypatch,
                                                       grad_accum, phase, augment):
    monkeypatch.setenv("KD_FAULT_OOM_AT_STEP", "2")
    monkeypatch.setenv("KD_FAULT_OOM_PHASE", phase)
    steps_per_epoch = 6 // grad_accum
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run",
                      train={"grad_accum": grad_accum, "max_steps": 2 * steps_per_epoch, "eval_every": 100},
                      telemetry={"log_every": 1}, augment={"enabled": augment, "mixup_alpha": 0.4})
    trainer, seen = recorded_run(cfg, monkeypatch)
    events = read_events(tmp_path / "run")
    ooms = [e for e in events if e["type"] == "oom"]
    assert len(ooms) == 1
    oom = ooms[0]
    assert (oom["phase"], oom["action"], oom["recovered"]) == (phase, "shrink", True)
    assert (oom["micro_batch"], oom["grad_accum"]) == (4, grad_accum)
    assert (oom["new_micro_batch"], oom["new_grad_accum"]) == (2, 2 * grad_accum)
    assert oom["advice"] and "KD_FAULT_OOM_AT_STEP" in oom["message"]
    # The effective batch is unchanged: every optimizer step still consumes 4 * grad_accum samples.
    steps = [e for e in events if e["type"] == "step"]
    assert [e["samples"] for e in steps] == [4 * grad_accum * (i + 1) for i in range(2 * steps_per_epoch)]
    # Every training sample is used exactly once per epoch, the retried step included.
    for epoch in range(2):
        used = [f for step in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1)
                for f in seen[step]]
        assert len(used) == 24 and len(set(used)) == 24, Counter(used).most_common(3)
    assert events[-1]["status"] == "completed"
    assert (trainer.state.micro_batch, trainer.state.grad_accum) == (2, 2 * grad_accum)


@pytest.mark.launches
def test_fail_mode_checkpoints_and_stops_with_advice(tmp_path, tone_data, tiny_teacher):
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", memory={"on_oom": "fail"},
                      train={"max_steps": 4, "eval_every": 100})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))], env={"KD_FAULT_OOM_AT_STEP": "3"})
    assert result.returncode == 2
    message = result.stderr
    assert "out of memory in backward at step 3 with micro-batch 4 (memory.on_oom is 'fail')" in message
    assert "step_0000002" in message and "--resume" in message and "train.batch_size=2" in message
    assert "Traceback" not in message
    assert (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()
    events = read_events(tmp_path / "run")
    oom = next(e for e in events if e["type"] == "oom")
    assert oom["action"] == "fail" and oom["recovered"] is False and oom["new_micro_batch"] is None
    assert events[-1]["type"] == "run_end" and events[-1]["status"] == "oom"


@pytest.mark.launches
def test_minimum_micro_batch_stops_shrinking(tmp_path, tone_data, tiny_teacher):
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", memory={"min_micro_batch": 4},
                      train={"max_steps": 3, "eval_every": 100})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))], env={"KD_FAULT_OOM_AT_STEP": "1"})
    assert result.returncode == 2
    assert "cannot shrink below memory.min_micro_batch=4" in result.stderr


@pytest.mark.launches
def test_resume_after_a_shrink_keeps_the_smaller_sizes(tmp_path, tone_data, tiny_teacher):
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run",
                      train={"max_steps": 6, "checkpoint_every": 3, "keep_checkpoints": 5, "eval_every": 100})
    path = write_config(tmp_path / "c.yaml", cfg)
    first = run_cli(["--config", str(path)], env={"KD_FAULT_OOM_AT_STEP": "2"})
    assert first.returncode == 0, first.stderr[-2000:]
    assert "retrying the step with micro-batch 2 x accumulation 2" in first.stdout
    full = {e["step"]: e["loss"]["total"] for e in read_events(tmp_path / "run") if e["type"] == "step"}
    resumed = run_cli(["--config", str(path), "--resume", str(tmp_path / "run" / "checkpoints" / "step_0000003")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = read_events(tmp_path / "run")
    start = [e for e in events if e["type"] == "run_start"][-1]
    assert (start["plan"]["micro_batch"], start["plan"]["grad_accum"], start["plan"]["effective_batch"]) == (2, 2, 4)
    after = [e for e in events[events.index(start):] if e["type"] == "step"]
    assert [e["step"] for e in after] == [4, 5, 6]
    assert all(e["loss"]["total"] == pytest.approx(full[e["step"]], rel=1e-5) for e in after)


def test_smaller_divisor_keeps_positions_exact():
    assert [smaller_divisor(n) for n in (1, 2, 3, 4, 6, 7, 9, 64)] == [0, 1, 1, 2, 3, 1, 3, 32]
