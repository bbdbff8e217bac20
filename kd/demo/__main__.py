"""`make demo`: keyword spotting, end to end, offline (`--task text` / `--task images`: the same for text
and image classification, `make demo-text` / `make demo-image`).

1. Synthesise a 10-keyword dataset with eSpeak NG (train/validation/test split by voice).
2. Train the teacher, a wide log-mel CNN, on labels with augmentation (configs/demo_teacher.yaml);
   the kit exports it, and the next step loads that export as its teacher.
3. Distil it into the tiny log-mel CNN (configs/demo.yaml), teacher and student seeing the same
   augmented clips.
4. Train the same tiny CNN with the same recipe on labels alone: the baseline (configs/demo_baseline.yaml).
Then print test accuracy, parameters and training samples/s of the three, and what KD gained.

Each training step is `accelerate launch train_kd.py --config ...`, the command a user would run,
so the demo exercises exactly the user's path (and uses a GPU when there is one). The text and image
tasks write their data and a teacher's starting folder (config + tokenizer / image processor), then
run configs/{text,image}_{teacher,kd,baseline}.yaml the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kd.config import load_config
from kd.demo.image_data import build_image_dataset
from kd.demo.kws_data import build_kws_dataset
from kd.demo.text_data import build_text_dataset
from kd.run_folder import previous_run
from kd.telemetry import read_events

ROOT = Path(__file__).resolve().parents[2]
@dataclass(frozen=True)
class Task:
    describe: str  # step 1's line
    build: Callable[[Path], Path]  # writes the data (and a teacher's starting folder) into this folder
    data_dir: Callable[[Any], str]  # where a config of the task reads its data
    steps: tuple[tuple[str, str], ...]  # (title, config): teacher, KD student, baseline
    test_set: str  # what the test split holds, for the table's caption


TASKS = {
    "keywords": Task("Synthesising the keyword dataset (eSpeak NG, offline)", build_kws_dataset,
                     lambda cfg: cfg.data.data_dir,
                     (("teacher (wide log-mel CNN)", "configs/demo_teacher.yaml"),
                      ("student with KD (log-mel CNN)", "configs/demo.yaml"),
                      ("student without KD (baseline)", "configs/demo_baseline.yaml")),
                     "voices never heard in training"),
    "text": Task("Writing the text dataset (four topics) and the teacher's starting folder", build_text_dataset,
                 lambda cfg: str(Path(cfg.data.data_files["train"]).parent),
                 (("teacher (BERT, 4 layers)", "configs/text_teacher.yaml"),
                  ("student with KD (1 layer)", "configs/text_kd.yaml"),
                  ("student without KD (baseline)", "configs/text_baseline.yaml")),
                 "sentences never seen in training"),
    "images": Task("Drawing the image dataset (four shapes) and the teacher's starting folder", build_image_dataset,
                   lambda cfg: cfg.data.data_dir,
                   (("teacher (ViT, 4 layers)", "configs/image_teacher.yaml"),
                    ("student with KD (1 layer)", "configs/image_kd.yaml"),
                    ("student without KD (baseline)", "configs/image_baseline.yaml")),
                   "images never seen in training"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrain-teacher", action="store_true",
                        help="train the teacher again even if a finished one with the same config exists")
    parser.add_argument("--task", choices=sorted(TASKS), default="keywords",
                        help="keywords (speech, the default), text or images")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    started = time.time()
    print(f"== 1/4 {task.describe}")
    data_dir = task.build(ROOT / task.data_dir(load_config(ROOT / task.steps[1][1])))
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        counts = json.loads(manifest.read_text())["counts"]
        print(f"   {data_dir}: " + ", ".join(f"{n} {split} clips" for split, n in counts.items()) + " (split by voice)")
    for number, (title, config) in enumerate(task.steps, start=2):
        cfg = load_config(ROOT / config)
        run_dir = ROOT / cfg.output_dir
        if number == 2 and not args.retrain_teacher and finished_with_same_config(run_dir, cfg):
            print(f"== {number}/4 {title}: reusing the finished run in {run_dir} (--retrain-teacher to redo)")
            continue
        print(f"== {number}/4 {title}: accelerate launch train_kd.py --config {config}")
        reset_run_folder(run_dir)
        code = subprocess.call(launch_command(config), cwd=ROOT)
        if code != 0:
            print(f"demo: the {title} step failed (exit {code}); see its output above", file=sys.stderr)
            return code
    print_table([(title, ROOT / load_config(ROOT / config).output_dir) for title, config in task.steps],
                task.test_set)
    kd_run = load_config(ROOT / task.steps[1][1]).output_dir
    print(f"Demo finished in {time.time() - started:.0f} s. Watch a run with: python monitor_tui.py {kd_run}")
    return 0


def launch_command(config: str) -> list[str]:
    # Explicit launcher flags, so a personal `accelerate config` file cannot change the demo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no"]
    if not torch.cuda.is_available():
        # Without a GPU, accelerate launch gives the process one CPU thread unless told otherwise.
        command += ["--num_cpu_threads_per_process", str(len(os.sched_getaffinity(0)))]
    return command + ["train_kd.py", "--config", config]


def finished_with_same_config(run_dir: Path, cfg) -> bool:
    try:
        events = read_events(run_dir)
        return (events[-1]["type"] == "run_end" and events[-1]["status"] == "completed"
                and load_config(run_dir / "config.yaml") == cfg and (run_dir / "student").is_dir())
    except Exception:  # anything missing or unreadable: train again
        return False


def reset_run_folder(run_dir: Path) -> None:
    """The demo reruns its own runs: their previous telemetry, checkpoints and student go first (a run
    folder holding a run is otherwise refused), so the table and the monitor show this run only."""
    for name in previous_run(run_dir):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def summarise(run_dir: Path) -> dict:
    events = read_events(run_dir)
    start = next(e for e in events if e["type"] == "run_start")
    tests = [e for e in events if e["type"] == "eval" and e["split"] == start["config"]["data"]["test_split"]]
    rates = [e["rate"]["samples_per_s"] for e in events if e["type"] == "step" and e.get("rate")]
    metrics = tests[-1]["metrics"] if tests else {}
    return {"acc": metrics.get("student_acc"), "f1": metrics.get("student_f1"), "agreement": metrics.get("agreement"),
            "params": start["params"]["student"], "rate": statistics.median(rates) if rates else None}


def print_table(runs: list[tuple[str, Path]], test_set: str) -> None:
    """The three runs side by side, then what distillation gained over the baseline (test split)."""
    rows = [(title, summarise(path)) for title, path in runs]
    fmt = "{:<32} {:>9} {:>9} {:>11} {:>11} {:>11}"
    print()
    print(fmt.format("model", "test acc", "macro F1", "agreement", "parameters", "samples/s"))
    print(fmt.format(*("-" * n for n in (32, 9, 9, 11, 11, 11))))
    for title, s in rows:
        print(fmt.format(title, _pct(s["acc"]), _pct(s["f1"]), _pct(s["agreement"]), f"{s['params']:,}",
                         f"{s['rate']:.0f}" if s["rate"] else "-"))
    teacher, kd, baseline = (s for _, s in rows)
    if None not in (teacher["acc"], kd["acc"], baseline["acc"]):
        print(f"KD gain over the baseline: {100 * (kd['acc'] - baseline['acc']):+.1f} points "
              f"(teacher {100 * (teacher['acc'] - baseline['acc']):+.1f}); the student has "
              f"{teacher['params'] / kd['params']:.1f}x fewer parameters than the teacher and keeps "
              f"{100 * kd['acc'] / teacher['acc']:.0f}% of its accuracy")
    print(f"(test set: {test_set}; agreement: student and teacher predict the same label;"
          " samples/s: training throughput, median over logged steps)")


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


if __name__ == "__main__":
    sys.exit(main())
