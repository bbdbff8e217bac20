"""End to end: real tiny runs through the CLI, with their telemetry read back."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd.config import load_config
from kd.errors import KDError
from kd.export.student import load_student
from kd.telemetry import COMMON_FIELDS, EVENT_FIELDS, read_events

from conftest import (
    ROOT,
    TONE_LABELS,
    accelerate_launch,
    kill_process_tree,
    once_more_if_hung,
    run_cli,
    tiny_config,
    umask_mode,
    write_config,
)

pytestmark = pytest.mark.launches  # every test here starts train_kd.py in a subprocess


def strict_lines(path: Path) -> list[dict]:
    """Parse every line as strict JSON (NaN/Infinity are not JSON and must have become null)."""
    def refuse(token):
        raise AssertionError(f"non-JSON constant {token} in telemetry")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def check_schema(events: list[dict]) -> None:
    for i, event in enumerate(events):
        for key in COMMON_FIELDS:
            assert key in event, f"{event['type']} lacks {key}"
        for key in EVENT_FIELDS[event["type"]]:
            assert key in event, f"{event['type']} lacks {key}"
        assert event["v"] == 1 and event["seq"] == i


@pytest.fixture(scope="module")
def launched_run(tmp_path_factory, tone_data, tiny_teacher):
    """One distillation run under `accelerate launch`, shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("launched")
    cfg = tiny_config(tone_data, tiny_teacher, tmp / "run", train={"max_steps": 6, "eval_every": 3,
                                                                    "checkpoint_every": 3},
                      telemetry={"report_to": ["tensorboard"]})
    result = run_cli(["--config", str(write_config(tmp / "c.yaml", cfg))], launcher=accelerate_launch(1))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", result


def test_launch_writes_schema_v1_telemetry(launched_run):
    run_dir, _ = launched_run
    events = strict_lines(run_dir / "telemetry.jsonl")
    check_schema(events)
    types = [e["type"] for e in events]
    assert types[0] == "run_start" and types[-1] == "run_end" and types.count("run_start") == 1
    assert len({e["run_id"] for e in events}) == 1
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert [e["samples"] for e in steps] == [4, 8, 12, 16, 20, 24]
    for e in steps:
        assert set(e["loss"]) == {"total", "ce", "kd"} and all(v is not None for v in e["loss"].values())
        assert e["loss"]["total"] == pytest.approx(0.5 * e["loss"]["ce"] + 0.5 * e["loss"]["kd"], rel=1e-4)
        assert e["alpha"] == 0.5 and e["temperature"] == 2.0 and e["mem"] is None
    start = events[0]
    assert start["params"]["teacher"] > start["params"]["student"] > 0
    assert start["plan"] == {"total_steps": 6, "micro_batch": 4, "grad_accum": 1, "effective_batch": 4,
                             "vram_budget_bytes": 5_500_000_000, "steps_per_epoch": 6}
    assert start["env"]["world_size"] == 1 and start["env"]["torch"] == torch.__version__
    evals = [e for e in events if e["type"] == "eval"]
    assert [(e["step"], e["split"]) for e in evals] == [(3, "validation"), (6, "validation"), (6, "test")]
    assert all(e["samples"] == 12 for e in evals)
    assert set(evals[0]["metrics"]) == {"student_acc", "student_f1", "teacher_acc", "agreement", "loss"}
    kinds = [(e["kind"], e["step"]) for e in events if e["type"] == "checkpoint"]
    assert kinds == [("periodic", 3), ("periodic", 6), ("final", 6)]
    end = events[-1]
    assert end["status"] == "completed" and end["error"] is None
    assert end["metrics"]["test"]["student_acc"] == evals[-1]["metrics"]["student_acc"]


