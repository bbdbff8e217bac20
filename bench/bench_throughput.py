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
  demo      configs/demo.yaml: its wav2vec2 teacher (the one `make demo` trained, else random weights of
            its architecture) and the log-mel CNN on the demo's keyword clips (16 kHz WAV -> 8 kHz)
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
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAIVE = ["teacher.device=cpu", "teacher.dtype=fp32", "data.pin_memory=false", "data.persistent_workers=false",
         "student.channels_last=false", "data.decode_cache=false", "data.features_on_device=false",
         "telemetry.log_every=1", "train.compile=false"]
FLAGSHIP_LABELS = [f"kw{i:02d}" for i in range(35)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=["demo", "flagship"], default=["demo", "flagship"])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per path (default: 3 on a GPU, 2 on a CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of each component (default 20 GPU, 3 CPU)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--work-dir", type=Path, default=None, help="where runs and synthetic data go (default: a temp dir)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kd-bench-"))
    # A cold datasets cache, so the optimised path's one-off decode pass is measured, not reused.
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    cuda = torch.cuda.is_available()
    epochs = args.epochs or (3 if cuda else 2)
    repeats = args.repeats or (20 if cuda else 3)
    env = environment()
    print(f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
          f"accelerate {env['accelerate']}, datasets {env['datasets']}; {env['date']}")
    results = {"env": env, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "workloads": {}}
    for name in args.workloads:
        config, overrides, notes = (demo_workload if name == "demo" else flagship_workload)(work, cuda, epochs)
        print(f"\n== {name}: {config} {' '.join(overrides)}")
        for note in notes:
            print(f"   note: {note}")
        row: dict = {"config": config, "overrides": overrides, "notes": notes}
        for path, extra in (("naive", NAIVE), ("optimised", [])):
            row[path] = run_path(config, overrides + extra + [f"run.output_dir={work / name / path}"],
                                 repeats if path == "optimised" else 0)
            show_path(path, row[path])
        row["ratio"] = row["optimised"]["samples_per_s"] / row["naive"]["samples_per_s"]
        print(f"   optimised / naive: {row['ratio']:.2f}x samples/s")
        if name == "demo":
            row["half_teacher_agreement"] = half_teacher_agreement(config, overrides)
        results["workloads"][name] = row
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"Results written to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Workloads: the config, the overrides common to both paths, and what differs from the shipped file


def demo_workload(work: Path, cuda: bool, epochs: int) -> tuple[str, list[str], list[str]]:
    from kd.config import load_config
    from kd.demo.kws_data import build_kws_dataset

    config = "configs/demo.yaml"
    cfg = load_config(ROOT / config)
    build_kws_dataset(ROOT / cfg.data.data_dir)
    notes = []
    teacher = ROOT / cfg.teacher.model
    if not (teacher / "model.safetensors").is_file():
        teacher = random_demo_teacher(work / "demo-teacher", cfg)
        notes.append("no trained demo teacher (run `make demo`): random weights of its architecture; no agreement check")
    samples = None if cuda else 640  # a 2-core CPU: 10 steps of 64 per epoch
    steps_per_epoch = (samples or 2240) // cfg.train.batch_size
    overrides = [f"data.data_dir={ROOT / cfg.data.data_dir}", f"teacher.model={teacher}", "data.eval_split=null",
                 "data.test_split=null", f"data.max_train_samples={samples or 'null'}", "train.epochs=null",
                 f"train.max_steps={epochs * steps_per_epoch}", "train.checkpoint_every=null",
                 "telemetry.warmup_steps=2"]
    return config, overrides, notes


def flagship_workload(work: Path, cuda: bool, epochs: int) -> tuple[str, list[str], list[str]]:
    from kd.synthetic import save_random_ast, write_keyword_noise_dataset

    config = "configs/5gb.yaml"
    teacher = work / "ast-teacher"
    if not (teacher / "model.safetensors").is_file():
        save_random_ast(teacher, FLAGSHIP_LABELS)
    # GPU: the shipped micro-batch 128 x accumulation 2, 4 optimizer steps per epoch. CPU: the AST
    # forward alone takes ~0.2 s per clip on 2 cores, so micro-batches of 8, 4 steps per epoch.
    micro, accum = (128, 2) if cuda else (8, 1)
    steps_per_epoch = 4
    n = steps_per_epoch * micro * accum
    data = write_keyword_noise_dataset(work / "flagship-data", FLAGSHIP_LABELS, -(-n // len(FLAGSHIP_LABELS)))
    overrides = ["data.dataset=audiofolder", f"data.data_dir={data}", "data.config_name=null", "data.eval_split=null",
                 f"data.max_train_samples={n}",
                 "data.test_split=null", f"teacher.model={teacher}", "run.gpu_only=false", "train.epochs=null",
                 f"train.batch_size={micro}", f"train.grad_accum={accum}", f"train.max_steps={epochs * steps_per_epoch}",
                 "train.checkpoint_every=null", "telemetry.warmup_steps=1", "telemetry.log_every=2"]
    notes = [f"synthetic data: {n} clips of 1 s at 16 kHz (16-bit WAV), {len(FLAGSHIP_LABELS)} labels; "
             "random-weight AST of the Hub model's shape"]
    if not cuda:
        overrides += ["train.mixed_precision=no", "teacher.dtype=fp32", "data.num_workers=1"]
        notes.append("CPU: fp32 throughout (fp16 mixed precision needs a GPU; a half-precision AST forward "
                     "measured 6x slower than fp32 on this CPU) and 1 worker for 2 cores")
    return config, overrides, notes


def random_demo_teacher(folder: Path, cfg) -> Path:
    import torch
    from transformers import AutoConfig, Wav2Vec2ForSequenceClassification

    from kd.demo.kws_data import KEYWORDS
    from kd.demo.teacher_arch import write_teacher_architecture

    write_teacher_architecture(folder, cfg.data.sampling_rate)
    config = AutoConfig.from_pretrained(folder)
    labels = sorted(KEYWORDS)
    config.num_labels, config.id2label = len(labels), dict(enumerate(labels))
    config.label2id = {n: i for i, n in enumerate(labels)}
    torch.manual_seed(0)
    Wav2Vec2ForSequenceClassification(config).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# One path: a real kit run, then its figures read back from telemetry


def run_path(config: str, overrides: list[str], repeats: int) -> dict:
    import torch
    from accelerate.state import AcceleratorState

    from kd.build import build_run
    from kd.config import load_config
    from kd.telemetry import read_events
    from kd.trainer import Trainer

    # Accelerate keeps one process-wide state; each path creates its own Accelerator (its own
    # precision), so the previous one is cleared first.
    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = load_config(ROOT / config, overrides)
    started = time.perf_counter()
    run = build_run(cfg)
    setup_s = time.perf_counter() - started
    trainer = Trainer(run)
    trainer.fit()
    events = list(read_events(cfg.output_dir / "telemetry.jsonl"))
    out = {"setup_s": setup_s, **throughput(events, cfg.telemetry.warmup_steps)}
    end = next(e for e in events if e["type"] == "run_end")
    out["peak_allocated_bytes"] = (end.get("peak") or {}).get("allocated")
    out["peak_reserved_bytes"] = (end.get("peak") or {}).get("reserved")
    utils = [e["gpu"]["util_pct"] for e in events if e["type"] == "step" and e.get("gpu")
             and e["gpu"].get("util_pct") is not None]
    out["gpu_util_pct"] = statistics.mean(utils) if utils else None
    out["teacher_device"] = str(next(run.teacher.parameters()).device) if run.teacher is not None else None
    out["teacher_dtype"] = str(next(run.teacher.parameters()).dtype) if run.teacher is not None else None
    if repeats:
        out["components"] = time_components(trainer, repeats)
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


def time_components(trainer, repeats: int) -> dict:
    """Teacher forward alone, student step alone and the KD step, on one batch already on the device."""
    import torch
    import torch.nn.functional as F

    from kd.students import student_logits
    from kd.teachers import teacher_logits

    acc = trainer.acc
    acc.gradient_accumulation_steps = 1  # every call below is a whole optimizer step
    batch = next(iter(trainer.train_dl))
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)

    def teacher_forward():
        trainer._add_features(batch)
        teacher_logits(trainer.teacher, batch["inputs"])

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


def half_teacher_agreement(config: str, overrides: list[str]) -> dict | None:
    """Share of demo test clips on which the teacher in fp16 / bf16 predicts its fp32 class."""
    import torch
    from torch.utils.data import DataLoader

    from kd.config import load_config
    from kd.data import prepare_data
    from kd.teachers import DTYPES, load_processor, load_teacher, teacher_logits

    cfg = load_config(ROOT / config, overrides)
    if not Path(cfg.teacher.model).joinpath("model.safetensors").is_file() or "demo-teacher" not in cfg.teacher.model:
        return None
    cfg.data.test_split, cfg.data.max_eval_samples = "test", None
    processor = load_processor(cfg.teacher.model, "audio")
    data = prepare_data(cfg.data, processor, cfg.data.sampling_rate)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(data.splits["test"], batch_size=64, collate_fn=data.collate)
    features = data.features.to(device) if data.features is not None else None
    preds: dict[str, list] = {}
    for dtype in ("fp32", "fp16", "bf16"):
        teacher = load_teacher(cfg.teacher.model, "audio", dtype=dtype).to(device)
        out = []
        for batch in loader:
            inputs = features(batch["waveform"].to(device)) if features is not None else batch["inputs"]
            out.append(teacher_logits(teacher, inputs).float().argmax(-1).cpu())
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


def environment() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"device": gpu or f"CPU ({cpu})", "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "datasets": datasets.__version__, "date": datetime.date.today().isoformat()}


def show_path(path: str, r: dict) -> None:
    peak = f", peak VRAM {r['peak_allocated_bytes'] / 2**30:.2f} GiB" if r["peak_allocated_bytes"] else ""
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
    print("\n| workload | naive samples/s | optimised samples/s | ratio | peak VRAM naive / optimised | "
          "KD / (teacher + student) |")
    print("|---|---|---|---|---|---|")
    for name, row in results["workloads"].items():
        naive, opt = row["naive"], row["optimised"]
        peaks = " / ".join(f"{r['peak_allocated_bytes'] / 2**30:.2f} GiB" if r["peak_allocated_bytes"] else "n/a"
                           for r in (naive, opt))
        ratio = opt.get("components", {}).get("kd_over_sum")
        print(f"| {name} | {naive['samples_per_s']:.1f} | {opt['samples_per_s']:.1f} | {row['ratio']:.2f}x | {peaks} | "
              f"{f'{ratio:.2f}' if ratio else 'n/a'} |")


if __name__ == "__main__":
    sys.exit(main())
