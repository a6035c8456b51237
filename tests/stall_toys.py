"""Hangs for the stall watchdog's tests (tests/test_stall.py), injected for real."""

from __future__ import annotations

import os
import signal
import threading

from tests.toys import MLP, Blobs


class HangsOn(Blobs):
    """Blobs whose ``__getitem__`` blocks forever on sample ``index`` (a stuck network filesystem).
    Every fetch of that sample is appended to the file ``record``, from whichever process does it.
    ``in_c``: as if blocked in C, where no Python signal handler runs (SIGALRM blocked first)."""

    def __init__(self, index: int = 5, record: str = "", in_c: bool = False, **kw):
        super().__init__(**kw)
        self.index, self.record, self.in_c = index, record, in_c

    def __getitem__(self, i: int) -> dict:
        if i == self.index:
            if self.record:
                with open(self.record, "a") as f:
                    f.write(f"{os.getpid()}\n")
            if self.in_c:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            threading.Event().wait()  # forever
        return super().__getitem__(i)


class HangsAtCall(MLP):
    """An MLP whose forward blocks forever on its ``at``-th call (the preflight is call 1), on rank
    ``rank`` only (any rank: -1), unless the environment has STALL_TOY_OFF (the hang is gone when
    the run is resumed). ``in_c``: as if blocked in C, where no Python signal handler runs (SIGALRM
    is blocked in the training thread first)."""

    def __init__(self, at: int = 6, rank: int = -1, in_c: bool = False, **kw):
        super().__init__(**kw)
        self.at, self.rank, self.in_c, self.calls = at, rank, in_c, 0

    def forward(self, x, label=None):
        self.calls += 1
        here = self.rank < 0 or int(os.environ.get("RANK", "0")) == self.rank
        if self.calls == self.at and here and not os.environ.get("STALL_TOY_OFF"):
            if self.in_c:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            threading.Event().wait()  # forever
        return super().forward(x, label)
