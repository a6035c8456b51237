"""One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.lock`` while a run lives.

The kernel drops the lock when its holder exits in any way (kill -9 included), so nothing is left
stale; the file itself stays, and only says who held it last. A second command on a directory in
use is refused (exit 2) naming the process. Under torchrun, rank 0 holds it for the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from trainguard.errors import ConfigError

LOCK_NAME = ".lock"
_HELD: set[int] = set()  # lock file descriptors this process holds


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) shares the parent's lock; if it kept its copy open, a
    # kill -9 of the parent would leave the lock held until the worker noticed and exited.
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # not on Windows (no fork there)
    os.register_at_fork(after_in_child=_close_in_child)


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _in_use(run_dir: Path, holder: dict) -> ConfigError:
    pid, host = holder.get("pid", "?"), holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    since = f", since {holder['started']}" if holder.get("started") else ""
    command = f" ({holder['command']}{since})" if holder.get("command") else since
    return ConfigError(f"run directory {run_dir} is in use by process {pid}{where}{command}",
                       f"wait for it to end, stop it (kill {pid}: it checkpoints and exits), "
                       "or pass --run-dir with another directory")


def writable(run_dir: Path) -> None:
    """Create ``run_dir`` if missing and prove it takes a file (created, written, removed): a
    ConfigError (exit 2) naming the path if it is a file, or read-only, full or not permitted.
    Root ignores permission bits, so only a real write tells."""
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = "is a file" if blocker == run_dir else f"is inside {blocker}, which is a file"
        raise ConfigError(f"run directory {run_dir} {what}, not a directory (nothing was trained)",
                          "give --run-dir a directory (a new one is created), or move that file away")
    probe = run_dir / f".write_test_{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"trainguard")  # a full disk takes the name but not the bytes
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):  # on a full disk the name may have been created: leave nothing
            probe.unlink()
        why = os.strerror(e.errno).lower() if e.errno else str(e)
        raise ConfigError(f"run directory {run_dir} is not writable: {why} (nothing was trained)",
                          "give --run-dir a directory you can write to (on a disk with space; not a read-only mount), "
                          "or fix its permissions") from None


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process (created if missing); ConfigError if another holds it, or
    if it is a file or cannot be written (checked before anything is built)."""
    writable(run_dir)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # no flock on this platform (Windows): one writer is not enforced
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use(run_dir, _holder(fd)) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["trainguard", *sys.argv[1:]])[:300],
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


def holder(run_dir: Path) -> dict | None:
    """Who holds ``run_dir`` now (pid, host, command, started), or None if no process does.

    Probes with a shared, non-blocking lock released at once (a ``train`` starting at that very
    instant would be refused once; re-running it works)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        import fcntl
    except ImportError:
        return None
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd) or {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
