"""The monitor: its state rules on event sequences, the app driven with Pilot, --once, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kd.tui.state import RunState, summary_text

ROOT = Path(__file__).resolve().parents[1]


def start(run_id: str = "r1", total: int = 100, **extra) -> dict:
    return {"v": 1, "type": "run_start", "ts": 1000.0, "run_id": run_id, "seq": 0, "step": 0,
            "config": {"run": {"name": "kws"}}, "env": {"device": "cuda:0", "gpu_name": "Tiny GPU"},
            "params": {"teacher": 1000, "student": 10},
            "plan": {"total_steps": total, "vram_budget_bytes": 5_500_000_000}, "estimate": None, **extra}


def step(n: int, total: float = 1.0, **extra) -> dict:
    event = {"v": 1, "type": "step", "ts": 1000.0 + n, "run_id": "r1", "seq": n, "step": n, "epoch": n / 10,
             "samples": 8 * n, "loss": {"total": total, "ce": total * 2, "kd": total / 2}, "alpha": 0.5,
             "temperature": 2.0, "lr": 0.001, "grad_norm": 0.3,
             "rate": {"samples_per_s": 80.0, "steps_per_s": 10.0}, "time": {"step_s": 0.1, "data_s": 0.02},
             "mem": {"allocated": 1e9, "reserved": 2e9, "peak_allocated": 1.5e9, "peak_reserved": 2e9},
             "gpu": None, "memory": {"teacher_forward": {"allocated": 1e9, "reserved": 2e9},
                                     "backward": {"allocated": 1.5e9, "reserved": 2e9}}}
    event.update(extra)
    return event


def oom(recovered: bool = True) -> dict:
    return {"v": 1, "type": "oom", "ts": 1003.0, "run_id": "r1", "seq": 9, "step": 3, "phase": "backward",
            "micro_batch": 64, "grad_accum": 1, "mem": None, "action": "shrink", "new_micro_batch": 32,
            "new_grad_accum": 2, "recovered": recovered, "message": "CUDA out of memory",
            "advice": ["teacher.dtype: fp16 saves 0.2 GB", "train.batch_size: 32 with grad_accum: 2"]}


def end(status: str = "completed", error: str | None = None) -> dict:
    return {"v": 1, "type": "run_end", "ts": 1100.0, "run_id": "r1", "seq": 99, "step": 5, "status": status,
            "duration_s": 100.0, "metrics": {}, "peak": None, "error": error}


def feed(state: RunState, *events: dict) -> RunState:
    for e in events:
        state.apply(e, wall=2000.0)
    return state


def test_state_tracks_a_run():
    s = feed(RunState(), start(), step(1, 2.0), step(2, 1.5),
             {"type": "eval", "step": 2, "split": "validation", "metrics": {"student_acc": 0.5}})
    assert s.name == "kws" and s.status == "running" and s.step == 2 and s.total_steps == 100
    assert s.values("loss_total") == [2.0, 1.5] and s.values("loss_ce") == [4.0, 3.0]
    assert s.latest("data_share") == pytest.approx(0.2)
    assert s.eta(now=2000.0) == pytest.approx(9.8) and s.eta(now=9999.0) is None  # none once stalled
    assert s.evals[-1]["student_acc"] == 0.5


def test_step_rewind_drops_stale_points():
    s = feed(RunState(), start(), *[step(i) for i in range(1, 6)],
             {"type": "eval", "step": 4, "split": "validation", "metrics": {}})
    feed(s, step(3, 9.0))  # resumed from the step-2 checkpoint
    assert [p[0] for p in s.series["loss_total"]] == [1, 2, 3] and s.latest("loss_total") == 9.0
    assert not s.evals


def test_second_run_start_begins_a_new_series():
    s = feed(RunState(), start("a"), step(1), step(2), oom(), end())
    feed(s, start("b", total=7))
    assert s.run_id == "b" and s.values("loss_total") == [] and s.total_steps == 7 and not s.ooms
    assert s.status == "running" and s.runs_seen == 2


def test_unknown_fields_nulls_and_odd_shapes_are_tolerated():
    s = feed(RunState(), start(), step(1, mem=None, rate=None, loss={"total": None, "ce": 1.0, "kd": None},
                                     future_field={"x": 1}))
    assert s.values("loss_total") == [] and s.values("loss_ce") == [1.0] and s.latest("mem_reserved") is None
    feed(s, {"type": "step", "step": "not a number"})
    assert s.malformed == 1


def test_stall_and_end_statuses():
    s = feed(RunState(stall_after_s=30), start(), step(1))
    assert s.shown_status(now=2010.0) == "running" and s.shown_status(now=2031.0) == "stalled"
    feed(s, end("failed", "non-finite loss at step 1"))
    assert s.shown_status(now=9999.0) == "failed"


def test_summary_text_has_everything_once_needs():
    s = feed(RunState(), start(), step(1), oom(recovered=True),
             {"type": "eval", "step": 1, "split": "validation",
              "metrics": {"student_acc": 0.9, "student_f1": 0.8, "teacher_acc": 0.95, "agreement": 0.9}})
    text = summary_text(s, now=2000.0)
    assert "run kws [running] step 1/100" in text
    assert "VRAM 2.00 GB of 5.50 GB (36% of budget)" in text
    assert "80 samples/s" in text and "20% of step time waiting for data" in text
    assert "student acc 0.9" in text and "OOM at step 3 in backward: recovered" in text
    assert "advice: teacher.dtype: fp16 saves 0.2 GB" in text


def write_lines(path: Path, *events: dict, partial: str = "") -> None:
    with open(path, "a") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
        f.write(partial)


@pytest.mark.asyncio
async def test_app_shows_progress_oom_banner_and_finish(tmp_path):
    from textual.widgets import DataTable, Static

    from kd.tui.app import MonitorApp

    path = tmp_path / "telemetry.jsonl"
    app = MonitorApp(path, poll_s=0.05)
    async with app.run_test(size=(100, 36)) as pilot:
        await pilot.pause(0.2)
        assert "waiting for" in str(app.query_one("#title", Static).content)
        write_lines(path, start(), step(1, 2.0), step(2, 1.0),
                    {"type": "eval", "ts": 1002.5, "step": 2, "split": "validation",
                     "metrics": {"student_acc": 0.75, "student_f1": 0.7, "teacher_acc": 0.9, "agreement": 0.8,
                                 "loss": 0.5}}, partial='{"type": "step", "st')
        await pilot.pause(0.4)
        title = str(app.query_one("#title", Static).content)
        assert "kws" in title and "running" in title and "step 2/100" in title
        assert "2.00 GB / 5.50 GB" in str(app.query_one("#vram", Static).content)
        assert "peaks: teacher 1.00 GB  backward 1.50 GB" in str(app.query_one("#vram", Static).content)
        table = app.query_one("#evals", DataTable)
        assert table.row_count == 1 and table.get_row_at(0)[2] == "75.0%"
        with open(path, "a") as f:
            f.write('ep": 3}\n')  # the writer completes its line
        write_lines(path, oom(recovered=True))
        await pilot.pause(0.4)
        assert app.state.step == 3
        banner = app.query_one("#oom", Static)
        assert banner.has_class("shown") and "OUT OF MEMORY" in str(banner.content)
        assert "teacher.dtype: fp16 saves 0.2 GB" in str(banner.content) and "recovered" in str(banner.content)
        await pilot.press("d")
        assert not banner.has_class("shown")
        write_lines(path, end("completed"))
        await pilot.pause(0.4)
        assert "finished" in str(app.query_one("#title", Static).content)
        await pilot.press("p")
        assert app.paused and "paused" in str(app.query_one("#title", Static).content)
        await pilot.press("q")


def test_once_prints_a_summary_and_skips_malformed(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    write_lines(path, start(), step(1), oom(recovered=False))
    with open(path, "a") as f:
        f.write("garbage\n")
    result = subprocess.run([sys.executable, str(ROOT / "monitor_tui.py"), str(tmp_path), "--once"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "run kws" in result.stdout and "NOT recovered" in result.stdout and "1 malformed" in result.stdout


def test_monitor_never_imports_torch():
    code = "import sys, monitor_tui, kd.tui.app, kd.tui.state; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "False"


def test_history_is_bounded():
    s = feed(RunState(history=50), start(), *[step(i) for i in range(1, 1001)])
    assert all(len(points) <= 50 for points in s.series.values())
    assert s.series["loss_total"][0][0] == 951 and s.step == 1000


@pytest.mark.asyncio
async def test_app_starts_over_when_the_file_is_replaced(tmp_path):
    import os

    from textual.widgets import DataTable, Static

    from kd.tui.app import MonitorApp

    path = tmp_path / "telemetry.jsonl"
    write_lines(path, start("first"), step(1), step(2),
                {"type": "eval", "ts": 1.0, "step": 2, "split": "validation", "metrics": {"student_acc": 0.5}})
    app = MonitorApp(path, poll_s=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.3)
        assert app.query_one("#evals", DataTable).row_count == 1
        other = tmp_path / "other.jsonl"
        second = start("second", total=9)
        second["config"] = {"run": {"name": "again"}}
        write_lines(other, second, step(1))
        os.replace(other, path)
        await pilot.pause(0.4)
        title = str(app.query_one("#title", Static).content)
        assert "again" in title and "step 1/9" in title
        assert app.query_one("#evals", DataTable).row_count == 0


@pytest.mark.asyncio
async def test_app_shows_tokens_per_second_and_perplexity_for_a_language_model_run(tmp_path):
    from textual.widgets import DataTable, Label, Sparkline, Static

    from kd.tui.app import MonitorApp

    path = tmp_path / "telemetry.jsonl"
    lm_start = start()
    lm_start["config"] = {"run": {"name": "lm"}, "data": {"modality": "causal_lm"}}
    rates = [{"samples_per_s": 8.0, "tokens_per_s": 1000.0 * n, "steps_per_s": 1.0} for n in (1, 2, 3)]
    on_policy = {"batches": 1, "share": 0.5, "generated_tokens": 96, "generated_tokens_per_s": 240.0,
                 "mean_sample_tokens": 12.0, "generate_s": 0.4, "score_s": 0.15, "score_s_per_batch": 0.15}
    write_lines(path, lm_start, *(step(n, rate=r, on_policy=on_policy) for n, r in zip((1, 2, 3), rates)),
                {"type": "eval", "ts": 1003.5, "step": 3, "split": "validation",
                 "metrics": {"student_acc": 0.4, "teacher_acc": 0.6, "agreement": 0.5, "loss": 2.0,
                             "perplexity": 12.5, "teacher_perplexity": 4.25}})
    app = MonitorApp(path, poll_s=0.05)
    async with app.run_test(size=(110, 36)) as pilot:
        await pilot.pause(0.4)
        assert "3000 tokens/s" in str(app.query_one("#rate", Static).content)
        spark = app.query_one("#rate_spark", Sparkline)
        assert list(spark.data) == [1000.0, 2000.0, 3000.0]
        assert str(spark.parent.query_one(Label).content) == "tokens/s"
        row = app.query_one("#evals", DataTable).get_row_at(0)
        assert row[-1] == "12.5" and row[2] == "40.0%"
        assert ("on-policy: 50% of batches sampled (3 so far), 240 sampled tokens/s, mean sample 12 tokens, "
                "teacher scoring 150 ms per batch") in str(app.query_one("#loss", Static).content)
        await pilot.press("q")
    text = summary_text(app.state)
    assert "3000 tokens/s" in text and "perplexity 12.5 (teacher 4.25)" in text


def test_a_quiet_run_stops_its_clock_and_says_how_long_it_has_been_quiet():
    s = feed(RunState(stall_after_s=30), start(), step(1))  # last line read at wall 2000, run began at ts 1000
    assert s.elapsed(now=2010.0) == pytest.approx(1010.0)
    assert s.elapsed(now=3 * 86400) == pytest.approx(1000.0)  # stalled: the clock stopped at the last line
    assert s.status_text(now=2000.0 + 2 * 86400 + 3600) == "stalled (no new line for 2 d 1:00:00)"


@pytest.mark.asyncio
async def test_app_judges_a_cut_file_by_its_modification_time(tmp_path):
    """A finished-but-cut file (no run_end, last written days ago) is stalled from the first frame."""
    import os
    import time

    from textual.widgets import Static

    from kd.tui.app import MonitorApp

    path = tmp_path / "telemetry.jsonl"
    days_ago = time.time() - 4 * 86400
    first = start()
    first["ts"] = days_ago - 600.0
    write_lines(path, first, step(1, ts=days_ago - 300.0), step(2, ts=days_ago))
    os.utime(path, (days_ago, days_ago))
    app = MonitorApp(path, poll_s=0.05)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause(0.4)
        title = str(app.query_one("#title", Static).content)
        assert "stalled (no new line for 4 d" in title, title
        assert "elapsed 10:00" in title, title  # the run's own 600 s, not the days since
        await pilot.press("q")
    once = subprocess.run([sys.executable, str(ROOT / "monitor_tui.py"), str(path), "--once"],
                          capture_output=True, text=True, timeout=60)
    assert "[stalled (no new line for 4 d" in once.stdout and "elapsed 10:00" in once.stdout, once.stdout


def remote_figures(requests: int, retries: int = 0, rate_limited: int = 0, k: int = 20, hits: int = 0,
                   fetched: int = 8) -> dict:
    """A step line's remote_teacher field, as kd/teachers/remote/source.py writes it."""
    return {"source": "remote", "requests": requests, "ok": requests - retries, "retries": retries,
            "rate_limited": rate_limited, "errors": 0, "latency_p50_s": 0.041, "latency_p95_s": 0.065, "k": k,
            "in_flight": 8, "max_in_flight": 8, "cache_hits": hits, "fetched": fetched,
            "hit_rate": hits / (hits + fetched), "queue": 12, "wait_s": 0.25, "offline": False}


