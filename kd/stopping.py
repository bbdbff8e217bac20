"""Ending a run cleanly: stopping between steps on Ctrl-C or the SIGTERM that schedulers send before
they kill a job, and leaving a multi-process run without hanging in its teardown.

SLURM, Kubernetes and most schedulers send SIGTERM and then, after a grace period (often 30-120 s),
SIGKILL. Either signal asks the loop to stop at the end of the current step: it writes a checkpoint
and `run_end` (status `interrupted`) and the process exits non-zero; `--resume` continues exactly.
Stopping between steps rather than wherever an exception happens to land (inside a library's
cleanup, a prefetch thread's join, a half-written gradient) is what makes that exact.

- SIGTERM, on every process: with several processes the ranks agree, every few steps, whether any
  of them was asked to stop (one all-reduce of a flag), so all stop after the same step and save
  one checkpoint together.
- SIGINT (Ctrl-C) in a one-process run; a second Ctrl-C stops at once. Under a multi-process launch
  a terminal's Ctrl-C reaches every rank at a different point of its step, so they keep Python's
  default and stop at once.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading
import time
from typing import Any, Callable

import torch

AGREE_EVERY = 10  # steps between the ranks' checks of the stop flag (a host sync each time)


class Stopped(KeyboardInterrupt):
    """The loop stopped after a step because a signal asked it to; the state is checkpointed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopAfterStep:
    def __init__(self) -> None:
        self.signum: int | None = None  # the signal that asked to stop, once one did

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self, one_process: bool) -> Callable[[], None]:
        """Handle SIGTERM (and, in a one-process run, SIGINT) as above; returns the function that
        puts the previous handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # signal handlers can only be set from the main thread

        def on_signal(signum, frame):
            if self.signum == signal.SIGINT and signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: at once
            first = self.signum is None
            self.signum = signum if first or signum == signal.SIGTERM else self.signum
            if first:
                how = "Ctrl-C again to stop now" if signum == signal.SIGINT else "then exiting"
                print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint ({how})",
                      file=sys.stderr, flush=True)

        signals = [signal.SIGTERM] + ([signal.SIGINT] if one_process else [])
        previous = {s: signal.signal(s, on_signal) for s in signals}

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, handler)

        return restore

    def agreed(self, accelerator: Any, step: int) -> int | None:
        """After optimizer step `step`: the signal that asks every process to stop now, or None. With
        several processes they agree every AGREE_EVERY steps (one all-reduce), so all stop after the
        same step and save one checkpoint together."""
        if accelerator.num_processes == 1:
            return self.signum
        if step % AGREE_EVERY:
            return None
        asked = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        if float(accelerator.reduce(asked, reduction="sum").item()) == 0:
            return None
        return self.signum or signal.SIGTERM  # another process was asked


def release_collectives(pause_s: float = 0.5) -> None:
    """Let the process group's worker threads finish with the last collectives before it is torn down.

    A gloo worker thread drops a finished collective's tensors after the caller has seen it complete,
    and dropping them takes the GIL. The group itself is torn down when the prepared model is freed,
    and that joins its worker threads while holding the GIL: one still waiting for it hangs the
    process after everything is saved (both stacks seen in a hung two-process CPU run). Sleeping,
    which releases the GIL, lets them finish first."""
    gc.collect()
    time.sleep(pause_s)
