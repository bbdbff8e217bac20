"""Ctrl-C in a one-process run: the first stops training at the end of the current step, with a
checkpoint; a second stops at once.

Stopping between steps rather than wherever KeyboardInterrupt happens to land (inside a library's
cleanup, a prefetch thread's join, a half-written gradient) leaves a state that --resume continues
exactly. One process only: under a multi-process launch every rank gets the signal at a different
point of its step, so they keep Python's default and stop at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable


class StopAfterStep:
    def __init__(self) -> None:
        self.requested = False  # set by the first Ctrl-C; the loop checks it after each step

    def install(self, one_process: bool) -> Callable[[], None]:
        """Handle SIGINT as above; returns the function that puts the previous handler back."""
        if not one_process or threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_sigint(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop now)", file=sys.stderr)

        previous = signal.signal(signal.SIGINT, on_sigint)
        return lambda: signal.signal(signal.SIGINT, previous)
