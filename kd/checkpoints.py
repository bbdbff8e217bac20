"""Checkpoints on disk: where they are, a manifest that tells an intact one from a damaged one, and
which one `--resume` continues from.

A checkpoint is `accelerator.save_state` written into `<run>/checkpoints/step_NNNNNNN.tmp` by every
process and renamed into place once all are done, so a kill during the save leaves the previous
checkpoint as the newest. Before the rename the main process records every file's size in
`kd_checkpoint.json`; a disk that filled up, or a copy cut short, then shows as a file that is
missing or shorter than recorded. `--resume` without a path skips damaged checkpoints (saying
which) and continues from the newest intact one; a damaged one named explicitly is one line naming
the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from kd.errors import KDError

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "kd_checkpoint.json"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints renamed into place, oldest first (a `.tmp` folder is one still being written)."""
    folder = output_dir / CHECKPOINT_DIR
    return sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def write_manifest(folder: Path, step: int) -> None:
    """Record every file of a checkpoint folder and its size (called once all processes have saved)."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is intact (or predates manifests)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None  # written before manifests existed: nothing to compare with
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest} is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    return None


def checkpoint_to_resume(arg: str, output_dir: Path, say: Callable[[str], None] = print) -> Path:
    """The checkpoint `--resume ARG` continues from: ARG's folder, or for `latest` the newest intact one."""
    if arg != "latest":
        path = Path(arg)
        if not path.is_dir():
            raise KDError(f"--resume: no checkpoint found at {arg} (checkpoints are written every "
                          "train.checkpoint_every steps)")
        problem = damage(path)
        if problem is not None:
            raise KDError(f"--resume: checkpoint {path} is damaged ({problem}); resume from another one in "
                          f"{path.parent}, or with --resume alone from the newest intact one")
        return path
    found = list_checkpoints(output_dir)
    if not found:
        raise KDError(f"--resume: no checkpoint found at {output_dir / CHECKPOINT_DIR} (checkpoints are written "
                      "every train.checkpoint_every steps)")
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            return path
        say(f"Skipping damaged checkpoint {path.name}: {problem}")
    raise KDError(f"--resume: every checkpoint in {output_dir / CHECKPOINT_DIR} is damaged (the newest: "
                  f"{damage(found[-1])}); start the run again without --resume")
