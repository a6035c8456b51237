"""Hooks for tests/test_records.py: signals that arrive after a run has ended."""

from __future__ import annotations

import os
import signal
import threading

from trainguard.engine.events import Hook


class SignalAfterEnd(Hook):
    """At FIT_END, sends this process ``signal`` after ``delay`` seconds from a (non-daemon) timer
    thread: the process waits for it at exit, so it arrives while the process tears down, after the
    last checkpoint and summary.json, as a job scheduler's SIGTERM or a late Ctrl-C would."""

    def __init__(self, name: str = "SIGTERM", delay: float = 0.5):
        self.signum, self.delay = int(signal.Signals[name]), delay

    def on_fit_end(self, trainer) -> None:
        threading.Timer(self.delay, os.kill, (os.getpid(), self.signum)).start()
