"""Shared fixtures: tiny models built from configs and tiny datasets made on the spot (no downloads)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# Each test session gets its own Hugging Face cache, and nothing reaches the network. Set before
# anything imports huggingface_hub or datasets: they read these once, at import (set later, from a
# fixture, only the subprocesses saw them, while tests in this process wrote datasets' cache into
# ~/.cache and spent 25 s in download retries for a dataset name that does not exist).
_HF_HOME = tempfile.mkdtemp(prefix="kd-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(HF_HOME=_HF_HOME, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import pytest  # noqa: E402
import yaml  # noqa: E402

from kd.synthetic import TONE_LABELS, save_tiny_wav2vec2, write_tone_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["TONE_LABELS", "save_tiny_wav2vec2", "write_tone_dataset"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped with the reason on a machine without one."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.py on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tone_data(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tones"), {"train": 8, "validation": 4, "test": 4})


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("teacher"), TONE_LABELS)


def tiny_config(tone_data: Path, teacher_path: Path | None, output_dir: Path, **sections: dict[str, Any]) -> dict:
    """A complete config dict for a few-step CPU run on the tone data."""
    cfg = {
        "run": {"name": "tiny", "output_dir": str(output_dir), "seed": 0},
        "data": {"dataset": "audiofolder", "data_dir": str(tone_data), "test_split": "test", "num_workers": 0},
        "teacher": {"model": str(teacher_path) if teacher_path else None},
        "student": {"type": "logmel_cnn", "n_mels": 16, "channels": [8, 16]},
        # Each run its own teacher cache, so no test sees rows another one stored.
        "distillation": {"enabled": teacher_path is not None, "alpha": 0.5, "temperature": 2.0,
                         "cache_dir": str(Path(output_dir) / "teacher_cache")},
        "train": {"batch_size": 4, "epochs": None, "max_steps": 4, "lr": 0.01, "eval_every": 2},
        "telemetry": {"log_every": 1, "warmup_steps": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class CliTimeout(AssertionError):
    """A command that did not end in time; the message holds its processes' stacks and last output."""


_current = {"launches": True}


@pytest.fixture(autouse=True)
def _note_launches_marker(request):
    """Remember whether the running test is marked `launches`, which run_cli requires: `make test-fast`
    leaves those out, and an unmarked test that starts a training run would quietly slow it down."""
    _current["launches"] = request.node.get_closest_marker("launches") is not None
    yield
    _current["launches"] = True


def run_cli(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
            launcher: list[str] | None = None, timeout: int = 300):
    """Run train_kd.py in a subprocess (optionally under `accelerate launch`) and return the result."""
    import subprocess
    import tempfile

    assert _current["launches"], "a test that runs train_kd.py needs @pytest.mark.launches (test-fast skips those)"

    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env.setdefault("PYTHONFAULTHANDLER", "1")  # SIGABRT on a timeout prints every thread's stack
    full_env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks talk over loopback, whatever the host's network
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train_kd.py")] + args
    # Output goes to files, not pipes: a stray worker that still holds a pipe open would block the
    # read forever (torch's elastic launcher starts each rank in its own session, out of our reach
    # by process group).
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        with subprocess.Popen(cmd, cwd=cwd or ROOT, env=full_env, stdout=out, stderr=err, text=True,
                              start_new_session=True) as proc:
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Where each process hung goes into the failure, so a hang seen once in CI is diagnosable.
                kill_process_tree(proc.pid, first=signal.SIGABRT)
                proc.wait()
                timed_out = True
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        raise CliTimeout(f"{' '.join(cmd[-3:])} did not end within {timeout} s; the stacks of its processes and "
                         f"its last output:\n--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def umask_mode(path: Path) -> int:
    """The mode a plain open() / mkdir() gives `path` under this process's umask: 0666 / 0777 less it."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if path.is_dir() else 0o666) & ~umask


def once_more_if_hung(attempt):
    """(1, attempt(1)), or, if that launch hangs, (2, attempt(2)): the test gives each attempt its own
    folder (and the launcher its own port).

    A two-process CPU run can hang after it has ended (a rank stuck with its peer gone); the first
    hang's stacks go into a warning, a second hang fails with its own."""
    try:
        return 1, attempt(1)
    except CliTimeout as hang:
        warnings.warn(f"two-process launch, attempt 1 hung: {hang}")
        return 2, attempt(2)


def kill_process_tree(pid: int, first: int | None = None) -> None:
    """SIGKILL a process and every descendant, whatever session or process group they moved to.
    With `first` (SIGABRT, say), every member gets that signal and two seconds before the kill."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces; the fields after its closing ')' do not.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    for sig in ([first] if first is not None else []) + [signal.SIGKILL]:
        for member in tree:
            try:
                os.kill(member, sig)
            except ProcessLookupError:
                pass
        if sig != signal.SIGKILL:
            time.sleep(2)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(num_processes: int = 1, config_file: Path | None = None) -> list[str]:
    """`accelerate launch` with explicit flags, so a developer's own accelerate config cannot leak in."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        launcher += ["--config_file", str(config_file)]
    if num_processes > 1:
        # A port of its own: with the default 29500, two suites on one machine (or a rank left over
        # from an earlier run) would meet in one rendezvous and wait for each other forever.
        launcher += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                     "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    else:
        launcher += ["--num_processes", "1", "--num_machines", "1"]
    return launcher + ["--mixed_precision", "no", "--dynamo_backend", "no"]