def test_launch_outputs_resolved_config_checkpoints_and_student(launched_run, tone_data):
    run_dir, result = launched_run
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.train.max_steps == 6 and cfg.run.output_dir == str(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    model, labels = load_student(run_dir / "student")
    assert labels == TONE_LABELS
    assert model(torch.randn(2, 16000)).shape == (2, 3)
    assert "Parameters: teacher" in result.stdout and "student" in result.stdout


def test_everything_a_run_writes_has_the_modes_the_umask_gives(launched_run):
    """Another user, or a container, can read the run's student, checkpoints and telemetry as far as
    the umask allows (safetensors alone would make the weights 0600)."""
    run_dir, _ = launched_run
    written = [run_dir, *run_dir.rglob("*")]
    assert any(p.name == "model.safetensors" and p.parent.parent.name == "checkpoints" for p in written)
    wrong = {str(p.relative_to(run_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written
             if stat.S_IMODE(p.stat().st_mode) != umask_mode(p)}
    assert not wrong


@pytest.mark.parametrize("augment", [False, True])
def test_resume_continues_with_the_same_losses(tmp_path, tone_data, tiny_teacher, augment):
    """Checkpoint mid-epoch with accumulation and dropout (and augmentation with mixup: its random
    draws too); the resumed run logs the same losses."""
    common = {"train": {"max_steps": 7, "grad_accum": 2, "checkpoint_every": 2, "keep_checkpoints": 5,
                        "eval_every": 100},
              "student": {"dropout": 0.3}, "augment": {"enabled": augment, "mixup_alpha": 0.4}}
    full = tiny_config(tone_data, tiny_teacher, tmp_path / "full", **common)
    result = run_cli(["--config", str(write_config(tmp_path / "full.yaml", full))])
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "full" / "checkpoints"
    assert (ckpt / "step_0000002").is_dir()
    part = tiny_config(tone_data, tiny_teacher, tmp_path / "part", **common)
    # Keep step 2 only: resume must pick it as the newest, then continue past the epoch boundary (step 3).
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    (ckpt / "step_0000002").rename(tmp_path / "part" / "checkpoints" / "step_0000002")
    result = run_cli(["--config", str(write_config(tmp_path / "part.yaml", part)), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stdout

    def losses(run: str) -> dict[int, float]:
        return {e["step"]: e["loss"]["total"] for e in read_events(tmp_path / run) if e["type"] == "step"}

    full_losses, resumed = losses("full"), losses("part")
    assert sorted(resumed) == [3, 4, 5, 6, 7]
    for step in resumed:
        assert resumed[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6), step
    samples = [e["samples"] for e in read_events(tmp_path / "part") if e["type"] == "step"]
    assert samples == [24, 32, 40, 48, 56]  # 8 samples per step, counted on from the checkpoint


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tone_data, tiny_teacher):
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run")
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg)), "--resume"])
    assert result.returncode == 2
    assert "--resume: no checkpoint found" in result.stderr and "Traceback" not in result.stderr


def test_two_cpu_processes_shard_data_and_write_telemetry_once(tmp_path, tone_data, tiny_teacher):
    # It takes ~12 s on 2 cores; a hung launch is retried once (conftest.once_more_if_hung).
    def attempt(n):
        cfg = tiny_config(tone_data, tiny_teacher, tmp_path / f"run{n}", train={"max_steps": 3, "eval_every": 100})
        return run_cli(["--config", str(write_config(tmp_path / f"c{n}.yaml", cfg))],
                       launcher=accelerate_launch(2), env={"ACCELERATE_USE_CPU": "true"}, timeout=150)

    n, result = once_more_if_hung(attempt)
    run_dir = tmp_path / f"run{n}"
    assert result.returncode == 0, result.stderr[-3000:]
    events = strict_lines(run_dir / "telemetry.jsonl")
    check_schema(events)
    assert [e["type"] for e in events].count("run_start") == 1
    assert events[0]["env"]["world_size"] == 2
    assert events[0]["plan"]["effective_batch"] == 8 and events[0]["plan"]["steps_per_epoch"] == 3
    assert [e["samples"] for e in events if e["type"] == "step"] == [8, 16, 24]
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["samples"] for e in evals] == [12, 12]  # gathered from both processes, no duplicates


