"""Naive against optimised distillation, side by side in one process: samples/s, peak VRAM, step costs.

    python bench/bench_throughput.py                      # both workloads, results printed
    python bench/bench_throughput.py --workloads demo --out bench/throughput.json

Both paths are the kit's own trainer (kd.build.build_run + kd.trainer.Trainer) on the same workload
and samples; only config switches differ:

  naive      teacher on the CPU in fp32 (teacher.device=cpu, teacher.dtype=fp32), blocking copies from
             unpinned memory (data.pin_memory=false), DataLoader workers re-spawned every epoch
             (data.persistent_workers=false), no channels_last, audio decoded and the teacher's features
             computed per clip on the CPU every epoch (data.decode_cache=false,
             data.features_on_device=false), losses read back to the host every step (log_every=1)
  optimised  the shipped config, as it is

Workloads:
  demo      configs/demo.yaml: its wide log-mel CNN teacher (the one `make demo` trained, else random
            weights of its architecture) and the tiny log-mel CNN on the demo's keyword clips
            (16 kHz WAV -> 8 kHz)
  flagship  configs/5gb.yaml: the AST teacher built from its config with random weights (86M params), the
            72k-parameter conv student, synthetic one-second 16 kHz WAV clips with 35 labels

Throughput is measured from the telemetry the runs write: samples over wall time from the end of
the warm-up steps to the last step, across at least two epochs (so per-epoch costs are counted).
In the same run, on one batch already on the device, it times the teacher's forward (with its
features) alone, the student's training step alone and the kit's KD step, and prints
KD / (teacher + student). With the demo's trained teacher it also reports how often the teacher in
fp16 and bf16 predicts what it predicts in fp32 on the demo test set.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workloads import (
    ROOT,
    Workload,
    demo_workload,
    environment,
    flagship_workload,
    isolate_caches,
    kit_run,
    print_environment,
    save_results,
)

NAIVE = ["teacher.device=cpu", "teacher.dtype=fp32", "data.pin_memory=false", "data.persistent_workers=false",
         "student.channels_last=false", "data.decode_cache=false", "data.features_on_device=false",
         "telemetry.log_every=1", "train.compile=false"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=["demo", "flagship"], default=["demo", "flagship"])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per path (default: 3 on a GPU, 2 on a CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats of each component (default 20 GPU, 3 CPU)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="naive/optimised pairs, alternating order; the median ratio is reported (default: 1 on a "
                             "GPU, 3 on a CPU)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where runs and synthetic data go (default: a temp dir)")
    parser.add_argument("--agreement-only", action="store_true",
                        help="only the demo teacher's fp16/bf16 agreement with fp32 "
                             "(needs the teacher `make demo` trains)")
    parser.add_argument("--utilisation-only", type=int, metavar="STEPS", default=None,
                        help="only the GPU utilisation in telemetry over STEPS optimizer steps of the flagship as "
                             "shipped (600: about half a minute on an H100); needs a GPU")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kd-bench-"))
    isolate_caches(work)
    import torch

    cuda = torch.cuda.is_available()
    epochs = args.epochs or (3 if cuda else 2)
    repeats = args.repeats or (20 if cuda else 3)
    args.rounds = args.rounds or (1 if cuda else 3)
    env = environment()
    print_environment(env)
    results = {"env": env, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "workloads": {}}
    if args.agreement_only:
        return agreement_only(work, cuda, results, args.out)
    if args.utilisation_only:
        return utilisation_only(work, cuda, results, args.out, args.utilisation_only)
    for name in args.workloads:
        workload = (demo_workload if name == "demo" else flagship_workload)(work, cuda, epochs)
        print(f"\n== {name}: {workload.config} {' '.join(workload.overrides)}")
        for note in workload.notes:
            print(f"   note: {note}")
        row: dict = {"config": workload.config, "overrides": workload.overrides, "notes": workload.notes}
        rounds: dict[str, list[dict]] = {"naive": [], "optimised": []}
        for r in range(args.rounds):
            # Alternate which path goes first, so drift in machine speed (or a warmer page cache)
            # does not always favour the same one.
            order = [("naive", NAIVE), ("optimised", [])][:: 1 if r % 2 == 0 else -1]
            for path, extra in order:
                timed = repeats if path == "optimised" and not rounds["optimised"] else 0
                rounds[path].append(run_path(workload, extra, work / name / f"{path}-{r}", timed))
                show_path(path, rounds[path][-1])
        ratios = sorted(o["samples_per_s"] / n["samples_per_s"] for n, o in zip(rounds["naive"], rounds["optimised"]))
        for path, runs in rounds.items():  # the median round of each path stands for it
            row[path] = sorted(runs, key=lambda x: x["samples_per_s"])[len(runs) // 2]
            row[path]["components"] = runs[0].get("components")
            row[path]["rounds_samples_per_s"] = [x["samples_per_s"] for x in runs]
        row["ratio"], row["ratio_range"] = statistics.median(ratios), [ratios[0], ratios[-1]]
        print(f"   optimised / naive: {row['ratio']:.2f}x samples/s (median of {args.rounds} rounds, "
              f"range {ratios[0]:.2f}-{ratios[-1]:.2f})")
        if name == "demo":
            row["half_teacher_agreement"] = half_teacher_agreement(workload)
        results["workloads"][name] = row
    if "flagship" in args.workloads:
        results["flagship_data_path"] = data_path_rates(work, cuda, epochs)
    print_table(results)
    save_results(results, args.out)
    return 0


# ---------------------------------------------------------------------------------------------
# One path: a real kit run, then its figures read back from telemetry


def run_path(workload: Workload, extra: list[str], output_dir: Path, repeats: int) -> dict:
    done = kit_run(workload.config, workload.overrides + extra, output_dir)
    run, events = done.run, done.events
    out = {"setup_s": done.setup_s, **throughput(events, run.cfg.telemetry.warmup_steps)}
    end = next(e for e in events if e["type"] == "run_end")
    out["peak_allocated_bytes"] = (end.get("peak") or {}).get("allocated")
    out["peak_reserved_bytes"] = (end.get("peak") or {}).get("reserved")
    utils = gpu_utils([e for e in events if e["type"] == "step" and e["step"] > run.cfg.telemetry.warmup_steps])
    out["gpu_util_pct"] = statistics.mean(utils) if utils else None
    out["teacher_device"] = str(next(run.teacher.parameters()).device) if run.teacher is not None else None
    out["teacher_dtype"] = str(next(run.teacher.parameters()).dtype) if run.teacher is not None else None
    if repeats:
        out["components"] = time_components(done.trainer, repeats)
    return out


def throughput(events: list[dict], warmup: int) -> dict:
    """Samples per second of wall time from the first logged step after warm-up to the last step."""
    steps = [e for e in events if e["type"] == "step"]
    warm = [e for e in steps if e["step"] > warmup]
    if len(warm) < 2:
        raise SystemExit("bench: too few logged steps after warm-up to measure; raise --epochs")
    first, last = warm[0], warm[-1]
    data_share = [e["time"]["data_s"] / e["time"]["step_s"] for e in warm if e["time"]["step_s"]]
    return {"samples_per_s": (last["samples"] - first["samples"]) / (last["ts"] - first["ts"]),
            "measured_steps": last["step"] - first["step"], "epochs": last["epoch"],
            "data_wait_share": statistics.mean(data_share) if data_share else None}


def gpu_utils(steps: list[dict]) -> list[float]:
    """NVML's utilisation (share of time a kernel ran, over its last sample period) in these step lines."""
    return [e["gpu"]["util_pct"] for e in steps if e.get("gpu") and e["gpu"].get("util_pct") is not None]


