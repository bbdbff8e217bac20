"""`make demo`: keyword spotting, end to end, offline (`--task text` / `--task images`: the same for text
and image classification, `make demo-text` / `make demo-image`).

1. Synthesise a 10-keyword dataset with eSpeak NG (train/validation/test split by voice).
2. Train the teacher, a wide log-mel CNN, on labels with augmentation (configs/demo_teacher.yaml);
   the kit exports it, and the next step loads that export as its teacher.
3. Distil it into the tiny log-mel CNN (configs/demo.yaml), teacher and student seeing the same
   augmented clips.
4. Train the same tiny CNN with the same recipe on labels alone: the baseline (configs/demo_baseline.yaml).
Then print test accuracy, parameters and training samples/s of the three, and what KD gained.

Both students train once per seed (`--seeds`, default 3: run.seed 0, 1, 2, each its own run folder;
seed 0 in the config's own), and the table shows each student's mean with its min-max and the KD
gain per seed: a gain smaller than the spread between seeds is noise, and the table says so.

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
    parser.add_argument("--seeds", type=int, default=3,
                        help="runs of each student, with run.seed 0 .. N-1 (default 3; the teacher trains once)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be an integer >= 1")
    task = TASKS[args.task]
    started = time.time()
    print(f"== 1/4 {task.describe}")
    data_dir = task.build(ROOT / task.data_dir(load_config(ROOT / task.steps[1][1])))
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        counts = json.loads(manifest.read_text())["counts"]
        print(f"   {data_dir}: " + ", ".join(f"{n} {split} clips" for split, n in counts.items()) + " (split by voice)")
    runs: list[tuple[str, list[Path]]] = []
    for number, (title, config) in enumerate(task.steps, start=2):
        cfg = load_config(ROOT / config)
        seeds = [cfg.run.seed] if number == 2 else list(range(args.seeds))
        folders = []
        for seed in seeds:
            run_dir = ROOT / (cfg.output_dir if number == 2 else seed_folder(cfg.output_dir, seed))
            folders.append(run_dir)
            overrides = [] if number == 2 else [f"run.seed={seed}", f"run.output_dir={run_dir}"]
            which = f" (seed {seed})" if number > 2 else ""
            if number == 2 and not args.retrain_teacher and finished_with_same_config(run_dir, cfg):
                print(f"== {number}/4 {title}: reusing the finished run in {run_dir} (--retrain-teacher to redo)")
                continue
            command = " ".join(["accelerate launch train_kd.py --config", config, *overrides])
            print(f"== {number}/4 {title}{which}: {command}")
            reset_run_folder(run_dir)
            code = subprocess.call(launch_command(config, overrides), cwd=ROOT)
            if code != 0:
                print(f"demo: the {title}{which} step failed (exit {code}); see its output above", file=sys.stderr)
                return code
        runs.append((title, folders))
    print_table(runs, task.test_set)
    kd_run = load_config(ROOT / task.steps[1][1]).output_dir
    print(f"Demo finished in {time.time() - started:.0f} s. Watch a run with: python monitor_tui.py {kd_run}")
    return 0


def seed_folder(output_dir: Path, seed: int) -> Path:
    """Seed 0 trains in the config's own folder (the one the README's monitor command names)."""
    return Path(output_dir) if seed == 0 else Path(f"{output_dir}-seed{seed}")


def launch_command(config: str, overrides: list[str] = ()) -> list[str]:
    # Explicit launcher flags, so a personal `accelerate config` file cannot change the demo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no"]
    if not torch.cuda.is_available():
        # Without a GPU, accelerate launch gives the process one CPU thread unless told otherwise.
        command += ["--num_cpu_threads_per_process", str(len(os.sched_getaffinity(0)))]
    return command + ["train_kd.py", "--config", config, *overrides]


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


def print_table(runs: list[tuple[str, list[Path]]], test_set: str) -> None:
    """Teacher, KD student and baseline side by side (students: mean over seeds, min-max beside it),
    then the KD gain per seed (KD and baseline of the same seed share initialisation and data order)."""
    rows = [(title, [summarise(path) for path in paths]) for title, paths in runs]
    seeds = max(len(s) for _, s in rows)
    fmt = "{:<32} {:>21} {:>9} {:>11} {:>11} {:>11}"
    print()
    print(fmt.format("model", "test acc" + (f" ({seeds} seeds)" if seeds > 1 else ""), "macro F1", "agreement",
                     "parameters", "samples/s"))
    print(fmt.format(*("-" * n for n in (32, 21, 9, 11, 11, 11))))
    for title, summaries in rows:
        first = summaries[0]
        rate = statistics.median(s["rate"] for s in summaries) if all(s["rate"] for s in summaries) else None
        print(fmt.format(title, spread([s["acc"] for s in summaries]), _pct(_mean([s["f1"] for s in summaries])),
                         _pct(_mean([s["agreement"] for s in summaries])), f"{first['params']:,}",
                         f"{rate:.0f}" if rate else "-"))
    (_, teacher), (_, kd), (_, baseline) = rows
    accs = [[s["acc"] for s in group] for group in (teacher, kd, baseline)]
    if all(None not in group for group in accs):
        t = accs[0][0]
        gains = [100 * (k - b) for k, b in zip(accs[1], accs[2])]
        kd_mean, base_mean = statistics.mean(accs[1]), statistics.mean(accs[2])
        line = f"KD gain over the baseline: {statistics.mean(gains):+.1f} points"
        if len(gains) > 1:
            noise = 100 * max(max(accs[2]) - min(accs[2]), max(accs[1]) - min(accs[1]))
            within = abs(statistics.mean(gains)) < noise
            line += (f" (per seed {', '.join(f'{g:+.1f}' for g in gains)}; the spread between seeds is up to "
                     f"{noise:.1f} points{', so this gain is within the noise' if within else ''})")
        print(line)
        print(f"Teacher {100 * (t - base_mean):+.1f} points over the baseline; the student has "
              f"{teacher[0]['params'] / kd[0]['params']:.1f}x fewer parameters than the teacher and keeps "
              f"{100 * kd_mean / t:.0f}% of its accuracy")
    print(f"(test set: {test_set}; agreement: student and teacher predict the same label;"
          " samples/s: training throughput, median over logged steps)")


def spread(values: list[float | None]) -> str:
    """'93.1%' for one run, '93.1% (92.0-94.4)' for several."""
    if None in values:
        return "-"
    if len(values) == 1:
        return _pct(values[0])
    return f"{_pct(statistics.mean(values))} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def _mean(values: list[float | None]) -> float | None:
    return None if None in values else statistics.mean(values)


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


if __name__ == "__main__":
    sys.exit(main())
