"""The run folder (`run.output_dir`, default `runs/<run.name>`) holds one run: its telemetry, resolved
config, checkpoints and student. A new run never writes into an earlier one's: telemetry would append
to the old file and the student would replace the old one without a word. So a folder that already
holds a run is refused unless the run continues it (`--resume`) or the config says to start over
(`run.overwrite: true`), in which case the old run's files are removed first, and the run says so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from kd.checkpoints import CHECKPOINT_DIR
from kd.errors import KDError
from kd.telemetry import FILE_NAME as TELEMETRY_FILE

STUDENT_DIR = "student"
CONFIG_FILE = "config.yaml"
WRITTEN = (TELEMETRY_FILE, CONFIG_FILE, CHECKPOINT_DIR, STUDENT_DIR)  # what a run leaves in its folder


def previous_run(folder: Path) -> list[str]:
    """What of an earlier run the folder holds (empty: none)."""
    return [name for name in WRITTEN if (folder / name).exists()]


def claim(cfg: Any, resuming: bool, say: Callable[[str], None] = print) -> None:
    """Make `cfg.output_dir` this run's: continued (`resuming`), fresh, or emptied of the previous run's
    files when `run.overwrite` is true; else refuse, saying how to go on."""
    folder = Path(cfg.output_dir)
    make_writable(folder)
    found = previous_run(folder)
    if not found or resuming:
        return
    if not cfg.run.overwrite:
        raise KDError(f"run.output_dir: {folder} already holds a run ({', '.join(found)}); continue it with "
                      "--resume, give this run another run.name, or set run.overwrite: true to start over "
                      "(the previous run's files are removed)")
    for name in found:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # several processes may be removing it at once
        else:
            path.unlink(missing_ok=True)
    say(f"run.overwrite: removed the previous run's {', '.join(found)} from {folder}")


def make_writable(folder: Path) -> None:
    """Create the run folder now, so that a path the run cannot write to fails before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise KDError(f"run.output_dir: {folder} is (or lies under) a file, not a folder; choose another "
                      "run.output_dir or run.name") from None
    except OSError as exc:
        raise KDError(f"run.output_dir: cannot create {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KDError(f"run.output_dir: {folder} is not writable by this user; choose another run.output_dir")
