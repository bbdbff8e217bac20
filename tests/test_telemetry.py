"""Telemetry v1 writer and tailer on temporary files (the monitor's reading rules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kd.telemetry import TelemetryTailer, TelemetryWriter, json_safe, read_events


def test_writer_emits_common_fields_and_flushes_each_line(tmp_path):
    writer = TelemetryWriter(tmp_path, run_id="r1")
    writer.emit("run_start", 0, config={}, env={}, params={}, plan={}, estimate=None)
    writer.emit("step", 1, loss={"total": 1.0})
    # Not closed yet: both lines must already be on disk.
    lines = (tmp_path / "telemetry.jsonl").read_text().splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [0, 1]
    first = json.loads(lines[0])
    assert {k: first[k] for k in ("v", "type", "run_id", "step")} == {"v": 1, "type": "run_start", "run_id": "r1",
                                                                     "step": 0}
    writer.close()


def test_nan_and_inf_become_null(tmp_path):
    writer = TelemetryWriter(tmp_path)
    writer.emit("step", 1, loss={"total": float("nan"), "ce": float("inf"), "kd": 0.5})
    writer.close()
    line = (tmp_path / "telemetry.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line)["loss"] == {"total": None, "ce": None, "kd": 0.5}


def test_disabled_writer_writes_nothing(tmp_path):
    writer = TelemetryWriter(tmp_path / "x", enabled=False)
    assert writer.emit("warning", None, code="c", message="m") is None
    assert not (tmp_path / "x").exists()


def test_unknown_event_type_is_a_bug(tmp_path):
    with pytest.raises(ValueError):
        TelemetryWriter(tmp_path).emit("stepp", 1)


def test_json_safe_converts_paths_and_tuples(tmp_path):
    assert json_safe({"p": tmp_path, "t": (1, float("nan"))}) == {"p": str(tmp_path), "t": [1, None]}


def test_tailer_reads_only_complete_lines(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    tail = TelemetryTailer(path)
    assert tail.read_new() == []  # file not there yet
    path.write_text('{"type": "step", "step": 1}\n{"type": "st')
    assert [e["step"] for e in tail.read_new()] == [1]
    with open(path, "a") as f:
        f.write('ep", "step": 2, "new_field": [1]}\n')
    events = tail.read_new()
    assert [e["step"] for e in events] == [2] and events[0]["new_field"] == [1]
    assert tail.read_new() == []


def test_tailer_counts_and_skips_malformed_lines(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    path.write_text('{"type": "step", "step": 1}\nnot json\n[1, 2]\n{"no_type": 1}\n\n{"type": "eval", "step": 1}\n')
    tail = TelemetryTailer(path)
    assert [e["type"] for e in tail.read_new()] == ["step", "eval"]
    assert tail.malformed == 3


def test_tailer_restarts_on_truncation_and_replacement(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    path.write_text('{"type": "step", "step": 1}\n{"type": "step", "step": 2}\n')
    tail = TelemetryTailer(path)
    assert len(tail.read_new()) == 2
    path.write_text('{"type": "run_start", "step": 0}\n')  # truncated and rewritten: shorter than the offset
    assert [e["type"] for e in tail.read_new()] == ["run_start"] and tail.reset
    tail.reset = False
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"type": "run_start", "step": 0}\n{"type": "step", "step": 1}\n' + " " * 10 + "\n")
    os.replace(replacement, path)  # a new inode, even if it were longer
    assert [e["type"] for e in tail.read_new()] == ["run_start", "step"] and tail.reset


def test_read_events_accepts_a_run_folder(tmp_path):
    writer = TelemetryWriter(tmp_path)
    writer.emit("warning", 3, code="x", message="y")
    writer.close()
    assert read_events(tmp_path)[0]["code"] == "x"


def test_telemetry_module_does_not_import_torch():
    code = "import sys, kd.telemetry; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_load_history_keeps_every_event_but_only_the_last_steps(tmp_path):
    from kd.telemetry import load_history

    writer = TelemetryWriter(tmp_path)
    writer.emit("run_start", 0, config={}, env={}, params={}, plan={}, estimate=None)
    for step in range(1, 101):
        writer.emit("step", step, loss={"total": 1.0})
        if step % 25 == 0:
            writer.emit("eval", step, split="validation", metrics={}, duration_s=1.0)
    writer.emit("oom", 7, phase="backward", recovered=True)
    writer.close()
    path = tmp_path / "telemetry.jsonl"
    with open(path, "a") as f:
        f.write('{"type": "step", "step": 101, "loss": {}}\nnot json\n{"type": "st')  # spaced JSON, junk, partial
    tail = TelemetryTailer(path)
    events = load_history(tail, keep_steps=5)
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps == [97, 98, 99, 100, 101]
    assert [e["type"] for e in events].count("eval") == 4 and events[0]["type"] == "run_start"
    assert any(e["type"] == "oom" for e in events) and tail.malformed == 1
    with open(path, "a") as f:
        f.write('ep", "step": 102}\n')
    assert [e["step"] for e in tail.read_new()] == [102]  # the tailer goes on from where history ended
