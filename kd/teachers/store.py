"""The teacher-output cache: every soft target computed once, on disk, keyed so it is never stale.

Layout (one SQLite file per teacher identity, in `distillation.cache_dir`):

    <cache_dir>/<key>.sqlite       key = the first 20 hex digits of sha256(identity JSON)
      meta(name, value)            format, identity (the JSON the key hashes), dtype, num_labels, labels
      splits(split_id, name, fingerprint, size)
      logits(split_id, idx, data)  data: num_labels little-endian float16 or float32 logits, or with
                                   top_k: k int32 class indices, their k log-probabilities and the
                                   log of the probability mass left to the other classes.
                                   Language models (TokenCache): an int32 count n of learnt positions,
                                   then n x k int32 token ids and n x k log-probabilities (top_k only)

The identity is everything that can change a teacher's output: the content hash of its
safetensors files (not their path), its dtype, the device kind when the dtype is half precision
(CPU and CUDA half kernels differ; fp32 is treated as portable, so a cache filled on a big machine
serves a small one), the autocast precision it runs under, and the preprocessing that feeds it
(feature extractor or tokenizer config, sampling rate, clip length, token length). A changed
teacher therefore gets a new file beside the old one. Within a file a split is identified by its
name and a hash of its inputs as stored (kd.data.content_fingerprint: bytes, text, or file paths
with size and modification time, after any subsampling), and a row by the sample's index in that
split.

Why SQLite: one portable file, transactional (an interrupted fill keeps every committed batch and
continues where it stopped), safe for several processes or threads writing at once (WAL mode, a
busy timeout), and a point lookup per batch is fast enough that cached KD runs at the student's
speed (bench/RESULTS.md). Shards plus a manifest would need their own locking and atomic renames.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from kd.errors import KDError

FORMAT = 1
DTYPES = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2")}


class CacheError(KDError):
    """The cache file cannot be read (truncated, corrupt, foreign) or does not cover what `require` needs."""


def file_sha256(path: Path) -> str:
    """The content hash of a weights file. In the Hugging Face cache the blob's name already is the
    SHA-256 of its content (for LFS files), so Hub teachers are not read twice."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_sqlite(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """A connection for one thread: autocommit (transactions are explicit), a long busy timeout so
    concurrent writers wait instead of failing, WAL; read-only opens never create or change the file."""
    if read_only:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=120.0, isolation_level=None)
    conn = sqlite3.connect(path, timeout=120.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash loses at most the last commit
    return conn


def identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def effective_top_k(top_k: int | None, num_labels: int) -> int | None:
    """Top-k only pays where it is smaller than the label space (large vocabularies)."""
    return top_k if top_k is not None and top_k < num_labels else None


def stored_identity(identity: dict[str, Any], num_labels: int, dtype: str, top_k: int | None) -> dict[str, Any]:
    """The teacher identity plus how rows are stored: what a cache file's name hashes."""
    k = effective_top_k(top_k, num_labels)
    return dict(identity, cache_dtype=dtype, **({"top_k": k} if k else {}))


def cache_file(folder: Path, identity: dict[str, Any], num_labels: int, *, dtype: str, top_k: int | None) -> Path:
    return Path(folder).expanduser() / f"{identity_key(stored_identity(identity, num_labels, dtype, top_k))}.sqlite"


