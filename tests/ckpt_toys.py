"""Toys for tests/test_checkpoint_faults.py: a pickle that must never run, and a hook that fills the disk."""

from __future__ import annotations

import os
from pathlib import Path

from trainguard import Hook


def plant(marker: str) -> str:
    """What unpickling an :class:`Evil` would call: it leaves ``marker`` behind as proof that it ran."""
    Path(marker).write_text("the pickle ran")
    return marker


class Evil:
    """An object whose unpickling runs code (``plant``): torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (plant, (self.marker,))


class Balloon(Hook):
    """At the end of step ``at``, fills the disk that holds ``path`` until ``leave`` bytes are free
    (once: ``done`` marks it, so the same command re-run after the test frees the space goes on)."""

    def __init__(self, path: str, at: int, leave: int, done: str):
        self.path, self.at, self.leave, self.done = Path(path), at, leave, Path(done)

    def on_step_end(self, trainer) -> None:
        if trainer.state.step != self.at or self.done.exists():
            return
        st = os.statvfs(self.path.parent)
        size = st.f_bavail * st.f_frsize - self.leave
        with self.path.open("wb") as f:
            f.write(b"\0" * max(size, 0))
        self.done.write_text(str(size))
