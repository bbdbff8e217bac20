"""The real-speech recipe on real recorded speech, speaker-independently: leave one speaker out.

    python bench/bench_fsdd.py                              # all four folds, students over 3 seeds
    python bench/bench_fsdd.py --seeds 1                    # one seed: about 17 min on 2 CPU cores
    python bench/bench_fsdd.py --speakers george --out /tmp/fsdd.json
    python bench/bench_fsdd.py --demo-schedule              # the students of the demo configs instead
    python bench/bench_fsdd.py --work /tmp/fsdd --set train.lr=0.01   # a student sweep: teachers an earlier
                                                         # run trained in /tmp/fsdd with the same config are reused
    python bench/bench_fsdd.py --work /tmp/fsdd --curve 30 100 300 --png bench/fsdd_curves.png
                                                         # patient teaching: both students at each schedule

The Free Spoken Digit Dataset subset in ../shared/data/fsdd (4 speakers, 500 clips each, 8 kHz,
trimmed of silence) is split by speaker: for each speaker, the teacher (configs/demo_teacher.yaml)
and the two students of the shipped real-speech example (configs/real_speech_kd.yaml and
real_speech_baseline.yaml) train on the other three speakers and are tested on the held-out one,
whose voice and recording set-up none of them has heard. Each training is `python train_kd.py
--config ...` in its own process, as a user would run it, with overrides only for the fold's folders,
the seed and (students) no ONNX export; accuracies are read back from the telemetry.

The real-speech students differ from the demo's (configs/demo.yaml) by their schedule: unheard real
voices are far harder than the demo's synthetic ones, and at the demo's 10 epochs both students stop
far short of the teacher (KD at 64% of it, bench/RESULTS.md). The strided stem (`student.stem_stride:
2`, the same parameters, 3.4-4.2x cheaper steps) buys 30 epochs, and fixed augmented views
(`augment.views: 4`) let the teacher cache serve epochs 2-30.

The clips are not copied: each fold is a folder of symbolic links (train/ and test/, each with a
metadata.csv) under --work. Prints teacher / KD / baseline per held-out speaker and their mean, with
the KD gain over the baseline and the KD student's share of the teacher's accuracy.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from workloads import ROOT, environment, print_environment, save_results

RUNS = (("teacher", "configs/demo_teacher.yaml"), ("kd", "configs/real_speech_kd.yaml"),
        ("baseline", "configs/real_speech_baseline.yaml"))
DEMO_RUNS = (RUNS[0], ("kd", "configs/demo.yaml"), ("baseline", "configs/demo_baseline.yaml"))  # --demo-schedule
# For the students: the bench reads test accuracy, the shipped model files are not needed.
NO_EXPORT = ("export.onnx=false", "export.int8=false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd",
                        help="FSDD folder with metadata.csv (file_name,label,speaker,take) and recordings/")
    parser.add_argument("--speakers", nargs="+", help="held-out speakers to run (default: every speaker)")
    parser.add_argument("--work", type=Path, default=None, help="fold folders and runs (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--demo-schedule", action="store_true",
                        help="students from configs/demo.yaml and demo_baseline.yaml (10 epochs, full-resolution "
                             "stem, fresh augmentation) instead of the real-speech configs")
    parser.add_argument("--student-epochs", type=int, default=None,
                        help="train.epochs of the KD and baseline students (default: their configs' own, 30 for "
                             "the real-speech ones)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="runs of each student per fold, run.seed 0 .. N-1 (default 3; the teacher trains once)")
    parser.add_argument("--tag", default=None,
                        help="name the students' run folders <kd|baseline>-<tag>-seedN, so a sweep in the same --work "
                             "keeps the earlier students and shares the teachers")
    parser.add_argument("--set", dest="student_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both students (repeatable), e.g. train.lr=0.01")
    parser.add_argument("--curve", type=int, nargs="+", metavar="EPOCHS",
                        help="patient teaching: both students at each of these train.epochs (e.g. 30 100 300), "
                             "the fold means drawn against the schedule into --png")
    parser.add_argument("--png", type=Path, default=ROOT / "bench" / "fsdd_curves.png",
                        help="where --curve draws its chart (default bench/fsdd_curves.png)")
    args = parser.parse_args(argv)
    bad = [o for o in args.student_overrides if "=" not in o]
    if bad:
        print(f"error: --set {bad[0]}: expected KEY=VALUE, e.g. train.lr=0.01", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print(f"error: --seeds {args.seeds}: must be an integer >= 1", file=sys.stderr)
        return 2
    for epochs in ([args.student_epochs] if args.student_epochs is not None else []) + (args.curve or []):
        if epochs < 1:
            print(f"error: epochs {epochs} (--student-epochs / --curve): must be an integer >= 1", file=sys.stderr)
            return 2
    metadata = args.data / "metadata.csv"
    if not metadata.is_file():
        print(f"error: {metadata} not found (pass --data with the FSDD folder)", file=sys.stderr)
        return 2
    rows = list(csv.DictReader(metadata.open()))
    speakers = sorted({r["speaker"] for r in rows})
    chosen = args.speakers or speakers
    unknown = sorted(set(chosen) - set(speakers))
    if unknown:
        print(f"error: --speakers {', '.join(unknown)}: not in {metadata} (it has {', '.join(speakers)})",
              file=sys.stderr)
        return 2
    env = environment()
    print_environment(env)
    work = args.work or Path(tempfile.mkdtemp(prefix="kd-fsdd-"))
    if args.curve:
        return curve(args, rows, speakers, chosen, work, env)
    student = ([f"train.epochs={args.student_epochs}"] if args.student_epochs else []) + args.student_overrides
    results = run_folds(args, rows, speakers, chosen, work, env, student, args.tag)
    print_table(results)
    save_results(results, args.out)
    return 0


def run_folds(args, rows: list[dict], speakers: list[str], chosen: list[str], work: Path, env: dict,
              student: list[str], tag: str | None) -> dict:
    """Every chosen fold: its teacher, then both students per seed with `student` overrides."""
    started = time.time()
    folds = {}
    runs = DEMO_RUNS if args.demo_schedule else RUNS
    print(f"Students: {runs[1][1]} and {runs[2][1]}{' with ' + ' '.join(student) if student else ''}", flush=True)
    for speaker in chosen:
        fold = write_fold(args.data, rows, speaker, work / f"fold-{speaker}")
        print(f"== held out: {speaker} (train: {', '.join(s for s in speakers if s != speaker)})", flush=True)
        folds[speaker] = run_fold(fold, work / f"runs-{speaker}", student, args.seeds, tag, runs)
        print("   " + ", ".join(f"{name} {' / '.join(f'{100 * a:.1f}' for a in accs)}%"
                                for name, accs in folds[speaker].items() if not name.endswith("_s")), flush=True)
    results = {"env": env, "data": str(args.data), "student_overrides": student, "seeds": args.seeds,
               "folds": folds, "duration_s": time.time() - started}
    # Per seed, the mean over the folds: its spread is what another run of the bench could show.
    results["mean_per_seed"] = {name: [statistics.mean(f[name][min(s, len(f[name]) - 1)] for f in folds.values())
                                       for s in range(args.seeds)] for name, _ in RUNS}
    results["mean_per_seed"].update({f"{name}_s": [statistics.mean(s for f in folds.values() for s in f[f"{name}_s"])]
                                     for name in ("kd", "baseline")})
    return results


def curve(args, rows: list[dict], speakers: list[str], chosen: list[str], work: Path, env: dict) -> int:
    """Patient teaching (Beyer et al. 2022): both students at growing schedules, the same folds and
    seeds, the teachers shared; a table per schedule and the fold means against epochs in a PNG. The
    30-epoch students are the plain bench's own runs (reused from the same --work)."""
    from curves import line_chart

    from kd.config import load_config

    per_schedule = {}
    for epochs in sorted(set(args.curve)):
        student = [f"train.epochs={epochs}", *args.student_overrides]
        default = epochs == load_config(ROOT / RUNS[1][1]).train.epochs and not args.student_overrides
        tag = args.tag if default else "-".join(filter(None, (args.tag, f"e{epochs}")))
        print(f"=== students at {epochs} epochs", flush=True)
        per_schedule[epochs] = run_folds(args, rows, speakers, chosen, work, env, student, tag)
        print_table(per_schedule[epochs])
    mean = {e: {name: statistics.mean(r["mean_per_seed"][name]) * 100 for name in ("teacher", "kd", "baseline")}
            for e, r in per_schedule.items()}
    print(f"\n{'epochs':>7} {'KD':>7} {'baseline':>9} {'KD gain':>8} {'s (KD/base, one run)':>22}")
    for e, m in mean.items():
        r = per_schedule[e]["mean_per_seed"]
        print(f"{e:>7} {m['kd']:>7.1f} {m['baseline']:>9.1f} {m['kd'] - m['baseline']:>+8.1f} "
              f"{r['kd_s'][0]:>13.0f} / {r['baseline_s'][0]:.0f}")
    teacher = statistics.mean(m["teacher"] for m in mean.values())
    folds = ", ".join(chosen)
    line_chart([("KD student", (200, 60, 30), [(e, m["kd"]) for e, m in mean.items()]),
                ("baseline (no teacher)", (40, 90, 200), [(e, m["baseline"]) for e, m in mean.items()])],
               args.png, title=f"FSDD, unheard speakers ({folds}; {args.seeds} seed(s)): test accuracy against "
                               "the students' schedule", x_label="student epochs (log scale)",
               y_label="test accuracy, %", log_x=True, hlines=[("teacher", (90, 90, 90), teacher)])
    print(f"Chart: {args.png}")
    save_results({"env": env, "curve": {str(e): r for e, r in per_schedule.items()}, "means": mean}, args.out)
    return 0