class TeacherCache:
    """One teacher identity's soft targets. Thread- and process-safe; each thread gets a connection."""

    def __init__(self, folder: Path, identity: dict[str, Any], num_labels: int, label_names: list[str],
                 *, dtype: str = "fp32", top_k: int | None = None):
        self.top_k = effective_top_k(top_k, num_labels)
        self.identity = stored_identity(identity, num_labels, dtype, top_k)
        self.path = cache_file(folder, identity, num_labels, dtype=dtype, top_k=top_k)
        self.num_labels, self.label_names, self.dtype = num_labels, list(label_names), DTYPES[dtype]
        self._local = threading.local()
        self._check_or_create()

    # -- connection and integrity ---------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = open_sqlite(self.path)
        return conn

    def corrupt(self, why: str) -> CacheError:
        return CacheError(f"teacher cache {self.path} is unreadable ({why}); delete it and rebuild it with "
                          "`python train_kd.py --config <your config> --precompute-teacher`")

    def _check_or_create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.is_file() and self.path.stat().st_size > 0
        try:
            conn = self._connect()
            if existed:
                ok = conn.execute("PRAGMA quick_check").fetchone()[0]
                if ok != "ok":
                    raise self.corrupt(ok)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS splits(split_id TEXT PRIMARY KEY, name TEXT, fingerprint TEXT, "
                         "size INTEGER)")
            conn.execute("CREATE TABLE IF NOT EXISTS logits(split_id TEXT NOT NULL, idx INTEGER NOT NULL, "
                         "data BLOB NOT NULL, PRIMARY KEY(split_id, idx)) WITHOUT ROWID")
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            mine = {"format": str(FORMAT), "identity": json.dumps(self.identity, sort_keys=True),
                    "num_labels": str(self.num_labels), "labels": json.dumps(self.label_names)}
            if not meta:
                conn.executemany("INSERT INTO meta VALUES (?, ?)", list(mine.items()))
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            self.close()
            raise self.corrupt(str(exc)) from None
        if meta and meta != mine:
            differs = sorted(k for k in mine if meta.get(k) != mine[k])
            raise CacheError(f"teacher cache {self.path} was written for another teacher or label space "
                             f"({', '.join(differs)} differ); give this run its own distillation.cache_dir, or "
                             "delete the file if no other run uses it")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- splits ------------------------------------------------------------------------------
    def register_split(self, name: str, fingerprint: str, size: int) -> str:
        split_id = f"{name}:{fingerprint}"
        self._run(lambda c: c.execute("INSERT OR IGNORE INTO splits VALUES (?, ?, ?, ?)",
                                      (split_id, name, fingerprint, size)))
        return split_id

    def coverage(self, split_id: str) -> int:
        return self._run(lambda c: c.execute("SELECT COUNT(*) FROM logits WHERE split_id = ?",
                                             (split_id,)).fetchone()[0])

    def missing(self, split_id: str, size: int) -> list[int]:
        have = self._run(lambda c: {i for (i,) in c.execute("SELECT idx FROM logits WHERE split_id = ?", (split_id,))})
        return [i for i in range(size) if i not in have]

    # -- rows --------------------------------------------------------------------------------
    @property
    def row_bytes(self) -> int:
        if self.top_k is None:
            return self.num_labels * self.dtype.itemsize
        return self.top_k * 4 + (self.top_k + 1) * self.dtype.itemsize

    def encode(self, logits: torch.Tensor, labels: torch.Tensor | None = None) -> list[bytes]:
        """Rows as stored: the logits, or (top_k) indices, log-probabilities and the rest's log-mass."""
        if self.top_k is None:
            values = logits.detach().float().cpu().numpy().astype(self.dtype)
            return [row.tobytes() for row in values]
        logp = torch.log_softmax(logits.detach().float().cpu(), dim=-1)
        top, idx = logp.topk(self.top_k, dim=-1)
        # log(1 - sum p_top), computed stably; at least the smallest float so the log stays finite.
        rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(top, dim=-1)), min=torch.finfo(torch.float32).tiny))
        return [idx[r].numpy().astype("<i4").tobytes()
                + np.append(top[r].numpy(), rest[r].item()).astype(self.dtype).tobytes() for r in range(len(top))]

    def decode(self, blob: bytes) -> np.ndarray:
        """One stored row as float32 logits over all labels (top_k: log-probabilities, the rest's
        mass spread evenly over the classes outside the top k)."""
        if self.top_k is None:
            return np.frombuffer(blob, dtype=self.dtype).astype(np.float32)
        k = self.top_k
        idx = np.frombuffer(blob[:4 * k], dtype="<i4")
        values = np.frombuffer(blob[4 * k:], dtype=self.dtype).astype(np.float32)
        row = np.full(self.num_labels, values[k] - np.log(self.num_labels - k), dtype=np.float32)
        row[idx] = values[:k]
        return row

    def check_row(self, split_id: str, idx: int, blob: bytes) -> None:
        if len(blob) != self.row_bytes:
            raise self.corrupt(f"row {split_id}/{idx} holds {len(blob)} bytes, expected {self.row_bytes}")

    def get(self, split_id: str, indices: Iterable[int]) -> dict[int, Any]:
        """The stored rows of those samples that are cached, decoded (float32 logits here)."""
        wanted = [int(i) for i in indices]
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(wanted), 900):  # SQLite's limit on bound parameters is 999 in old builds
            chunk = wanted[start:start + 900]
            marks = ",".join("?" * len(chunk))
            rows = self._run(lambda c: c.execute(
                f"SELECT idx, data FROM logits WHERE split_id = ? AND idx IN ({marks})", (split_id, *chunk)).fetchall())
            for idx, blob in rows:
                self.check_row(split_id, idx, blob)
                out[idx] = self.decode(blob)
        return out

    def put(self, split_id: str, indices: Iterable[int], logits: torch.Tensor,
            labels: torch.Tensor | None = None) -> int:
        """Store rows (one transaction); rows already there are kept. Returns how many were new.
        `labels`: language models only (which positions are learnt)."""
        rows = [(split_id, int(i), blob) for i, blob in zip(indices, self.encode(logits, labels))]

        def write(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO logits VALUES (?, ?, ?)", rows)
            added = conn.total_changes - before
            conn.execute("COMMIT")
            return added

        return self._run(write)

    def _run(self, fn):
        try:
            return fn(self._connect())
        except sqlite3.DatabaseError as exc:
            raise self.corrupt(str(exc)) from None


class TokenCache(TeacherCache):
    """A language-model teacher's soft targets: per sample, the top-k next-token log-probabilities at
    each learnt position (labels != -100), in order. Prompt and padding positions are not stored; a
    row's length therefore varies and is written at its start. Per position k x (4 + 2 or 4) bytes
    (k = 64, fp16: 384 B, against 98 kB for SmolLM2's full fp16 distribution)."""

    def __init__(self, folder: Path, identity: dict[str, Any], vocab_size: int, *, dtype: str = "fp32",
                 top_k: int = 64):
        super().__init__(folder, identity, vocab_size, [], dtype=dtype, top_k=top_k)
        if self.top_k is None:
            raise CacheError(f"a language-model cache needs top_k below the vocabulary size ({vocab_size})")

    def check_row(self, split_id: str, idx: int, blob: bytes) -> None:
        n = int(np.frombuffer(blob[:4], dtype="<i4")[0]) if len(blob) >= 4 else -1
        if n < 0 or len(blob) != 4 + n * self.top_k * (4 + self.dtype.itemsize):
            raise self.corrupt(f"row {split_id}/{idx} holds {len(blob)} bytes, which does not match its "
                               f"{n} positions of top {self.top_k}")

    def encode(self, logits: torch.Tensor, labels: torch.Tensor | None = None) -> list[bytes]:
        from kd.lm.losses import IGNORE, TopK

        assert labels is not None, "a token cache stores the learnt positions: labels are needed"
        rows = []
        for r in range(logits.shape[0]):
            learnt = (labels[r] != IGNORE).nonzero().squeeze(-1).to(logits.device)
            top = TopK.from_logits(logits[r].index_select(0, learnt), self.top_k)
            rows.append(np.int32(len(learnt)).astype("<i4").tobytes()
                        + top.indices.cpu().numpy().astype("<i4").tobytes()
                        + top.logprobs.cpu().numpy().astype(self.dtype).tobytes())
        return rows

    def decode(self, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, log-probabilities), each (learnt positions, k)."""
        n, k = int(np.frombuffer(blob[:4], dtype="<i4")[0]), self.top_k
        idx = np.frombuffer(blob[4:4 + 4 * n * k], dtype="<i4").reshape(n, k)
        logp = np.frombuffer(blob[4 + 4 * n * k:], dtype=self.dtype).astype(np.float32).reshape(n, k)
        return idx, logp
