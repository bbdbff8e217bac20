"""ONNX export: checked against PyTorch at export, the metadata a deployment reads, int8, the command."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.export.detect import ort_session
from kd.export.onnx import ATOL, ExportError, check_logits
from kd.export.student import load_student
from kd.telemetry import read_events

from conftest import TONE_LABELS, run_cli, tiny_config, umask_mode, write_config

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[1]


def metadata(path: Path) -> dict[str, str]:
    return dict(ort_session(path).get_modelmeta().custom_metadata_map)


def noise_clips(n: int, rate: int = 16000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, (n, rate)).astype(np.float32)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, tone_data):
    """A supervised log-mel CNN run with export.onnx and export.int8 on."""
    tmp = tmp_path_factory.mktemp("onnx")
    cfg = tiny_config(tone_data, None, tmp / "run", train={"max_steps": 4},
                      export={"onnx": True, "int8": True, "check_samples": 4, "calibration_samples": 8})
    result = run_cli(["--config", str(write_config(tmp / "c.yaml", cfg))])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", result


@pytest.mark.launches
def test_export_writes_a_checked_waveform_model_with_its_metadata(exported_run):
    run_dir, result = exported_run
    student = run_dir / "student"
    assert {"model.safetensors", "config.json", "model.onnx", "model.int8.onnx"} <= {p.name for p in student.iterdir()}
    assert not list(student.glob(".*"))  # no temporary files left behind
    for item in [student, *student.iterdir()]:  # what a plain open() / mkdir() gives, so others can read it
        assert stat.S_IMODE(item.stat().st_mode) == umask_mode(item), item
    meta = metadata(student / "model.onnx")
    assert json.loads(meta["kd.labels"]) == list(TONE_LABELS)
    assert meta["kd.sample_rate"] == "16000" and meta["kd.window_samples"] == "16000"
    assert meta["kd.hop_samples"] == "1600" and meta["kd.modality"] == "audio"
    assert "checking it on 4 validation inputs" in result.stdout and "logits match PyTorch on 4 inputs" in result.stdout

    model, _ = load_student(student)
    sess = ort_session(student / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["waveform"]
    for batch, samples in ((1, 16000), (5, 16000), (2, 8000)):  # dynamic batch and clip length
        clips = noise_clips(batch, samples)
        got = sess.run(["logits"], {"waveform": clips})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(clips)).numpy()
        assert np.abs(got - want).max() <= ATOL


@pytest.mark.launches
def test_export_report_is_in_the_final_checkpoint_event(exported_run):
    run_dir, result = exported_run
    final = [e for e in read_events(run_dir / "telemetry.jsonl") if e["type"] == "checkpoint" and e["kind"] == "final"]
    report = final[0]["onnx"]
    assert report["checked"] == 4 and 0 <= report["max_abs_diff"] <= ATOL
    assert 0 <= report["accuracy"] <= 1 and 0 <= report["int8_accuracy"] <= 1
    assert report["int8_size_bytes"] < report["size_bytes"]
    assert f"test accuracy {100 * report['int8_accuracy']:.2f}% (fp32 {100 * report['accuracy']:.2f}%)" in result.stdout


@pytest.mark.launches
def test_int8_model_keeps_the_front_end_in_float_and_mostly_agrees(exported_run):
    import onnx

    student = exported_run[0] / "student"
    graph = onnx.load(str(student / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "STFT" in ops
    assert metadata(student / "model.int8.onnx") == metadata(student / "model.onnx")
    clips = noise_clips(16)
    fp32 = ort_session(student / "model.onnx").run(["logits"], {"waveform": clips})[0]
    int8 = ort_session(student / "model.int8.onnx").run(["logits"], {"waveform": clips})[0]
    assert np.abs(int8 - fp32).max() < 0.5 * np.abs(fp32).max()  # quantised, not broken


def test_a_mismatch_fails_with_the_largest_difference():
    want = np.array([[1.0, 2.0, 3.0], [0.5, 0.1, 0.2]], dtype=np.float32)
    assert check_logits(want + 5e-5, want) == pytest.approx(5e-5, rel=1e-2)
    with pytest.raises(ExportError, match=r"differ from PyTorch's by up to 0\.003 \(at \(1, 2\)"):
        check_logits(want + np.array([[0, 0, 0], [0, 0, 3e-3]], dtype=np.float32), want)
    with pytest.raises(ExportError, match="different labels on 1 of 2"):
        check_logits(np.array([[1.0, 2.0, 3.0], [1.00002, 1.0, 0.2]], dtype=np.float32),  # a near-tie, within ATOL
                     np.array([[1.0, 2.0, 3.0], [1.0, 1.00001, 0.2]], dtype=np.float32))
    with pytest.raises(ExportError, match="shape"):
        check_logits(want[:1], want)


@pytest.mark.launches
def test_a_failed_check_writes_nothing(exported_run, tmp_path, monkeypatch):
    import kd.export.onnx as onnx_export

    student = tmp_path / "student"
    model, labels = load_student(exported_run[0] / "student")
    student.mkdir()
    monkeypatch.setattr(onnx_export, "run_onnx", lambda sess, inputs: sess.run(["logits"], inputs)[0] + 1e-2)
    batch = {"waveform": torch.from_numpy(noise_clips(3)), "labels": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(ExportError, match="by up to 0.01"):
        onnx_export.export_onnx(model, None, batch, student, metadata={"kd.labels": labels})
    assert list(student.iterdir()) == []


@pytest.mark.launches
def test_command_exports_an_existing_student(exported_run, tmp_path):
    run_dir = exported_run[0]
    (run_dir / "student" / "model.onnx").unlink()
    result = subprocess.run([sys.executable, "-m", "kd.export.onnx", str(run_dir / "student")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "student" / "model.onnx").is_file() and "logits match PyTorch" in result.stdout

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    for name in ("config.json", "model.safetensors"):
        (lonely / name).write_bytes((run_dir / "student" / name).read_bytes())
    result = subprocess.run([sys.executable, "-m", "kd.export.onnx", str(lonely)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/config.yaml not found: pass --config with the config of the run that trained {lonely} "
        "(its data is what the export is checked on)"]


def test_int8_needs_onnx_and_a_logmel_student(tmp_path, tone_data, tiny_teacher):
    from kd.config import config_from_dict
    from kd.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config_from_dict(tiny_config(tone_data, tiny_teacher, tmp_path, export={"int8": True},
                                     student={"type": "hf"}))
    text = str(info.value)
    assert "export.int8: True is not allowed; needs export.onnx: true" in text
    assert "int8 quantisation is available for student.type: logmel_cnn, not 'hf'" in text