def write_fold(data: Path, rows: list[dict], held_out: str, folder: Path) -> Path:
    """train/ (the other speakers) and test/ (the held-out one): links to the clips and a metadata.csv."""
    for split, keep in (("train", lambda r: r["speaker"] != held_out), ("test", lambda r: r["speaker"] == held_out)):
        out = folder / split
        out.mkdir(parents=True, exist_ok=True)
        chosen = [r for r in rows if keep(r)]
        for r in chosen:
            link = out / Path(r["file_name"]).name
            if not link.is_symlink():
                link.symlink_to((data / r["file_name"]).resolve())
        with open(out / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "label", "speaker"])
            writer.writeheader()
            writer.writerows({"file_name": Path(r["file_name"]).name, "label": r["label"], "speaker": r["speaker"]}
                             for r in chosen)
    return folder


def run_fold(fold: Path, runs: Path, student_overrides: list[str], seeds: int = 1,
             tag: str | None = None, configs: tuple[tuple[str, str], ...] = RUNS) -> dict[str, list[float]]:
    """Teacher, then KD from it and the baseline once per seed, each with `student_overrides`; each
    one's test accuracy (the teacher's as a one-item list) and wall time in seconds (`<name>_s`). A run
    that `runs` already holds, completed with the same config, is reused: an interrupted bench resumes
    where it stopped, and a sweep retrains only what its overrides change."""
    from kd.config import load_config
    from kd.demo.__main__ import finished_with_same_config

    results: dict[str, list[float]] = {}
    for name, config in configs:
        for seed in ([None] if name == "teacher" else range(seeds)):
            out = runs / (name if seed is None else f"{name}{f'-{tag}' if tag else ''}-seed{seed}")
            overrides = [f"data.data_dir={fold}", "data.eval_split=null", "data.test_split=test",
                         f"run.output_dir={out}"]
            if name == "kd":
                overrides.append(f"teacher.model={runs / 'teacher' / 'student'}")
            if seed is not None:
                overrides += [f"run.seed={seed}", *NO_EXPORT, *student_overrides]
            cfg = load_config(ROOT / config, overrides)
            # run.overwrite only says what to do with an interrupted run's folder: not part of the recipe.
            if any(finished_with_same_config(out, replace(cfg, run=replace(cfg.run, overwrite=flag)))
                   for flag in (False, True)):
                print(f"   {out.name}: reusing {out} (same config; delete it to retrain)", flush=True)
            else:
                command = [sys.executable, str(ROOT / "train_kd.py"), "--config", config, *overrides,
                           "run.overwrite=true"]
                result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
                if result.returncode != 0:
                    raise SystemExit(f"error: {' '.join(command)} failed (exit {result.returncode}):\n"
                                     f"{result.stderr[-3000:]}")
            accuracy, seconds = test_accuracy_and_time(out)
            results.setdefault(name, []).append(accuracy)
            results.setdefault(f"{name}_s", []).append(seconds)
    return results


