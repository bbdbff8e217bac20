"""The VRAM budget checks: pre-flight estimate against measured peaks, and out-of-memory recovery.

    python bench/bench_memory.py                          # demo and flagship, then the OOM check
    python bench/bench_memory.py --out bench/memory.json

For each workload (configs/demo.yaml and configs/5gb.yaml, as in bench_throughput.py) it trains a
few steps with the shipped settings under the 5.5 GB cap and compares the pre-flight estimate
(`run_start.estimate`) with what the run measured: PyTorch's peak allocated / reserved bytes over
every phase (`run_end.peak`) and the device memory NVML saw (`step.gpu.used_bytes`, which
includes the CUDA context the estimate adds as a constant). Target: within 20%.

Then the recovery check. On a GPU, a real one: the flagship with a micro-batch of 2048 and no
accumulation, several times what fits in 5.5 GB; `memory.on_oom: shrink` must halve it until it
fits and finish with the same effective batch. On a CPU there is no out-of-memory error to cause,
so it is injected (KD_FAULT_OOM_AT_STEP=2) into a demo run and the same checks are made.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from workloads import (
    demo_workload,
    environment,
    flagship_workload,
    isolate_caches,
    kit_run,
    print_environment,
    save_results,
)

GB = 1e9  # decimal, as memory.vram_budget_gb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=["demo", "flagship"], default=["demo", "flagship"])
    parser.add_argument("--skip-oom", action="store_true", help="only the estimate against the peaks")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where runs and synthetic data go (default: a temp dir)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kd-bench-memory-"))
    isolate_caches(work)
    import torch

    cuda = torch.cuda.is_available()
    env = environment()
    print_environment(env)
    results: dict = {"env": env, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                     "estimates": {}, "oom": None}
    for name in args.workloads:
        workload = (demo_workload if name == "demo" else flagship_workload)(work, cuda, 1)
        print(f"\n== {name}: estimate against measured peaks")
        done = kit_run(workload.config, workload.overrides, work / name)
        results["estimates"][name] = row = compare(done.events)
        show_estimate(name, row)
    if not args.skip_oom:
        results["oom"] = oom_check(work, cuda)
    save_results(results, args.out)
    failed = results["oom"] is not None and not results["oom"]["passed"]
    return 1 if failed else 0


def compare(events: list[dict]) -> dict:
    start = next(e for e in events if e["type"] == "run_start")
    end = next(e for e in events if e["type"] == "run_end")
    est = start["estimate"]
    peak = end.get("peak") or {}
    nvml = [e["gpu"]["used_bytes"] for e in events if e["type"] == "step" and e.get("gpu")
            and e["gpu"].get("used_bytes") is not None]
    # Where the peak was reached: each phase's peak in the last step line (this epoch's, GPU only).
    phases = next((e["memory"] for e in reversed(events) if e["type"] == "step" and e.get("memory")), None)
    row = {"budget_bytes": start["plan"]["vram_budget_bytes"], "estimate_total": est["total"],
           "estimate_method": est["method"], "estimate_without_context": est["total"] - est["cuda_context"],
           "estimate_activations": est["activations"], "estimate_teacher_activations": est["teacher_activations"],
           "peak_allocated": peak.get("allocated"), "peak_reserved": peak.get("reserved"), "phase_peaks": phases,
           "nvml_used_max": max(nvml) if nvml else None, "status": end["status"]}
    if row["peak_reserved"]:
        row["estimate_over_reserved"] = row["estimate_without_context"] / row["peak_reserved"]
        row["estimate_over_allocated"] = row["estimate_without_context"] / row["peak_allocated"]
    if row["nvml_used_max"]:
        row["estimate_over_nvml"] = row["estimate_total"] / row["nvml_used_max"]
    return row


def show_estimate(name: str, r: dict) -> None:
    from kd.preflight import fmt

    def gib(v):
        return fmt(v) if v is not None else "n/a"

    print(f"   {name}: estimate {gib(r['estimate_total'])} ({r['estimate_method']}; "
          f"{gib(r['estimate_without_context'])} without the CUDA context) vs budget {gib(r['budget_bytes'])}")
    print(f"   measured: peak allocated {gib(r['peak_allocated'])}, peak reserved {gib(r['peak_reserved'])}, "
          f"NVML device used {gib(r['nvml_used_max'])}; run {r['status']}")
    print(f"   estimate's activations {gib(r['estimate_activations'])} (of which the teacher's alone "
          f"{gib(r['estimate_teacher_activations'])})")
    for phase, p in (r["phase_peaks"] or {}).items():
        print(f"   {phase:>16} peak allocated {gib(p['allocated'])}, reserved {gib(p['reserved'])}")
    for key, what in (("estimate_over_reserved", "estimate / peak reserved"),
                      ("estimate_over_allocated", "estimate / peak allocated"),
                      ("estimate_over_nvml", "estimate / NVML")):
        if key in r:
            verdict = "within 20%" if abs(r[key] - 1) <= 0.2 else "OFF by more than 20%"
            print(f"   {what}: {r[key]:.2f} ({verdict})")


def oom_check(work: Path, cuda: bool) -> dict:
    """Train through an out-of-memory error: real on a GPU (oversized micro-batch), injected on a CPU."""
    if cuda:
        micro, steps = 2048, 2  # 1024 fitted the cap on an H100 (bench/RESULTS.md)
        workload = flagship_workload(work, cuda, 1, micro=micro, accum=1, steps_per_epoch=steps)
        how = f"flagship, micro-batch {micro} x accumulation 1 under the 5.5 GB cap (a real CUDA out-of-memory error)"
    else:
        workload = demo_workload(work, cuda, 1)
        os.environ["KD_FAULT_OOM_AT_STEP"] = "2"
        how = "demo with KD_FAULT_OOM_AT_STEP=2 (no GPU: the error is injected)"
    print(f"\n== out-of-memory recovery: {how}")
    try:
        # On a GPU the teacher stays there: placed on the CPU (teacher.device auto) it would make room.
        placement = ["teacher.device=cuda"] if cuda else []
        done = kit_run(workload.config, workload.overrides + placement + [
            "memory.on_oom=shrink", "memory.auto_batch_size=false", "telemetry.log_every=1"], work / "oom")
    finally:
        os.environ.pop("KD_FAULT_OOM_AT_STEP", None)
    events = done.events
    ooms = [e for e in events if e["type"] == "oom"]
    start = next(e for e in events if e["type"] == "run_start")
    end = next(e for e in events if e["type"] == "run_end")
    steps = [e for e in events if e["type"] == "step"]
    effective = start["plan"]["micro_batch"] * start["plan"]["grad_accum"]
    per_step = [b["samples"] - a["samples"] for a, b in zip([{"samples": 0}] + steps, steps)]
    result = {"how": how, "oom_events": [{k: e.get(k) for k in ("step", "phase", "micro_batch", "grad_accum", "action",
                                                                 "new_micro_batch", "new_grad_accum", "recovered")}
                                         for e in ooms],
              "status": end["status"], "effective_batch": effective, "samples_per_step": per_step,
              "peak_allocated": (end.get("peak") or {}).get("allocated")}
    result["passed"] = bool(ooms) and all(e["recovered"] for e in ooms) and end["status"] == "completed" \
        and all(n == effective for n in per_step)
    for e in result["oom_events"]:
        print(f"   oom at step {e['step']} in {e['phase']}: micro-batch {e['micro_batch']} x {e['grad_accum']} -> "
              f"{e['new_micro_batch']} x {e['new_grad_accum']}, recovered {e['recovered']}")
    print(f"   run {end['status']}; samples per optimizer step {per_step} (effective batch {effective}); "
          f"{'PASSED' if result['passed'] else 'FAILED'}")
    return result


if __name__ == "__main__":
    sys.exit(main())
