"""Telemetry schema v1: one JSON object per line in <output_dir>/telemetry.jsonl.

This module is the contract between the trainer (writer) and the monitor (reader). It uses the
standard library only, so the monitor can import it without pulling in torch.

Every line: {"v": 1, "type": ..., "ts": unix seconds, "run_id": ..., "seq": n, "step": int or null}
Event types and their fields are listed in EVENT_FIELDS. NaN and infinities are written as null.
Readers ignore unknown keys; fields may be added within v1, never renamed or removed.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
FILE_NAME = "telemetry.jsonl"
COMMON_FIELDS = ("v", "type", "ts", "run_id", "seq", "step")
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "run_start": ("config", "env", "params", "plan", "estimate"),  # + soft_targets {source, cache, coverage}
    "step": ("epoch", "samples", "loss", "alpha", "temperature", "lr", "grad_norm", "rate", "time", "mem", "gpu",
             "memory"),  # + cache {source, hits, misses, covered} when soft targets come from the teacher cache
    "eval": ("split", "metrics", "duration_s"),
    "oom": ("phase", "micro_batch", "grad_accum", "mem", "action", "new_micro_batch", "new_grad_accum",
            "recovered", "message", "advice"),
    "checkpoint": ("path", "kind", "duration_s"),
    "warning": ("code", "message"),
    "run_end": ("status", "duration_s", "metrics", "peak", "error"),
}
RUN_END_STATUSES = ("completed", "failed", "interrupted", "oom")


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None and paths/tuples by JSON types, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars, without importing either
        return json_safe(value.item())
    return str(value)


class TelemetryWriter:
    """Appends schema-v1 events to a JSONL file, one flushed line per event.

    Create it on the main process only; `enabled=False` gives a writer that does nothing, so the
    calling code needs no `if is_main_process` around every event.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, run_id: str | None = None):
        self.path = Path(output_dir) / FILE_NAME
        self.run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.enabled = enabled
        self._seq = 0
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def emit(self, event_type: str, step: int | None = None, **fields: Any) -> dict[str, Any] | None:
        if event_type not in EVENT_FIELDS:
            raise ValueError(f"unknown telemetry event type {event_type!r}")
        if not self.enabled or self._file is None:
            return None
        record = {"v": SCHEMA_VERSION, "type": event_type, "ts": time.time(), "run_id": self.run_id,
                  "seq": self._seq, "step": step}
        record.update(fields)
        line = json.dumps(json_safe(record), allow_nan=False, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        self._seq += 1
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TelemetryTailer:
    """Reads complete new lines of a growing telemetry file.

    Keeps a byte offset and parses only up to the last newline, so a line being written is read
    once it is complete. Malformed lines are counted and skipped. If the file shrinks or is replaced
    (new inode), reading restarts from the beginning and `reset` is set until the caller clears it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.malformed = 0
        self.reset = False
        # The file's modification time at the last read: no line in it was written later, so it
        # dates the run's last sign of life (a cut file's lines are as old as its mtime, not "now").
        self.mtime: float | None = None
        self._inode: int | None = None

    def read_new(self, max_bytes: int | None = None) -> list[dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if self._inode is not None and (st.st_ino != self._inode or st.st_size < self.offset):
            self.offset = 0
            self.malformed = 0
            self.reset = True
        self._inode = st.st_ino
        self.mtime = st.st_mtime
        if st.st_size <= self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(max_bytes) if max_bytes else f.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        return list(self._parse(chunk[: end + 1]))

    def _parse(self, data: bytes) -> Iterator[dict[str, Any]]:
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                self.malformed += 1
                continue
            if not isinstance(record, dict) or "type" not in record:
                self.malformed += 1
                continue
            yield record


STEP_MARKERS = (b'"type":"step"', b'"type": "step"')


def load_history(tailer: TelemetryTailer, keep_steps: int) -> list[dict[str, Any]]:
    """Catch a tailer up with an existing file in time that hardly grows with its size.

    Every event other than `step` is parsed (run starts, evals, checkpoints, OOMs, the end), but of
    the step lines only the last `keep_steps` are: a viewer keeping `keep_steps` points per series
    would discard the others anyway. Lines are sorted out by byte search, without JSON parsing.
    Afterwards the tailer reads on from the end of the last complete line.
    """
    try:
        st = tailer.path.stat()
        data = tailer.path.read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n")
    if end < 0:
        return []
    lines = data[: end + 1].split(b"\n")
    is_step = [any(marker in line for marker in STEP_MARKERS) for line in lines]
    steps_seen, keep = 0, [False] * len(lines)
    for i in range(len(lines) - 1, -1, -1):
        if is_step[i]:
            steps_seen += 1
            keep[i] = steps_seen <= keep_steps
        else:
            keep[i] = True
    events = list(tailer._parse(b"\n".join(line for line, k in zip(lines, keep) if k)))
    tailer.offset, tailer._inode, tailer.mtime = end + 1, st.st_ino, st.st_mtime
    return events


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All complete, well-formed events of a telemetry file (or of a run folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / FILE_NAME
    return TelemetryTailer(p).read_new()