def test_accuracy_and_time(run_dir: Path) -> tuple[float, float]:
    from kd.telemetry import read_events

    end = read_events(run_dir / "telemetry.jsonl")[-1]
    return end["metrics"]["test"]["student_acc"], end["duration_s"]


def print_table(results: dict) -> None:
    """Per held-out speaker: the teacher, each student's mean over seeds (min-max), the KD gain's mean
    over seeds (min..max of the per-seed gains) and KD's share of the teacher; then the mean of the
    folds, with the spread of that mean from seed to seed."""
    folds, per_seed = results["folds"], results["mean_per_seed"]

    def cell(values: list[float]) -> str:
        mean = 100 * statistics.mean(values)
        return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"

    def gain(kd: list[float], base: list[float]) -> str:
        gains = [100 * (k - b) for k, b in zip(kd, base)]
        mean = statistics.mean(gains)
        return f"{mean:+.1f}" if len(gains) == 1 else f"{mean:+.1f} ({min(gains):+.1f}..{max(gains):+.1f})"

    def seconds(acc: dict) -> str:  # mean wall time of one KD / one baseline run
        return (f"{statistics.mean(acc['kd_s']):.0f} / {statistics.mean(acc['baseline_s']):.0f}"
                if "kd_s" in acc else "")

    fmt = "{:<18} {:>8} {:>19} {:>19} {:>20} {:>11} {:>13}"
    print()
    print(fmt.format("held-out speaker", "teacher", "KD", "baseline", "KD gain", "KD/teacher", "s (KD/base)"))
    rows = [(speaker, acc) for speaker, acc in folds.items()] + [("mean", per_seed)]
    for speaker, acc in rows:
        print(fmt.format(speaker, f"{100 * statistics.mean(acc['teacher']):.1f}", cell(acc["kd"]),
                         cell(acc["baseline"]), gain(acc["kd"], acc["baseline"]),
                         f"{100 * statistics.mean(acc['kd']) / statistics.mean(acc['teacher']):.0f}%",
                         seconds(acc)))
    print(f"({len(folds)} folds x {results['seeds']} student seeds in {results['duration_s'] / 60:.1f} min; each "
          "speaker's 500 clips are the test set of the models trained on the other speakers; accuracies in %, "
          "students as mean (min-max) over seeds; the mean row's range is that of the fold mean from seed to seed)")


if __name__ == "__main__":
    sys.exit(main())