def test_supervised_hf_model_with_batch_of_one(tmp_path, tone_data, tiny_teacher):
    """distillation.enabled: false trains a transformers model on labels (how the demo trains its teacher)."""
    cfg = tiny_config(tone_data, None, tmp_path / "run", student={"type": "hf", "config": str(tiny_teacher)},
                      train={"batch_size": 1, "max_steps": 3, "eval_every": 100}, data={"max_eval_samples": 2},
                      export={"onnx": True, "check_samples": 2})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "run")
    assert_onnx_export(events, ["waveform"])  # wav2vec2's input normalisation inside the graph
    steps = [e for e in events if e["type"] == "step"]
    assert len(steps) == 3 and all(e["loss"]["kd"] == 0.0 and e["alpha"] == 0.0 for e in steps)
    assert events[0]["params"]["teacher"] is None
    model, labels = load_student(tmp_path / "run" / "student")
    assert labels == TONE_LABELS and (tmp_path / "run" / "student" / "preprocessor_config.json").is_file()


def test_nan_teacher_is_detected_and_named(tmp_path, tone_data, tiny_teacher):
    broken = tmp_path / "nan_teacher"
    broken.mkdir()
    for f in tiny_teacher.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    weights["classifier.weight"] = torch.full_like(weights["classifier.weight"], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    cfg = tiny_config(tone_data, broken, tmp_path / "run")
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 2
    assert "non-finite loss at step 1" in result.stderr and "kd=nan" in result.stderr and "ce=" not in result.stderr
    assert "Traceback" not in result.stderr
    end = read_events(tmp_path / "run")[-1]
    assert end["type"] == "run_end" and end["status"] == "failed" and "kd=nan" in end["error"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"distillation": {"alpha": 2}}, "distillation.alpha: 2"),
        ({"run": {"gpu_only": True}}, "run.gpu_only is true but no CUDA GPU"),
        ({"train": {"mixed_precision": "fp16"}}, "'fp16' needs a CUDA GPU"),
        ({"teacher": {"model": "/no/such/teacher"}}, "teacher.model: no such folder or file: /no/such/teacher"),
        ({"data": {"test_split": "holdout"}}, "data.test_split='holdout'"),
        ({"telemetry": {"report_to": ["aim"]}}, "telemetry.report_to: 'aim' is not installed"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, tone_data, tiny_teacher, change, fragment):
    if torch.cuda.is_available() and "CUDA" in fragment:
        pytest.skip("this machine has a GPU")
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", **change)
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "telemetry.jsonl").exists()  # nothing started, nothing half-written


def train_hf_student(tmp_path: Path, data: dict, teacher: Path, layer: int) -> list[dict]:
    """Three steps of a one-layer transformers student initialised from teacher layer `layer`."""
    cfg = {
        "run": {"name": data["modality"], "output_dir": str(tmp_path / "run")},
        "data": {**data, "num_workers": 0},
        "teacher": {"model": str(teacher)},
        "student": {"type": "hf", "init_from_teacher": True, "teacher_layers": [layer]},
        "train": {"batch_size": 4, "epochs": None, "max_steps": 3, "eval_every": 100},
        "telemetry": {"log_every": 1},
        "export": {"onnx": True, "check_samples": 4},
    }
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 0, result.stderr[-3000:]
    return read_events(tmp_path / "run")


def assert_onnx_export(events: list[dict], input_names: list[str]) -> None:
    """export.onnx wrote a model taking `input_names`, checked against PyTorch (kd/export/onnx.py)."""
    from kd.export.detect import ort_session
    from kd.export.onnx import ATOL

    report = [e for e in events if e["type"] == "checkpoint" and e["kind"] == "final"][0]["onnx"]
    assert report["checked"] >= 1 and report["max_abs_diff"] <= ATOL and 0 <= report["accuracy"] <= 1
    assert [i.name for i in ort_session(report["path"]).get_inputs()] == input_names


