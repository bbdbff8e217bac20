"""The monitor on a large telemetry file: time to load the history, and bounded memory.

Writes a ~100 MB telemetry.jsonl of realistic step lines (plus evals and checkpoints), then starts
the real Textual app headless (App.run_test) and measures how long until it has caught up with
the last step, how many points each series holds, and how long a screen refresh takes afterwards.

    python bench/bench_monitor.py               # ~100 MB
    python bench/bench_monitor.py --mb 20
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import textual  # noqa: E402

from kd.telemetry import TelemetryWriter  # noqa: E402
from kd.tui.app import MonitorApp  # noqa: E402


def write_file(folder: Path, megabytes: float) -> tuple[Path, int]:
    writer = TelemetryWriter(folder, run_id="bench")
    writer.emit("run_start", 0, config={"run": {"name": "bench"}}, env={"device": "cuda:0"}, params={},
                plan={"total_steps": 10**7, "vram_budget_bytes": 5_500_000_000}, estimate=None)
    step = 0
    while writer.path.stat().st_size < megabytes * 1e6:
        for _ in range(1000):
            step += 1
            writer.emit("step", step, epoch=step / 1000, samples=256 * step,
                        loss={"total": 1 / step**0.3, "ce": 1.2 / step**0.3, "kd": 0.8 / step**0.3},
                        alpha=0.7, temperature=4.0, lr=3e-3, grad_norm=0.5,
                        rate={"samples_per_s": 2500.0 + step % 97, "steps_per_s": 10.0},
                        time={"step_s": 0.1, "data_s": 0.004},
                        mem={"allocated": 2.1e9, "reserved": 2.6e9, "peak_allocated": 3.1e9, "peak_reserved": 3.3e9},
                        gpu={"util_pct": 97, "power_w": 250.0, "power_limit_w": 350.0, "used_bytes": 3.2e9,
                             "total_bytes": 80e9, "temp_c": 61})
            if step % 500 == 0:
                writer.emit("eval", step, split="validation", duration_s=3.0, samples=10000,
                            metrics={"student_acc": 0.9, "student_f1": 0.89, "teacher_acc": 0.97,
                                     "agreement": 0.92, "loss": 0.4})
                writer.emit("checkpoint", step, path=f"runs/bench/checkpoints/step_{step:07d}", kind="periodic",
                            duration_s=0.3)
    writer.close()
    return writer.path, step


async def measure(path: Path, last_step: int) -> dict:
    app = MonitorApp(path, poll_s=0.1)
    started = time.perf_counter()
    async with app.run_test(size=(120, 40)) as pilot:
        while app.state.step < last_step:
            await pilot.pause(0.05)
        loaded = time.perf_counter() - started
        refresh = time.perf_counter()
        app.render_state()
        await pilot.pause()
        refresh = time.perf_counter() - refresh
        points = max(len(points) for points in app.state.series.values())
        await pilot.press("q")
    return {"loaded_s": loaded, "refresh_s": refresh, "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="telemetry file size in MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, last_step = write_file(Path(tmp), args.mb)
        size = path.stat().st_size
        result = asyncio.run(measure(path, last_step))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"python {platform.python_version()}, textual {textual.__version__}, {platform.machine()}")
    print(f"file: {size / 1e6:.0f} MB, {last_step} steps")
    print(f"history loaded (app started -> caught up with the last step): {result['loaded_s']:.1f} s "
          f"= {size / 1e6 / result['loaded_s']:.0f} MB/s, off the UI thread; "
          "only the last --history step lines are parsed")
    print(f"points kept per series: {result['points']} (bounded by --history); "
          f"peak resident memory of the process: {peak / 1e6:.0f} MB")
    print(f"one full screen refresh afterwards: {1000 * result['refresh_s']:.0f} ms")


if __name__ == "__main__":
    main()
