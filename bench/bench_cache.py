"""Online KD against KD from the teacher-output cache, and the student trained alone (issue 11).

    python bench/bench_cache.py                 # demo (augmentation off) and flagship workloads
    python bench/bench_cache.py --only demo

For each workload, three kit runs of the same steps in one process: online (teacher forward on every
batch, `teacher_cache=off`), cached (`teacher_cache=auto` into an empty cache: epoch 1 fills it, then
the teacher is released), and the student alone (`distillation.enabled=false`). Samples/s are
wall-clock over epochs 2 and 3 (from the first logged step of epoch 2 to the last), so the cached figure is training
without the teacher. End-to-end times for N epochs are projected from the measured epoch times:
online N x epoch, cached = the filling epoch + (N - 1) x cached epoch. Also the cache's read speed
(random batches of 64 rows, and a whole split). Prints a table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (  # noqa: E402
    demo_workload,
    environment,
    flagship_workload,
    isolate_caches,
    kit_run,
    print_environment,
    save_results,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=["demo", "flagship"], default=["demo", "flagship"])
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args()


def epoch_rate(events: list[dict], steps_per_epoch: int) -> dict:
    """Samples/s after epoch 1 (from the first step of epoch 2, so its start-up is left out)."""
    steps = [e for e in events if e["type"] == "step" and e["step"] > steps_per_epoch + 1]
    first, last = steps[0], steps[-1]
    seconds = last["ts"] - first["ts"]
    return {"samples_per_s": (last["samples"] - first["samples"]) / seconds,
            "step_s": seconds / (last["step"] - first["step"])}


def epoch1_s(events: list[dict], steps_per_epoch: int) -> float:
    """Wall time of epoch 1 including the end-of-epoch fill: run start to the first step of epoch 2
    (minus that step's own time)."""
    start = next(e for e in events if e["type"] == "run_start")["ts"]
    steps = {e["step"]: e for e in events if e["type"] == "step"}
    first, second = steps[steps_per_epoch + 1]["ts"], steps[steps_per_epoch + 2]["ts"]
    return first - start - (second - first)


def read_speed(cache_path: Path) -> dict:
    import sqlite3

    from kd.teachers.store import TeacherCache

    with sqlite3.connect(cache_path) as db:
        split_id, size = db.execute("SELECT split_id, size FROM splits WHERE name = 'train'").fetchone()
        identity = json.loads(dict(db.execute("SELECT name, value FROM meta").fetchall())["identity"])
        labels = json.loads(dict(db.execute("SELECT name, value FROM meta").fetchall())["labels"])
    identity.pop("cache_dtype")
    cache = TeacherCache(cache_path.parent, identity, len(labels), labels)
    assert cache.path == cache_path
    rng = random.Random(0)
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < 2.0:
        cache.get(split_id, rng.sample(range(size), min(64, size)))
        n += 1
    batch_s = (time.perf_counter() - started) / n
    started = time.perf_counter()
    cache.get(split_id, range(size))
    return {"rows_per_s_in_batches_of_64": min(64, size) / batch_s, "batch_of_64_ms": 1000 * batch_s,
            "whole_split_rows_per_s": size / (time.perf_counter() - started), "rows": size,
            # the database and its write-ahead log (rows sit there until SQLite checkpoints them)
            "file_bytes": sum(p.stat().st_size for p in cache_path.parent.glob(cache_path.name + "*"))}


def measure(name: str, workload, steps_per_epoch: int, work: Path) -> dict:
    base = workload.overrides + ["telemetry.log_every=1", "telemetry.warmup_steps=0"]
    cache_dir = work / f"{name}-cache"
    paths = {"online": ["distillation.teacher_cache=off"],
             "cached": ["distillation.teacher_cache=auto", f"distillation.cache_dir={cache_dir}"],
             "student_only": ["distillation.enabled=false"]}
    out: dict = {}
    for path, extra in paths.items():
        done = kit_run(workload.config, base + extra, work / f"{name}-{path}")
        out[path] = epoch_rate(done.events, steps_per_epoch)
        out[path]["epoch1_s"] = epoch1_s(done.events, steps_per_epoch)
        out[path]["teacher_in_memory_after"] = done.run.teacher is not None
        # On a GPU: device memory allocated in epoch 2 (teacher weights in it, or not).
        allocated = [e["mem"]["allocated"] for e in done.events if e["type"] == "step" and e.get("mem")
                     and e["step"] > steps_per_epoch + 1]
        out[path]["epoch2_allocated_bytes"] = max(allocated) if allocated else None
        print(f"  {name} {path}: {out[path]['samples_per_s']:.1f} samples/s in epoch 2, "
              f"epoch 1 {out[path]['epoch1_s']:.1f} s", flush=True)
    online_epoch = out["online"]["step_s"] * steps_per_epoch
    cached_epoch = out["cached"]["step_s"] * steps_per_epoch
    out["end_to_end_s"] = {n: {"online": online_epoch * n,
                               "fill_plus_cached": out["cached"]["epoch1_s"] + cached_epoch * (n - 1)}
                           for n in (2, 5, 15)}
    out["cached_over_student_only"] = out["cached"]["samples_per_s"] / out["student_only"]["samples_per_s"]
    out["cached_over_online"] = out["cached"]["samples_per_s"] / out["online"]["samples_per_s"]
    out["read"] = read_speed(next(cache_dir.glob("*.sqlite")))
    return out


def main() -> int:
    args = parse_args()
    env = environment()
    print_environment(env)
    work = Path(tempfile.mkdtemp(prefix="kd-bench-cache-"))
    isolate_caches(work)
    import torch

    cuda = torch.cuda.is_available()
    results = {"env": env}
    if "demo" in args.only:
        wl = demo_workload(work, cuda, epochs=3)
        wl.overrides += ["augment.enabled=false"]  # a cache needs inputs that do not change between epochs
        steps = (640 if not cuda else 2240) // 64
        results["demo"] = measure("demo", wl, steps, work)
    if "flagship" in args.only:
        steps = 4
        wl = flagship_workload(work, cuda, epochs=3, steps_per_epoch=steps)
        results["flagship"] = measure("flagship", wl, steps, work)
    print()
    print(f"{'workload':10} {'online':>10} {'cached':>10} {'student':>10} {'cached/student':>15} "
          f"{'cached/online':>14}  end to end N=2 / 5 / 15 (online vs fill+cached, s)")
    for name in ("demo", "flagship"):
        if name not in results:
            continue
        r = results[name]
        e2e = " / ".join(f"{r['end_to_end_s'][n]['online']:.0f} vs {r['end_to_end_s'][n]['fill_plus_cached']:.0f}"
                         for n in (2, 5, 15))
        print(f"{name:10} {r['online']['samples_per_s']:10.1f} {r['cached']['samples_per_s']:10.1f} "
              f"{r['student_only']['samples_per_s']:10.1f} {r['cached_over_student_only']:15.2f} "
              f"{r['cached_over_online']:14.2f}  {e2e}")
        rd = r["read"]
        print(f"{'':10} cache read: {rd['rows_per_s_in_batches_of_64']:.0f} rows/s in random batches of 64 "
              f"({rd['batch_of_64_ms']:.2f} ms each), {rd['whole_split_rows_per_s']:.0f} rows/s for a whole split; "
              f"{rd['rows']} rows in {rd['file_bytes'] / 1e3:.0f} kB")
    save_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
