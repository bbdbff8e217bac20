"""The text and image examples (`make demo-text`, `make demo-image`) end to end, small: the data and the
teacher's starting folder written offline, then the shipped configs as they are, each step's export
the next step's teacher, with overrides only for where things are and how many steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.demo.image_data import build_image_dataset
from kd.demo.text_data import build_text_dataset
from kd.telemetry import read_events

from conftest import run_cli

pytestmark = pytest.mark.launches  # every test here starts train_kd.py in a subprocess

FEW = ["train.epochs=null", "train.max_steps=3", "train.eval_every=100", "telemetry.log_every=1"]


def run_three(prefix: str, where: list[str], teacher_start: str, tmp_path: Path) -> dict[str, list[dict]]:
    """Teacher, KD student and baseline of configs/<prefix>_*.yaml; returns each run's telemetry."""
    teacher = tmp_path / "teacher"
    steps = {"teacher": [f"student.config={teacher_start}"],
             "kd": [f"teacher.model={teacher / 'student'}"],
             "baseline": [f"teacher.model={teacher / 'student'}"]}
    events = {}
    for step, extra in steps.items():
        out = tmp_path / step
        result = run_cli(["--config", f"configs/{prefix}_{step}.yaml", *where, *FEW, *extra, f"run.output_dir={out}"])
        assert result.returncode == 0, f"{step}: {result.stderr[-3000:]}"
        events[step] = read_events(out)
        assert events[step][-1]["status"] == "completed"
    return events


def test_the_text_example_trains_a_teacher_distils_it_and_trains_its_baseline(tmp_path):
    data = build_text_dataset(tmp_path / "text", {"train": 12, "validation": 4, "test": 4})
    files = f"{{train: {data / 'train.csv'}, validation: {data / 'validation.csv'}, test: {data / 'test.csv'}}}"
    events = run_three("text", [f"data.data_files={files}"], str(data / "bert-start"), tmp_path)
    labels = ["food", "sport", "travel", "weather"]
    assert all(run[0]["labels"] == labels for run in events.values())
    assert {p.name for p in (tmp_path / "teacher" / "student").iterdir()} >= {"config.json", "model.safetensors",
                                                                             "tokenizer.json"}
    kd = events["kd"]
    assert kd[0]["params"]["student"] < kd[0]["params"]["teacher"]
    tests = [e for e in kd if e["type"] == "eval" and e["split"] == "test"]
    assert tests and tests[-1]["metrics"]["agreement"] is not None and tests[-1]["samples"] == 16
    final = [e for e in kd if e["type"] == "checkpoint" and e["kind"] == "final"][0]
    assert final["onnx"]["checked"] >= 1  # the student ships as ONNX, checked against PyTorch
    assert all(e["loss"]["kd"] == 0.0 for e in events["baseline"] if e["type"] == "step")


def test_the_image_example_trains_a_teacher_distils_it_and_trains_its_baseline(tmp_path):
    data = build_image_dataset(tmp_path / "images", {"train": 8, "validation": 3, "test": 3})
    events = run_three("image", [f"data.data_dir={data}"], str(data / "vit-start"), tmp_path)
    assert all(run[0]["labels"] == ["circle", "cross", "square", "triangle"] for run in events.values())
    assert all(run[0]["config"]["data"]["modality"] == "image" for run in events.values())  # told by imagefolder
    config = json.loads((tmp_path / "kd" / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert (tmp_path / "kd" / "student" / "preprocessor_config.json").is_file()
