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


def test_the_demo_table_shows_each_student_over_seeds_and_whether_the_gain_is_noise(capsys, monkeypatch):
    import kd.demo.__main__ as demo

    accs = {"t": 0.98, "k0": 0.93, "k1": 0.95, "k2": 0.91, "b0": 0.92, "b1": 0.90, "b2": 0.94}
    monkeypatch.setattr(demo, "summarise", lambda path: {"acc": accs[path.name], "f1": accs[path.name],
                                                         "agreement": 0.9, "params": 1000 if path.name == "t" else 100,
                                                         "rate": 50.0})
    runs = [("teacher", [Path("t")]), ("KD", [Path("k0"), Path("k1"), Path("k2")]),
            ("baseline", [Path("b0"), Path("b1"), Path("b2")])]
    demo.print_table(runs, "held-out voices")
    out = capsys.readouterr().out
    assert "test acc (3 seeds)" in out and "98.0%" in out
    assert "93.0% (91.0-95.0)" in out and "92.0% (90.0-94.0)" in out  # mean (min-max)
    assert "KD gain over the baseline: +1.0 points (per seed +1.0, +5.0, -3.0" in out
    assert "spread between seeds is up to 4.0 points, so this gain is within the noise" in out
    assert "keeps 95% of its accuracy" in out