def test_text_classification_uses_the_same_code(tmp_path):
    """csv data, a BERT teacher, and a 1-layer BERT student initialised from teacher layer 1."""
    from kd.synthetic import save_tiny_bert, write_sentiment_csv

    data = write_sentiment_csv(tmp_path / "sentiment")
    teacher = save_tiny_bert(tmp_path / "bert", ["neg", "pos"])
    events = train_hf_student(tmp_path, {"dataset": "csv", "data_files": {"train": str(data / "train.csv"),
                                                                          "validation": str(data / "validation.csv")},
                                         "modality": "text", "input_column": "text"}, teacher, layer=1)
    start = events[0]
    assert start["labels"] == ["neg", "pos"] and start["params"]["student"] < start["params"]["teacher"]
    assert events[-1]["status"] == "completed" and events[-2]["kind"] == "final"
    model, labels = load_student(tmp_path / "run" / "student")
    assert model.config.num_hidden_layers == 1 and labels == ["neg", "pos"]
    assert (tmp_path / "run" / "student" / "tokenizer.json").is_file()
    assert_onnx_export(events, ["input_ids", "token_type_ids", "attention_mask"])


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes(tmp_path, tone_data, tiny_teacher):
    import signal
    import time

    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", train={"max_steps": 100000, "eval_every": 10**6})
    config = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_kd.py"), "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    telemetry = tmp_path / "run" / "telemetry.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(e["type"] == "step" for e in read_events(telemetry)):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        kill_process_tree(proc.pid)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopping after this step" in stderr and "Traceback" not in stderr
    events = read_events(telemetry)
    end = events[-1]
    assert end["type"] == "run_end" and end["status"] == "interrupted" and end["error"]
    saved = [e for e in events if e["type"] == "checkpoint"]
    assert saved and saved[-1]["step"] == end["step"]  # the step it stopped after, nothing lost
    override = f"train.max_steps={end['step'] + 2}"
    mistaken = run_cli(["--config", str(config), "--resume", override])
    assert mistaken.returncode == 2 and "looks like a config override" in mistaken.stderr
    resumed = run_cli(["--config", str(config), "--resume", "latest", override])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = read_events(telemetry)
    start = [e for e in again if e["type"] == "run_start"][-1]
    assert start["resumed_from"].endswith(f"step_{end['step']:07d}") and again[-1]["status"] == "completed"


def test_image_classification_uses_the_same_code(tmp_path):
    """imagefolder data, a ViT teacher, and a 1-layer ViT student initialised from teacher layer 0."""
    from kd.synthetic import save_tiny_vit, write_color_images

    data = write_color_images(tmp_path / "images")
    teacher = save_tiny_vit(tmp_path / "vit", ["blue", "red"])
    events = train_hf_student(tmp_path, {"dataset": "imagefolder", "data_dir": str(data), "modality": "image",
                                         "input_column": "image"}, teacher, layer=0)
    assert events[0]["labels"] == ["blue", "red"] and events[-1]["status"] == "completed"
    evals = [e for e in events if e["type"] == "eval"]
    assert evals and evals[-1]["samples"] == 6 and evals[-1]["metrics"]["teacher_acc"] is not None
    model, labels = load_student(tmp_path / "run" / "student")
    assert model.config.num_hidden_layers == 1 and labels == ["blue", "red"]
    assert_onnx_export(events, ["pixel_values"])


