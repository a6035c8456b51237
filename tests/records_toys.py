"""Hooks for tests/test_records.py: signals that arrive after a run has ended."""

from __future__ import annotations

import os
import signal
import threading

from trainguard.engine.events import Hook


class SignalAfterEnd(Hook):
    """At FIT_END, sends this process ``signal`` after ``delay`` seconds from a (non-daemon) timer
    thread: the process waits for it at exit, so it arrives while the process tears down, after the
    last checkpoint and summary.json, as a job scheduler's SIGTERM or a late Ctrl-C would.
    ``to: launcher``: rank 0 sends it to its parent, the ``--nproc-per-node`` launcher, instead."""

    def __init__(self, name: str = "SIGTERM", delay: float = 0.5, to: str = "self"):
        self.signum, self.delay, self.to = int(signal.Signals[name]), delay, to

    def on_fit_end(self, trainer) -> None:
        if self.to == "launcher":
            if trainer.world.rank == 0:
                threading.Timer(self.delay, os.kill, (os.getppid(), self.signum)).start()
            return
        threading.Timer(self.delay, os.kill, (os.getpid(), self.signum)).start()
