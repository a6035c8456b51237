"""One process: the step as written, nothing to agree on. The Guard's verdict may be deferred
(engine/defer.py): read one step later, so a healthy step makes no host read."""

from __future__ import annotations

from trainguard.engine.strategy.base import Strategy, micro_batches


class SingleProcess(Strategy):
    name = "single"
    defers = True

    def accumulate(self, trainer, batch):
        return micro_batches(trainer, batch)
