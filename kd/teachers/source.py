"""Where a batch's soft targets come from: one interface, so the training loop never asks which source it has.

Sources (one file each; kd/teachers/factory.py builds the one the config asks for):

- `TeacherForward` (online.py): the teacher runs on every batch (online KD; the only choice with augmentation).
- `CachedTeacher` (cached.py): rows come from the on-disk store (store.py); misses are computed by
  the teacher, used and stored; once every split is covered the teacher is released and training
  goes on without it. With `require`, the teacher is never loaded at all.
- `RemoteTeacher` (remote/source.py): a teacher behind an OpenAI-compatible server.

The loop calls `logits(batch, role)` for role train / eval / test, `prefetch` around its batches,
`after_epoch` at each epoch's end, and reports `stats()` in its step telemetry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from kd.errors import KDError

ROLES = ("train", "eval", "test")


class SourceFailure(KDError):
    """A source could not give a batch's soft targets mid-run (a server that stopped answering): the
    loop saves the state after the last finished step and stops, naming the cause."""


@dataclass(frozen=True, kw_only=True)
class SplitRunner:
    """What a source needs from the loop to run its teacher over whole splits (the cache's fill):
    each process computes its own share (`rank` of `world`), batches made and moved as training
    makes them, under the run's autocast."""

    splits: dict[str, Any]  # role -> dataset
    loader: Callable[[Any], Iterable[dict[str, Any]]]  # a dataset's batches, not sharded over processes
    # A batch on the device with its model inputs; given a view (augment.views), its clips augmented as
    # that view draws them, so the teacher sees what training will show the student.
    prepare: Callable[[dict[str, Any], int | None], dict[str, Any]]
    autocast: Callable[[], AbstractContextManager]
    barrier: Callable[[], None]  # every process waits for the others
    rank: int = 0
    world: int = 1
    show: bool = True  # a progress bar (the local main process)


class SoftTargetSource(ABC):
    source = "teacher"  # names the source in telemetry (run_start.soft_targets.source)
    telemetry_key = "cache"  # the step event's field for `stats()`

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The teacher model held in memory for this source (None: it needs none, or released it)."""
        return None

    @abstractmethod
    def logits(self, batch: dict[str, Any], role: str) -> Any:
        """The batch's soft targets: teacher logits (batch, classes), or a language model's `TopK`."""

    def score(self, batch: dict[str, Any]) -> Any:
        """Soft targets of token rows that are in no split: the sequences a student sampled
        (distillation.on_policy), scored as they are. Only a teacher that runs can do it."""
        raise KDError(f"soft targets from the {self.source} cannot score the student's own samples "
                      "(distillation.on_policy needs a teacher that runs: local or remote in score mode)")

    def prefetch(self, batches: Iterable[dict[str, Any]], upcoming: Iterator[list[dict[str, Any]] | None]
                 ) -> Iterator[dict[str, Any]]:
        """The batches in order. `upcoming` yields the dataset rows of the same batches, in the same
        order, without loading them through the DataLoader: a source that fetches (a remote teacher)
        asks for later batches while the loop trains on the current one, and may hand a batch over
        rebuilt (a remote teacher in generate mode: prompt + the teacher's answer). None in place of
        a batch's rows: its soft targets are not wanted (an on-policy batch: the student writes its
        own rows, which `score` then serves)."""
        return iter(batches)

    def after_epoch(self, runner: SplitRunner) -> str | None:
        """Called by every process at the end of each training epoch; returns a line for the user, if any."""
        return None

    def precompute(self, runner: SplitRunner) -> str:
        """--precompute-teacher: compute and store every soft target, then say what was done."""
        raise KDError("--precompute-teacher: this run has no teacher cache (distillation.teacher_cache)")

    def close(self) -> None:
        """Release what the source holds open (connections, threads)."""

    def report_to(self, warn: Callable[[str, str], None]) -> None:
        """Where warnings that cannot wait for the next step line go, as (code, message): a server
        that retries or is down while the loop waits on it. The loop passes one that writes a
        telemetry `warning` event and prints it; sources that never wait ignore it."""

    def stats(self) -> dict[str, Any] | None:
        """Counts since the last call (None: nothing to report)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source}

    @property
    def needs_teacher_inputs(self) -> bool:
        """Whether the batch must carry the teacher's processed inputs (features on the device)."""
        return self.teacher is not None
