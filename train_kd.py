"""Distil a teacher's soft targets into a small, fast student.

    # The flagship: a Speech Commands teacher into a tiny log-mel CNN, inside a 5.5 GB VRAM budget
    accelerate launch train_kd.py --config configs/5gb.yaml

    # Override any key after the config (validated like the file itself)
    accelerate launch train_kd.py --config configs/demo.yaml train.batch_size=8 distillation.alpha=0.7

    # Tiny run on a CPU, one process, no launcher (after `make demo` has built the demo data)
    python train_kd.py --config configs/demo.yaml train.max_steps=20 run.name=demo-smoke

    # Two CPU processes (gloo), e.g. to check sharding and metric gathering without GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no train_kd.py --config configs/demo.yaml

    # Continue from the newest checkpoint in the run folder (or pass a checkpoint folder)
    accelerate launch train_kd.py --config configs/demo.yaml --resume

    # Will it fit? Memory estimate and advice, no training (works without a GPU)
    python train_kd.py --config configs/5gb.yaml --preflight

    # Teacher outputs for every split into the on-disk cache, then exit (resumable; also with
    # `accelerate launch --num_processes N`, each process computing its own share)
    python train_kd.py --config configs/5gb.yaml --precompute-teacher

Outputs go to run.output_dir (default runs/<run.name>): telemetry.jsonl (watch it with
`python monitor_tui.py runs/<name>`), config.yaml (the resolved config), checkpoints/ and student/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])  # the examples, after the summary line
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from a checkpoint folder, or from the newest one in the run folder")
    parser.add_argument("--preflight", action="store_true",
                        help="print the memory estimate and advice, then exit without training (no GPU needed)")
    parser.add_argument("--precompute-teacher", action="store_true",
                        help="fill the teacher-output cache (distillation.teacher_cache) for every split, then exit")
    parser.add_argument("--cache-read-only", action="store_true",
                        help="remote teacher: use cached answers, never write to the cache "
                             "(teacher.endpoint.cache_read_only)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imports after argument parsing so --help is instant; validation still precedes any loading.
    from kd.config import load_config
    from kd.errors import KDError
    from kd.stopping import Stopped

    try:
        cfg = load_config(args.config, args.overrides)
        if args.cache_read_only:
            if cfg.teacher.endpoint is None:
                raise KDError("--cache-read-only is for a remote teacher, and this config has no teacher.endpoint")
            cfg.teacher.endpoint.cache_read_only = True
        resume = resolve_resume(args.resume, cfg.output_dir)
        if not (args.preflight or args.precompute_teacher):  # those write nothing in the run folder
            from kd.run_folder import claim

            claim(cfg, resuming=resume is not None)
        from kd.build import build_run, preflight_from_configs
        from kd.trainer import Trainer

        if args.preflight and preflight_from_configs(cfg):  # a language-model pair: from its configs alone
            print("Pre-flight only: nothing was downloaded, trained or written (drop --preflight to train).")
            return 0

        if args.precompute_teacher:
            check_can_precompute(cfg)
        run = build_run(cfg, plan_only=args.preflight, precompute=args.precompute_teacher)  # prints the estimate
        if args.preflight:
            print("Pre-flight only: nothing was trained or written (drop --preflight to train).")
            return 0
        if args.precompute_teacher:
            Trainer(run, record=False).precompute()
            return 0
        metrics = Trainer(run).fit(resume_from=resume)
        report(cfg, metrics)
        return 0
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:  # SIGTERM (a scheduler) or Ctrl-C, honoured at the end of a step
        print(f"stopped by {exc}: the state after the last step is checkpointed and run_end written; continue "
              "with --resume", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted: run_end written with status 'interrupted'; continue from the last checkpoint with "
              "--resume", file=sys.stderr)
        return 130


def check_can_precompute(cfg) -> None:
    from kd.errors import ConfigError

    if not cfg.distillation.enabled:
        raise ConfigError(["--precompute-teacher: distillation.enabled is false, there is no teacher to run"])
    if cfg.distillation.teacher_cache == "off":
        raise ConfigError(["--precompute-teacher: distillation.teacher_cache is 'off'; set it to auto or require"])
    if cfg.augment.enabled and not cfg.augment.views:
        raise ConfigError(["--precompute-teacher: augment.enabled is true with augment.views 0, so the teacher's "
                           "inputs change every epoch and cannot be computed once; set augment.views (k fixed "
                           "versions of each clip, each stored) or augment.enabled: false"])


def resolve_resume(arg: str | None, output_dir: Path) -> Path | None:
    from kd.checkpoints import checkpoint_to_resume
    from kd.errors import KDError

    if arg is None:
        return None
    if "=" in arg and not Path(arg).exists():  # `--resume key=value`: argparse took the override as the path
        raise KDError(f"--resume: {arg!r} looks like a config override, not a checkpoint; write "
                      f"`--resume latest {arg}` or put the override before --resume")
    return checkpoint_to_resume(arg, output_dir)


def report(cfg, metrics: dict) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    for role, values in metrics.items():
        shown = ", ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4f}" for k, v in values.items()
                          if v is not None)
        print(f"final {role}: {shown}")
    print(f"student: {cfg.output_dir / 'student'}  telemetry: {cfg.output_dir / 'telemetry.jsonl'}")


if __name__ == "__main__":
    sys.exit(main())