@pytest.mark.asyncio
async def test_remote_teacher_panel_sums_requests_and_shows_the_last_figures(tmp_path):
    from textual.widgets import Static

    from kd.tui.app import MonitorApp

    path = tmp_path / "telemetry.jsonl"
    targets = {"source": "remote", "url": "http://127.0.0.1:8000/v1", "model": "smollm2", "offline": False,
               "mode": "generate", "api": "chat"}
    write_lines(path, start(soft_targets=targets), step(1, remote_teacher=remote_figures(10)),
                step(2, remote_teacher=remote_figures(6, retries=2, rate_limited=2, k=10, hits=4, fetched=4)))
    app = MonitorApp(path, poll_s=0.05)
    async with app.run_test(size=(110, 36)) as pilot:
        await pilot.pause(0.3)
        panel = app.query_one("#remote_panel")
        assert panel.display and panel.border_title == "remote teacher"
        text = str(app.query_one("#remote", Static).content)
        assert "requests 16  retries 2  rate-limited 2  cache hits 25%" in text  # 4 of 16 rows from the cache
        assert "p50 41 ms p95 65 ms  k 10  in flight 8  queue 12  loop waited 0.5 s" in text
        assert "teacher: remote smollm2 at http://127.0.0.1:8000/v1 (generate, chat)" in str(
            app.query_one("#title", Static).content)
    local = tmp_path / "local.jsonl"
    write_lines(local, start(), step(1))
    app = MonitorApp(local, poll_s=0.05)
    async with app.run_test(size=(110, 36)) as pilot:
        await pilot.pause(0.3)
        assert not app.query_one("#remote_panel").display  # no panel for a local teacher


