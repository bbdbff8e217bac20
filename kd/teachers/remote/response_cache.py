"""A remote teacher's answers on disk: every response stored once, keyed so that a changed teacher,
tokenizer or request never reads a stale one.

One SQLite file (`<distillation.cache_dir>/remote_teacher.sqlite`), the same choices as the local
soft-target cache (kd/teachers/store.py): WAL mode and a busy timeout, so many processes and threads
write at once without corrupting it, and every stored answer survives a killed run.

    responses(key TEXT PRIMARY KEY, created REAL, k INTEGER, data BLOB)
      key   SHA-256 of {teacher identity, request}: the identity is the endpoint's model id, the
            revision or quantisation the server reports, and the hash of the teacher tokenizer;
            the request is the mode, the prompt (token ids or messages), k, temperature, max tokens
      data  the parsed answer (kd.teachers.remote.protocol.Scored) as an .npz of int32 ids and float32 logprobs
            (a 128-token row at k = 20: about 21 kB, against 60 kB of JSON)
    endpoints(name TEXT PRIMARY KEY, identity TEXT)
            the last identity seen per endpoint, so a run whose server is down can still train on
            what is cached
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from kd.teachers.remote.protocol import Scored
from kd.teachers.store import CacheError, open_sqlite

FILE_NAME = "remote_teacher.sqlite"


def request_key(identity: dict[str, Any], request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"teacher": identity, "request": request}, sort_keys=True).encode()).hexdigest()


class ResponseCache:
    """Stored answers of one teacher identity. `ttl_s`: older answers count as absent (and are
    replaced when fetched again). `read_only`: never written (evaluation, shared caches)."""

    def __init__(self, folder: Path, identity: dict[str, Any], ttl_s: float | None = None, read_only: bool = False):
        self.path = Path(folder).expanduser() / FILE_NAME
        self.identity, self.ttl_s, self.read_only = identity, ttl_s, read_only
        self._local = threading.local()
        if read_only and not self.path.is_file():
            self._absent = True  # nothing to read; every lookup misses
            return
        self._absent = False
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._run(self._create)

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = open_sqlite(self.path, self.read_only)
        return conn

    def _create(self, conn: sqlite3.Connection) -> None:
        if self.read_only:
            conn.execute("SELECT COUNT(*) FROM responses LIMIT 1").fetchone()
            return
        conn.execute("CREATE TABLE IF NOT EXISTS responses(key TEXT PRIMARY KEY, created REAL NOT NULL, "
                     "k INTEGER NOT NULL, data BLOB NOT NULL) WITHOUT ROWID")
        conn.execute("CREATE TABLE IF NOT EXISTS endpoints(name TEXT PRIMARY KEY, identity TEXT NOT NULL)")

    def _run(self, fn):
        try:
            return fn(self._connect())
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"remote-teacher cache {self.path} is unreadable ({exc}); delete it to start a new one"
                             ) from None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- identities ------------------------------------------------------------------------
    def remember_identity(self, endpoint: str) -> None:
        if not self.read_only:
            self._run(lambda c: c.execute("INSERT OR REPLACE INTO endpoints VALUES (?, ?)",
                                          (endpoint, json.dumps(self.identity, sort_keys=True))))

    @staticmethod
    def last_identity(folder: Path, endpoint: str) -> dict[str, Any] | None:
        """The identity last seen for `endpoint` (the server is down: train on what it answered then)."""
        path = Path(folder).expanduser() / FILE_NAME
        if not path.is_file():
            return None
        try:
            conn = open_sqlite(path, read_only=True)
            try:
                row = conn.execute("SELECT identity FROM endpoints WHERE name = ?", (endpoint,)).fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError:
            return None
        return json.loads(row[0]) if row else None

    # -- answers -----------------------------------------------------------------------------
    def key(self, request: dict[str, Any]) -> str:
        return request_key(self.identity, request)

    def get(self, key: str) -> Scored | None:
        if self._absent:
            return None
        row = self._run(lambda c: c.execute("SELECT created, data FROM responses WHERE key = ?", (key,)).fetchone())
        if row is None or (self.ttl_s is not None and time.time() - row[0] > self.ttl_s):
            return None
        try:
            with np.load(io.BytesIO(row[1]), allow_pickle=False) as z:
                return Scored.from_arrays(z)
        except (ValueError, KeyError, OSError) as exc:
            raise CacheError(f"remote-teacher cache {self.path}: the answer under {key[:12]}... is unreadable "
                             f"({exc}); delete the file to start a new one") from None

    def put(self, key: str, answer: Scored) -> bool:
        """Store (replacing an expired answer); False in read-only mode."""
        if self.read_only:
            return False
        buffer = io.BytesIO()
        np.savez(buffer, **answer.arrays())
        self._run(lambda c: c.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                                      (key, time.time(), answer.k, buffer.getvalue())))
        return True

    def count(self) -> int:
        if self._absent:
            return 0
        return self._run(lambda c: c.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
