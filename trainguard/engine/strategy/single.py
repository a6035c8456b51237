"""One process: the step as written, nothing to agree on (the Guard's finite check is the step's one host read)."""

from __future__ import annotations

from trainguard.engine.strategy.base import Strategy, micro_batches


class SingleProcess(Strategy):
    name = "single"

    def accumulate(self, trainer, batch):
        return micro_batches(trainer, batch)