def time_components(trainer, repeats: int) -> dict:
    """Teacher forward alone, student step alone and the KD step, on one batch already on the device."""
    import torch
    import torch.nn.functional as F

    from kd.students import student_logits
    from kd.teachers.loading import teacher_logits

    acc = trainer.acc
    acc.gradient_accumulation_steps = 1  # every call below is a whole optimizer step
    batch = next(iter(trainer.train_dl))
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)

    def teacher_forward():
        trainer._add_features(batch)
        teacher_logits(trainer.teacher, batch)

    def student_step():
        with acc.accumulate(trainer.student):
            with acc.autocast():
                logits = student_logits(trainer.student, batch, trainer.run.input_key)
            acc.backward(F.cross_entropy(logits.float(), batch["labels"]))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

    def kd_step():
        with acc.accumulate(trainer.student):
            trainer._micro_step(batch)

    def median_s(fn) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    teacher_s, student_s, kd_s = median_s(teacher_forward), median_s(student_step), median_s(kd_step)
    return {"batch": int(batch["labels"].shape[0]), "teacher_forward_s": teacher_s, "student_step_s": student_s,
            "kd_step_s": kd_s, "kd_over_sum": kd_s / (teacher_s + student_s)}


def data_path_rates(work: Path, cuda: bool, epochs: int) -> dict:
    """The flagship's data path alone, no models: clips per second delivered as AST inputs on the device.

    1024 clips in micro-batches of 128 over `epochs` epochs, with each path's data settings: the
    naive one decodes every clip and runs the AST filterbank per clip in the workers each epoch; the
    optimised one reads the decode cache and computes the filterbank on the batch on the device.
    """
    import torch

    from kd.config import load_config
    from kd.data import make_loader, prepare_data
    from kd.teachers.loading import load_processor

    workload = flagship_workload(work, cuda, epochs, micro=128, accum=1, steps_per_epoch=8)
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print("\n== flagship data path alone: 1024 clips, batches of 128, no models")
    out = {}
    for path, extra in (("naive", NAIVE), ("optimised", [])):
        cfg = load_config(ROOT / workload.config, workload.overrides + extra)
        started = time.perf_counter()
        data = prepare_data(cfg.data, load_processor(cfg.teacher.model, "audio"), 16000)
        setup_s = time.perf_counter() - started
        loader = make_loader(data.splits["train"], cfg.data, 128, collate=data.collate, shuffle=True, pin_memory=cuda)
        features = data.features.to(device) if data.features is not None else None
        pinned = cuda and cfg.data.pin_memory
        clips, started = 0, time.perf_counter()
        for _ in range(epochs):
            for batch in loader:
                if features is not None:
                    inputs = features(batch["waveform"].to(device, non_blocking=pinned))
                else:
                    inputs = {k: v.to(device, non_blocking=pinned) for k, v in batch["inputs"].items()}
                clips += inputs["input_values"].shape[0]
        sync()
        out[path] = {"clips_per_s": clips / (time.perf_counter() - started), "setup_s": setup_s,
                     "workers": cfg.data.num_workers}
        print(f"   {path:9s} {out[path]['clips_per_s']:8.0f} clips/s over {epochs} epochs "
              f"({cfg.data.num_workers} worker(s); setup {setup_s:.1f} s, including the one-off decode when cached)")
    out["ratio"] = out["optimised"]["clips_per_s"] / out["naive"]["clips_per_s"]
    print(f"   optimised / naive: {out['ratio']:.2f}x")
    return out


