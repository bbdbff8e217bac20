"""Live monitor of a kd training run: VRAM against the budget, throughput, losses, evaluation, OOMs.

    python monitor_tui.py runs/kws-5gb          # a run folder (or its telemetry.jsonl)
    python monitor_tui.py                       # the newest run under runs/
    python monitor_tui.py runs/kws-5gb --once   # print a plain-text summary and exit

It only reads <run>/telemetry.jsonl, so it works locally or over SSH, and it never imports torch:
a monitor must not create a CUDA context and take VRAM from the budget it is watching.
Keys: q quit, p pause/resume following, d dismiss the OOM banner, ? help.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd.telemetry import FILE_NAME, TelemetryTailer, load_history


def resolve_path(arg: str | None, runs_dir: Path = Path("runs")) -> Path:
    """A telemetry file: PATH itself, PATH/telemetry.jsonl, or the newest under runs/."""
    if arg is not None:
        path = Path(arg)
        return path / FILE_NAME if path.is_dir() or not path.suffix else path
    candidates = sorted(runs_dir.glob(f"*/{FILE_NAME}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"error: no runs under {runs_dir}/ yet; pass a run folder, e.g. "
                         f"python monitor_tui.py runs/kws-5gb (it will wait for the file to appear)")
    return candidates[-1]


def print_once(path: Path, stall_after_s: float) -> int:
    from kd.tui.state import RunState, summary_text

    if not path.exists():
        print(f"error: {path} does not exist (yet)", file=sys.stderr)
        return 2
    state = RunState(stall_after_s=stall_after_s)
    tailer = TelemetryTailer(path)
    mtime = path.stat().st_mtime
    for event in load_history(tailer, keep_steps=state.history):
        state.apply(event, mtime)
    state.malformed = tailer.malformed
    print(summary_text(state))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="run folder or telemetry.jsonl (default: newest under runs/)")
    parser.add_argument("--once", action="store_true", help="print a plain-text summary and exit")
    parser.add_argument("--stall-after", type=float, default=120.0, metavar="SECONDS",
                        help="show the run as stalled after this long without a new line (default 120)")
    parser.add_argument("--history", type=int, default=600, metavar="N", help="points kept per series (default 600)")
    args = parser.parse_args(argv)
    path = resolve_path(args.path)
    if args.once:
        return print_once(path, args.stall_after)
    from kd.tui.app import MonitorApp

    MonitorApp(path, stall_after_s=args.stall_after, history=args.history).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
