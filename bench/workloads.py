"""What the benchmarks share: the demo and flagship workloads, one in-process kit run, the environment.

A workload is a shipped config plus overrides (data location, a teacher that exists offline, a
bounded number of steps). `kit_run` trains it with the kit's own build_run + Trainer, in this
process, and reads back the telemetry it wrote.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kd  # noqa: E402,F401  (configures the CUDA allocator, before environment() initialises CUDA)

FLAGSHIP_LABELS = [f"kw{i:02d}" for i in range(35)]


@dataclass
class Workload:
    config: str           # a shipped config, relative to the repository root
    overrides: list[str]  # applied to both paths of a comparison
    notes: list[str]      # what differs from the shipped file, and why
    random_teacher: bool  # the teacher has random weights (its predictions mean nothing)


def isolate_caches(work: Path) -> None:
    """A cold datasets cache under `work` (so one-off decoding is measured), and no network."""
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def demo_workload(work: Path, cuda: bool, epochs: int) -> Workload:
    """configs/demo.yaml on the demo keyword clips, with the teacher `make demo` trained (if any)."""
    from kd.config import load_config
    from kd.demo.kws_data import build_kws_dataset

    config = "configs/demo.yaml"
    cfg = load_config(ROOT / config)
    build_kws_dataset(ROOT / cfg.data.data_dir)
    notes = []
    teacher = ROOT / cfg.teacher.model
    random_teacher = not (teacher / "model.safetensors").is_file()
    if random_teacher:
        teacher = random_demo_teacher(work / "demo-teacher", cfg.data.sampling_rate)
        notes.append("no trained demo teacher (run `make demo`): random weights of its architecture")
    samples = None if cuda else 640  # a 2-core CPU: 10 steps of 64 per epoch
    steps_per_epoch = (samples or 2240) // cfg.train.batch_size
    overrides = [f"data.data_dir={ROOT / cfg.data.data_dir}", f"teacher.model={teacher}", "data.eval_split=null",
                 "data.test_split=null", f"data.max_train_samples={samples or 'null'}", "train.epochs=null",
                 f"train.max_steps={epochs * steps_per_epoch}", "train.checkpoint_every=null",
                 "telemetry.warmup_steps=2", "distillation.teacher_cache=off"]
    return Workload(config, overrides, notes, random_teacher)


def flagship_workload(work: Path, cuda: bool, epochs: int, micro: int | None = None, accum: int | None = None,
                      steps_per_epoch: int = 4) -> Workload:
    """configs/5gb.yaml with its AST teacher built from the config (random weights), synthetic clips.

    GPU: the shipped micro-batch 128 x accumulation 2. CPU: the AST forward alone takes ~0.2 s per
    clip on 2 cores, so micro-batches of 8, fp32, one worker.
    """
    from kd.synthetic import save_random_ast, write_keyword_noise_dataset

    config = "configs/5gb.yaml"
    teacher = work / "ast-teacher"
    if not (teacher / "model.safetensors").is_file():
        save_random_ast(teacher, FLAGSHIP_LABELS)
    micro = micro or (128 if cuda else 8)
    accum = accum or (2 if cuda else 1)
    n = steps_per_epoch * micro * accum
    per_class = -(-n // len(FLAGSHIP_LABELS))
    data = write_keyword_noise_dataset(work / f"flagship-data-{per_class}", FLAGSHIP_LABELS, per_class)
    overrides = ["data.dataset=audiofolder", f"data.data_dir={data}", "data.config_name=null", "data.eval_split=null",
                 "data.test_split=null", f"data.max_train_samples={n}", f"teacher.model={teacher}",
                 "run.gpu_only=false", "train.epochs=null", f"train.batch_size={micro}", f"train.grad_accum={accum}",
                 f"train.max_steps={epochs * steps_per_epoch}", "train.checkpoint_every=null",
                 "telemetry.warmup_steps=1", "telemetry.log_every=2",
                 # online KD, as shipped before the cache; bench_cache.py compares it with the cache
                 "distillation.teacher_cache=off"]
    notes = [f"synthetic data: {n} clips of 1 s at 16 kHz (16-bit WAV), {len(FLAGSHIP_LABELS)} labels; "
             "random-weight AST of the Hub model's shape"]
    if not cuda:
        overrides += ["train.mixed_precision=no", "teacher.dtype=fp32", "data.num_workers=1"]
        notes.append("CPU: fp32 throughout (fp16 mixed precision needs a GPU; a half-precision AST forward "
                     "measured 6x slower than fp32 on this CPU) and 1 worker for 2 cores")
    return Workload(config, overrides, notes, random_teacher=True)


def random_demo_teacher(folder: Path, sampling_rate: int) -> Path:
    """configs/demo_teacher.yaml's wide log-mel CNN with random weights, exported as the kit does."""
    import torch

    from kd.config import load_config
    from kd.demo.kws_data import KEYWORDS
    from kd.export.student import save_student
    from kd.students import build_student

    cfg = load_config(ROOT / "configs/demo_teacher.yaml")
    labels = sorted(KEYWORDS)
    torch.manual_seed(0)
    return save_student(build_student(cfg.student, "audio", labels, sampling_rate), folder, labels)


@dataclass
class KitRun:
    run: Any            # kd.build.Run
    trainer: Any        # kd.trainer.Trainer, after fit (its models and loaders are still usable)
    events: list[dict]  # the telemetry the run wrote
    setup_s: float      # build_run: data loading (and the decode pass, when not cached), models, estimate


def kit_run(config: str, overrides: list[str], output_dir: Path) -> KitRun:
    import torch
    from accelerate.state import AcceleratorState

    from kd.build import build_run
    from kd.config import load_config
    from kd.telemetry import read_events
    from kd.trainer import Trainer

    # Accelerate keeps one process-wide state; each run creates its own Accelerator (its own
    # precision), so the previous one is cleared first.
    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = load_config(ROOT / config, [*overrides, f"run.output_dir={output_dir}"])
    started = time.perf_counter()
    run = build_run(cfg)
    setup_s = time.perf_counter() - started
    trainer = Trainer(run)
    trainer.fit()
    return KitRun(run, trainer, read_events(cfg.output_dir / "telemetry.jsonl"), setup_s)


def environment() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"device": gpu or f"CPU ({cpu})", "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "date": datetime.date.today().isoformat()}


def save_results(results: dict, out: Path | None) -> None:
    """Write a bench's results as JSON to `out` (when given), atomically: an interrupted write keeps the
    previous file whole."""
    import json

    from kd.atomic import atomic_file

    if out:
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(results, indent=1, default=str))
        print(f"Results written to {out}")


def print_environment(env: dict) -> None:
    print(f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
          f"accelerate {env['accelerate']}, datasets {env['datasets']}; {env['date']}")