def test_tensorboard_gets_losses_lr_alpha_and_eval_metrics_at_their_steps(launched_run):
    """telemetry.report_to: [tensorboard] end to end: the event file, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = launched_run
    files = sorted((run_dir / "tiny").glob("events.out.tfevents.*"))  # <output_dir>/<run.name>/ (hparams below it)
    assert len(files) == 1, files
    board = EventAccumulator(str(files[0]))
    board.Reload()
    scalars = {tag: {e.step: e.value for e in board.Scalars(tag)} for tag in board.Tags()["scalars"]}
    events = read_events(run_dir / "telemetry.jsonl")
    for e in (e for e in events if e["type"] == "step"):
        for part in ("total", "ce", "kd"):
            assert scalars[f"train/{part}"][e["step"]] == pytest.approx(e["loss"][part], rel=1e-5)
        assert scalars["train/lr"][e["step"]] == pytest.approx(e["lr"], rel=1e-5)
        assert scalars["train/alpha"][e["step"]] == pytest.approx(e["alpha"])
    evals = [e for e in events if e["type"] == "eval"]
    assert evals
    for e in evals:
        role = "test" if e["split"] == "test" else "eval"
        for name in ("student_acc", "teacher_acc", "agreement", "loss"):
            assert scalars[f"{role}/{name}"][e["step"]] == pytest.approx(e["metrics"][name], rel=1e-5)


@pytest.mark.parametrize("script", ["train_kd.py", "monitor_tui.py"])
def test_help_gives_the_summary_once_then_working_commands(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    summary = {"train_kd.py": "Distil a teacher's soft targets", "monitor_tui.py": "Live monitor of a kd training run"}
    assert result.stdout.count(summary[script]) == 1
    assert f"python {script} runs/kws-5gb" in result.stdout or f"accelerate launch {script} --config" in result.stdout


def test_sigterm_stops_every_process_after_one_step_and_the_checkpoint_resumes_exactly(tmp_path, tone_data,
                                                                                       tiny_teacher):
    """What a scheduler does before it kills a job: SIGTERM to the launcher of a two-process CPU run,
    mid-epoch. Both processes finish the same step, one checkpoint is written with run_end
    'interrupted', the run exits non-zero within seconds, and --resume logs the losses an
    uninterrupted run logs."""
    import signal
    import time

    from kd.stopping import AGREE_EVERY

    # A constant learning rate: the stopped run (10,000 steps planned) and the reference (a few) then
    # train alike up to the stop.
    common = {"train": {"max_steps": 10_000, "eval_every": 10**6, "checkpoint_every": None,
                        "lr_schedule": "constant", "warmup_ratio": 0.0},
              "student": {"dropout": 0.3}, "telemetry": {"log_every": 1}}
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", **common)
    config = write_config(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    cmd = accelerate_launch(2) + [str(ROOT / "train_kd.py"), "--config", str(config)]
    telemetry = tmp_path / "run" / "telemetry.jsonl"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.time() + 150
            while time.time() < deadline and not any(e["type"] == "step" for e in read_events(telemetry)):
                time.sleep(0.2)
            signalled = time.time()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            took = time.time() - signalled
        finally:
            kill_process_tree(proc.pid)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode != 0 and took < 30, stderr[-3000:]
    assert stderr.count("SIGTERM: stopping after this step with a checkpoint (then exiting)") == 2  # each process
    assert stderr.count("stopped by SIGTERM: the state after the last step is checkpointed") == 2
    # The only traceback is the launcher's own (torch's elastic agent re-raises the signal once its
    # workers are done), never one of the kit's processes.
    assert stderr.count("Traceback") == stderr.count("SignalException: Process") <= 1
    events = read_events(telemetry)
    end = events[-1]
    assert end["type"] == "run_end" and end["status"] == "interrupted" and "SIGTERM" in end["error"]
    stopped = end["step"]
    assert stopped % AGREE_EVERY == 0  # both processes stopped after the same, agreed step
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    assert [e["step"] for e in checkpoints] == [stopped]
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped:07d}").is_dir()

    # The same run uninterrupted, and the stopped one resumed: the same losses after the stop.
    more = {"train": {**common["train"], "max_steps": stopped + 3}}
    full = write_config(tmp_path / "full.yaml", tiny_config(tone_data, tiny_teacher, tmp_path / "full",
                                                            **{**common, **more}))
    resumed = write_config(tmp_path / "resumed.yaml", tiny_config(tone_data, tiny_teacher, tmp_path / "run",
                                                                  **{**common, **more}))
    for config_file, extra in ((full, []), (resumed, ["--resume"])):
        result = run_cli(["--config", str(config_file), *extra], launcher=accelerate_launch(2),
                         env={"ACCELERATE_USE_CPU": "true"}, timeout=150)
        assert result.returncode == 0, result.stderr[-3000:]

    def losses(run: str) -> dict[int, float]:
        steps = [e for e in read_events(tmp_path / run) if e["type"] == "step"]
        return {e["step"]: e["loss"]["total"] for e in steps}

    after = {s: v for s, v in losses("run").items() if s > stopped}
    assert sorted(after) == [stopped + 1, stopped + 2, stopped + 3]
    reference = losses("full")
    for step, value in after.items():
        assert value == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_newest_intact_one(tmp_path, tone_data,
                                                                                      tiny_teacher):
    """What a full disk or a kill during a copy leaves: a checkpoint file cut short or missing. --resume
    alone skips it (saying so) and continues from the newest intact checkpoint; named explicitly it
    is one line naming the file; a file at its size that does not read back is one line too."""
    from kd.checkpoints import MANIFEST, checkpoint_to_resume

    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run",
                      train={"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 5, "eval_every": 100})
    config = write_config(tmp_path / "c.yaml", cfg)
    assert run_cli(["--config", str(config)]).returncode == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    newest, middle, oldest = (checkpoints / f"step_{s:07d}" for s in (6, 4, 2))
    assert (newest / MANIFEST).is_file()
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])  # cut short

    # Two more steps, writing no checkpoint of their own (the damaged one stays as it is).
    more = write_config(tmp_path / "more.yaml", {**cfg, "train": {**cfg["train"], "max_steps": 8,
                                                                  "checkpoint_every": 100}})
    resumed = run_cli(["--config", str(more), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"Skipping damaged checkpoint step_0000006: {weights} has {size // 2} bytes, {size} were written"
            in resumed.stdout)
    assert f"Resumed from {middle} at step 4" in resumed.stdout

    explicit = run_cli(["--config", str(more), "--resume", str(newest)])
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    assert explicit.stderr.strip() == (f"error: --resume: checkpoint {newest} is damaged ({weights} has {size // 2} "
                                       f"bytes, {size} were written); resume from another one in {checkpoints}, "
                                       "or with --resume alone from the newest intact one")

    # A file at its recorded size whose content does not read back: one line too.
    optimizer = middle / "optimizer.bin"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)
    garbage = run_cli(["--config", str(more), "--resume", str(middle)])
    assert garbage.returncode == 2 and "Traceback" not in garbage.stderr
    last = garbage.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --resume: cannot load checkpoint {middle} (")
    assert last.endswith(f"it is damaged: resume from an older one in {checkpoints}")

    # Every checkpoint damaged (files missing): one line, nothing to resume from.
    for folder in (middle, oldest):
        (folder / "optimizer.bin").unlink()
    skipped = []
    with pytest.raises(KDError, match=r"every checkpoint in .* is damaged \(the newest: .*model.safetensors has "):
        checkpoint_to_resume("latest", tmp_path / "run", say=skipped.append)
    assert [line.split(":")[0] for line in skipped] == [f"Skipping damaged checkpoint step_{s:07d}" for s in (6, 4, 2)]


def test_a_run_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """A file where the folder should be (or above it): one line naming run.output_dir, before the
    teacher is loaded or the data prepared."""
    from types import SimpleNamespace

    from kd.run_folder import claim

    (tmp_path / "afile").write_text("x")
    for folder in (tmp_path / "afile", tmp_path / "afile" / "run"):
        cfg = SimpleNamespace(output_dir=str(folder), run=SimpleNamespace(overwrite=False))
        with pytest.raises(KDError, match=rf"^run.output_dir: {folder} is \(or lies under\) a file, not a folder"):
            claim(cfg, resuming=False)
    fresh = SimpleNamespace(output_dir=str(tmp_path / "a" / "b"), run=SimpleNamespace(overwrite=False))
    claim(fresh, resuming=False)
    assert (tmp_path / "a" / "b").is_dir()


def test_a_second_run_into_a_used_folder_is_refused_unless_resumed_or_told_to_start_over(tmp_path, tone_data,
                                                                                         tiny_teacher):
    cfg = tiny_config(tone_data, tiny_teacher, tmp_path / "run", train={"max_steps": 2, "eval_every": 100})
    config = write_config(tmp_path / "c.yaml", cfg)
    assert run_cli(["--config", str(config)]).returncode == 0
    before = (tmp_path / "run" / "telemetry.jsonl").read_text()

    again = run_cli(["--config", str(config)])
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip() == (f"error: run.output_dir: {tmp_path / 'run'} already holds a run (telemetry.jsonl, "
                                    "config.yaml, student); continue it with --resume, give this run "
                                    "another run.name, or set run.overwrite: true to start over (the previous "
                                    "run's files are removed)")
    assert (tmp_path / "run" / "telemetry.jsonl").read_text() == before  # nothing of the first run touched

    over = run_cli(["--config", str(config), "run.overwrite=true"])
    assert over.returncode == 0, over.stderr[-3000:]
    assert "run.overwrite: removed the previous run's telemetry.jsonl, config.yaml, student from" in over.stdout
    events = read_events(tmp_path / "run")
    assert [e["type"] for e in events].count("run_start") == 1 and events[-1]["status"] == "completed"
