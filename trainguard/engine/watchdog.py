"""Progress marks, for the stall watchdog (:mod:`trainguard.guards.stall`), and the fetch alarm.

:data:`PROGRESS` says where this process is: the loop, the data fetcher and the checkpointer
store a few of its attributes at phase changes (no lock, no syscall beyond ``time.monotonic()``);
the watchdog's thread only reads them, about once a second. Phases of the main thread:

``setup`` -> ``preflight`` (watched from just before it) -> per step: ``data`` (drawing its batch; ``item`` is the sample being
fetched in this process, with 0 loader workers) -> ``step`` (forward, backward, update, the
STEP_END hooks) with ``eval`` and ``checkpoint`` inside it -> ``end``.

The fetch alarm abandons one sample's fetch that hangs (:class:`Stalled`): a thread of each
process that fetches (the main one with 0 loader workers, each worker with N) looks at ``item``
about 8 times per allowance; when the SAME item has been in progress for the allowance, it sends
SIGALRM to the main thread (``signal.pthread_kill``), whose handler raises in the fetch, and that
one item becomes a bad sample. Nothing per batch or per item but a store; no timer is set (a
user's or pytest-timeout's ``ITIMER_REAL`` is left alone; their SIGALRMs go to their handler).
It interrupts Python-level blocking (``time.sleep``, ``Event.wait``, socket and file reads: PEP
475 runs the handler); a fetch blocked in C is not interrupted (the watchdog stops the run then).
The same handler raises :class:`StallStop` in the main thread when the watchdog asks it to
(:func:`interrupt`). Only in a process's main thread: ``trainguard.train()`` called from another
thread fetches without the alarm.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from trainguard.errors import RunFailed


class Stalled(BaseException):
    """Raised inside a sample's fetch that made no progress for the timeout (a BaseException, so
    that a dataset's own ``except Exception`` does not swallow it)."""

    def __init__(self, reason: str, item: int | None = None):
        super().__init__(reason)
        self.reason, self.item = reason, item


class StallStop(RunFailed):
    """The watchdog stops the run: raised in the main thread, reported as any failure is."""


class Progress:
    """Where this process is (see the module docstring). Written by the engine, read by the watchdog."""

    __slots__ = ("phase", "step", "since", "item", "fetches", "started", "slowest", "steps")

    def __init__(self) -> None:
        self.phase = "setup"       # setup | preflight | data | step | eval | checkpoint | end
        self.step = 0              # the step being computed (1-based)
        self.since = time.monotonic()  # when the phase began or last progressed
        self.item: int | None = None   # the sample being fetched in this process's main thread (-1: a batch call)
        self.fetches = 0           # batch fetches begun in this process (with the item: which fetch is in progress)
        self.started = self.since  # when the current step began (its batch drawn)
        self.slowest = 0.0         # the slowest whole step so far, this process's first one left out
        self.steps = 0             # steps begun in this process


PROGRESS = Progress()


def step_begins(step: int) -> None:
    """The loop, before it draws the batch of ``step`` (a few stores and one ``monotonic()``)."""
    p, now = PROGRESS, time.monotonic()
    if p.steps >= 2 and now - p.started > p.slowest:  # the step that just ended was not this process's first
        p.slowest = now - p.started
    p.steps += 1
    p.step, p.phase, p.started, p.since = step, "data", now, now


def begin(phase: str) -> str:
    """A phase begins (``preflight``, ``step``, ``eval``, ``checkpoint``, ``end``); returns the one it replaces."""
    p = PROGRESS
    before, p.phase, p.since = p.phase, phase, time.monotonic()
    return before


def touch() -> None:
    """Progress within a phase (an evaluation batch)."""
    PROGRESS.since = time.monotonic()


# ---- the fetch alarm (SIGALRM, sent to the main thread) ------------------------------------


class _Alarm:
    __slots__ = ("timeout", "request", "old", "installed", "main", "poker")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.timeout = 0.0                  # a fetch's allowance in this process (0: not watched)
        self.request: BaseException | None = None  # what the handler raises: Stalled or StallStop
        self.old = None                     # the SIGALRM handler ours replaced (called for any other SIGALRM)
        self.installed = False
        self.main = threading.main_thread().ident
        self.poker: threading.Thread | None = None


ALARM = _Alarm()
if hasattr(os, "register_at_fork"):  # a forked loader worker starts without its parent's alarm or thread
    os.register_at_fork(after_in_child=ALARM.reset)


def _on_alarm(signum, frame) -> None:
    a = ALARM
    req, a.request = a.request, None
    if req is None:  # not ours (a timer of the user's, pytest-timeout's): theirs to handle
        if callable(a.old):
            a.old(signum, frame)
        return
    if isinstance(req, Stalled) and PROGRESS.item != req.item:
        return  # that fetch returned meanwhile
    raise req


def install_alarm() -> bool:
    """Put the alarm's SIGALRM handler in place (once per process; from its main thread only).
    Returns whether it is in place."""
    a = ALARM
    if a.installed:
        return True
    if not hasattr(signal, "pthread_kill") or threading.get_ident() != a.main:
        return False
    before = signal.signal(signal.SIGALRM, _on_alarm)
    a.old = None if before is _on_alarm else before  # a forked worker inherits ours: not to be called from itself
    a.installed = True
    return True


def release_alarm() -> None:
    """Put back the SIGALRM handler that was there before (main thread, at the run's end)."""
    a = ALARM
    if a.installed and threading.get_ident() == a.main:
        a.installed, a.request, a.timeout = False, None, 0.0
        signal.signal(signal.SIGALRM, a.old if a.old is not None else signal.SIG_DFL)


def interrupt(exc: BaseException) -> bool:
    """Raise ``exc`` in this process's main thread at its next Python instruction (from another
    thread); False if the alarm's handler is not in place (the main thread is then left alone)."""
    a = ALARM
    if not a.installed or signal.getsignal(signal.SIGALRM) is not _on_alarm:
        return False
    a.request = exc
    signal.pthread_kill(a.main, signal.SIGALRM)
    return True


def arm(timeout: float) -> bool:
    """Watch this process's fetches: one that stays on the same item for ``timeout`` seconds is
    abandoned (:class:`Stalled` raised in it). A few stores; the first call starts the thread that
    watches (one per process). False where it cannot work (not this process's main thread)."""
    a = ALARM
    if threading.get_ident() != a.main or not (a.installed or install_alarm()):
        return False
    a.timeout = timeout
    if a.poker is None:
        a.poker = threading.Thread(target=_poke, daemon=True, name="trainguard-fetch-watch")
        a.poker.start()
    return True


def _poke() -> None:
    """The fetch watcher: about 8 looks per allowance; a fetch that stayed on the same item (and
    the same batch call) for the allowance is interrupted, raising Stalled in it."""
    a, p = ALARM, PROGRESS
    seen, seen_at = None, 0.0
    while True:
        time.sleep(min(1.0, max(0.05, (a.timeout or 8.0) / 8)))
        key, now = (p.item, p.fetches), time.monotonic()
        if p.item is None or key != seen:
            seen, seen_at = key, now
        elif a.timeout and now - seen_at >= a.timeout and a.request is None:
            interrupt(Stalled(f"fetch stalled for more than {a.timeout:g} s", p.item))
            seen = None
