"""Writes that never leave a half-written file or folder behind.

Everything goes to a temporary sibling first and is renamed into place at the end (one rename on the
same file system), so an interrupted write keeps the previous version whole.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator


def process_umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def plain_modes(path: Path) -> None:
    """Give `path`, and what a folder holds, the modes a plain open() / mkdir() would have given.

    Some writers make private files whatever the umask: safetensors 0.8 writes through a 0600
    temporary file and renames it (safetensors#782), which transformers' save_pretrained inherits.
    A model nobody else can read breaks serving it as another user or from a container."""
    mask = process_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def temporary_sibling(target: Path, folder: bool) -> Path:
    """A new, empty file or folder beside `target` with a name no one else uses.

    Made with the user's umask, as the target would be (tempfile's mkstemp / mkdtemp make them
    private, 0600 / 0700, and the rename keeps that)."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    if folder:
        tmp.mkdir()
    else:
        tmp.touch(exist_ok=False)
    return tmp


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target, folder=True)
    try:
        yield tmp
        plain_modes(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    tmp = temporary_sibling(target, folder=False)
    try:
        yield tmp
        plain_modes(tmp)  # in case the writer replaced it with a file of its own
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