def agreement_only(work: Path, cuda: bool, results: dict, out: Path | None) -> int:
    """The half-precision agreement alone: run after `make demo` (gpu_check's step after the demo),
    since the throughput step comes first and finds no trained teacher on a fresh machine."""
    workload = demo_workload(work, cuda, epochs=1)
    if workload.random_teacher:
        print("error: no trained demo teacher in runs/demo-teacher/student; run `make demo` first", file=sys.stderr)
        return 2
    results["half_teacher_agreement"] = half_teacher_agreement(workload)
    save_results(results, out)
    return 0


def utilisation_only(work: Path, cuda: bool, results: dict, out: Path | None, steps: int) -> int:
    """GPU utilisation as the monitor shows it, over a steady stretch of the flagship's training.

    The throughput runs are a few seconds long, mostly start-up against NVML's one-second readings;
    this run is long enough for a steady state: the shipped config (micro-batch 128 x 2, fp16 AST on
    the GPU, losses read every 20 steps) with the teacher on every step (online KD, as the
    throughput figures), on 24 steps' worth of synthetic clips per epoch; the figure is the median
    over the step lines after the first tenth of the steps."""
    if not cuda:
        print("error: --utilisation-only measures a GPU; no CUDA device here", file=sys.stderr)
        return 2
    if steps < 60:
        print(f"error: --utilisation-only {steps}: give at least 60 steps (losses are logged every 20)",
              file=sys.stderr)
        return 2
    per_epoch = 24
    workload = flagship_workload(work, cuda, epochs=-(-steps // per_epoch), steps_per_epoch=per_epoch)
    print(f"\n== flagship GPU utilisation over {steps} steps: {workload.config} {' '.join(workload.overrides)}")
    # The workload logs every 2 steps (short runs); the shipped config reads the losses every 20.
    done = kit_run(workload.config, workload.overrides + [f"train.max_steps={steps}", "telemetry.log_every=20"],
                   work / "utilisation")
    steady = [e for e in done.events if e["type"] == "step" and e["step"] > steps // 10]
    utils = gpu_utils(steady)
    if not utils:
        print("error: the step lines carry no NVML utilisation (is nvidia-ml-py installed?)", file=sys.stderr)
        return 2
    rate = throughput(done.events, steps // 10)  # samples/s and data wait over the same steady steps
    result = {"steps": steps, "steady_steps": rate["measured_steps"],
              "steady_seconds": steady[-1]["ts"] - steady[0]["ts"],
              "samples_per_s": rate["samples_per_s"], "data_wait_share": rate["data_wait_share"],
              "util_pct_median": statistics.median(utils), "util_pct_mean": statistics.mean(utils),
              "util_pct_min": min(utils), "readings": len(utils)}
    print(f"   {result['steady_steps']} steady steps in {result['steady_seconds']:.1f} s, "
          f"{result['samples_per_s']:.0f} samples/s, data wait {100 * result['data_wait_share']:.0f}%: GPU utilisation "
          f"median {result['util_pct_median']:.0f}% (mean {result['util_pct_mean']:.0f}%, "
          f"min {result['util_pct_min']:.0f}%, {len(utils)} readings; target >= 80%)")
    results["utilisation"] = result
    save_results(results, out)
    return 0


def half_teacher_agreement(workload: Workload) -> dict | None:
    """Share of demo test clips on which the teacher in fp16 / bf16 predicts its fp32 class."""
    import torch
    from accelerate.utils import send_to_device
    from torch.utils.data import DataLoader

    from kd.config import load_config
    from kd.data import prepare_data
    from kd.teachers.loading import DTYPES, is_kit_model, load_processor, load_teacher, teacher_logits

    cfg = load_config(ROOT / workload.config, workload.overrides)
    if workload.random_teacher:  # agreement would say nothing about a trained teacher
        print("   half-precision agreement: skipped, it needs the teacher `make demo` trains")
        return None
    cfg.data.test_split, cfg.data.max_eval_samples = "test", None
    processor = None if is_kit_model(cfg.teacher.model) else load_processor(cfg.teacher.model, "audio")
    data = prepare_data(cfg.data, processor, cfg.data.sampling_rate)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(data.splits["test"], batch_size=64, collate_fn=data.collate)
    features = data.features.to(device) if data.features is not None else None
    preds: dict[str, list] = {}
    for dtype in ("fp32", "fp16", "bf16"):
        teacher = load_teacher(cfg.teacher.model, "audio", dtype=dtype).to(device)
        out = []
        for batch in loader:
            batch = send_to_device(batch, device)
            if features is not None:
                batch["inputs"] = features(batch["waveform"])
            out.append(teacher_logits(teacher, batch).float().argmax(-1).cpu())
        preds[dtype] = torch.cat(out)
        assert DTYPES[dtype] == next(teacher.parameters()).dtype
    n = len(preds["fp32"])
    result = {"clips": n, "device": str(device)}
    for dtype in ("fp16", "bf16"):
        result[f"{dtype}_agreement"] = float((preds[dtype] == preds["fp32"]).float().mean())
    print(f"   half-precision teacher on the {device.type.upper()}, {n} test clips: agreement with fp32 "
          f"fp16 {100 * result['fp16_agreement']:.2f}%, bf16 {100 * result['bf16_agreement']:.2f}%")
    return result


# ---------------------------------------------------------------------------------------------
# Reporting


def show_path(path: str, r: dict) -> None:
    peak = f", peak VRAM {r['peak_allocated_bytes'] / 1e9:.2f} GB" if r["peak_allocated_bytes"] else ""
    util = f", GPU util {r['gpu_util_pct']:.0f}%" if r["gpu_util_pct"] is not None else ""
    print(f"   {path:9s} {r['samples_per_s']:8.1f} samples/s over {r['measured_steps']} steps "
          f"(data wait {100 * (r['data_wait_share'] or 0):.0f}%{peak}{util}; setup {r['setup_s']:.1f} s, "
          f"teacher on {r['teacher_device']} {r['teacher_dtype']})")
    c = r.get("components")
    if c:
        print(f"   components, batch {c['batch']}: teacher forward {1e3 * c['teacher_forward_s']:.1f} ms, student "
              f"step {1e3 * c['student_step_s']:.1f} ms, KD step {1e3 * c['kd_step_s']:.1f} ms -> "
              f"KD / (teacher + student) = {c['kd_over_sum']:.2f}")


def print_table(results: dict) -> None:
    print("\n| workload | naive samples/s | optimised samples/s | ratio (range) | peak VRAM naive / optimised | "
          "GPU util optimised | KD / (teacher + student) |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results["workloads"].items():
        naive, opt = row["naive"], row["optimised"]
        peaks = " / ".join(f"{r['peak_allocated_bytes'] / 1e9:.2f} GB" if r["peak_allocated_bytes"] else "n/a"
                           for r in (naive, opt))
        util = f"{opt['gpu_util_pct']:.0f}%" if opt["gpu_util_pct"] is not None else "n/a"
        kd = (opt.get("components") or {}).get("kd_over_sum")
        low, high = row["ratio_range"]
        print(f"| {name} | {naive['samples_per_s']:.1f} | {opt['samples_per_s']:.1f} | {row['ratio']:.2f}x "
              f"({low:.2f}-{high:.2f}) | {peaks} | {util} | {f'{kd:.2f}' if kd else 'n/a'} |")
    data = results.get("flagship_data_path")
    if data:
        print(f"| flagship data path alone (clips/s) | {data['naive']['clips_per_s']:.0f} | "
              f"{data['optimised']['clips_per_s']:.0f} | {data['ratio']:.2f}x | - | - | - |")


if __name__ == "__main__":
    sys.exit(main())