@pytest.mark.asyncio
async def test_the_title_fits_100_columns_with_a_long_name_a_stall_and_a_cache_being_filled(tmp_path):
    import os
    import time

    from textual.widgets import Static

    from kd.tui.app import MonitorApp

    path = tmp_path / "telemetry.jsonl"
    days_ago = time.time() - 4 * 86400
    first = start(total=15000, soft_targets={"source": "cache+teacher", "cache": "c.sqlite",
                                             "coverage": {"train": [100, 200], "eval": [60, 200]}})
    first["config"]["run"]["name"] = "kws-4gb-teacher-cpu"
    first["ts"] = days_ago - 90_000.0
    later = step(12345, ts=days_ago, epoch=14.99,
                 cache={"source": "cache+teacher", "covered": {"train": [100, 200], "eval": [60, 200]}})
    write_lines(path, first, later)
    os.utime(path, (days_ago, days_ago))
    app = MonitorApp(path, poll_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.4)
        lines = str(app.query_one("#title", Static).content).splitlines()
        assert all(len(line) <= 98 for line in lines), lines  # 100 columns less the padding
        assert "kws-4gb-teacher-cpu" in lines[0] and "stalled (no new line for 4 d" in lines[0]
        assert "step 12345/15000" in lines[0] and "epoch 14.99" in lines[0]
        assert lines[1] == "elapsed 1 d 1:00:00  ETA -  teacher: filling the cache 160/400 (train 100/200)"
        await pilot.press("q")
