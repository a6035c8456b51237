"""Toys for the loss-spike tests (tests/test_spike.py), importable as `_target_: tests.spike_toys:...`."""

from __future__ import annotations

import torch

from tests.toys import Blobs
from trainguard.engine.events import Hook


class SpikyAt(Blobs):
    """Blobs whose samples at `ids` have their inputs scaled by `scale` (and mirrored): finite, and
    so confidently wrong that a step holding one has a loss far above the median."""

    def __init__(self, ids: tuple = (100,), scale: float = -1000.0, **kw):
        super().__init__(**kw)
        self.ids = set(ids)
        self.scale = scale

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i in self.ids:
            item["x"] = [v * self.scale for v in item["x"]]
        return item


class DamageAt(Hook):
    """At the end of step `at` (once per process), the model's last layer is negated and scaled:
    every sample's loss is then far above the median until the weights are learned back or
    rolled back (what a bad update does to a real run)."""

    def __init__(self, at: int = 35, factor: float = -20.0):
        self.at, self.factor, self.done = at, factor, False

    def on_step_end(self, trainer) -> None:
        if trainer.state.step == self.at and not self.done:
            self.done = True
            last = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear)][-1]
            with torch.no_grad():
                last.weight.mul_(self.factor)
