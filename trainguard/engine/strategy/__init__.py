"""The strategies a step runs under (see :mod:`trainguard.engine.strategy.base`), and the choice of one."""

from __future__ import annotations

from trainguard import distributed
from trainguard.engine.strategy.base import Strategy
from trainguard.engine.strategy.ddp import Replicated
from trainguard.engine.strategy.fsdp import Sharded
from trainguard.engine.strategy.single import SingleProcess

STRATEGIES: dict[str, type[Strategy]] = {"ddp": Replicated, "fsdp": Sharded}  # train.strategy, with several processes


def select(name: str, world: distributed.World) -> Strategy:
    """The strategy for ``train.strategy`` (``name``) in a job of ``world``: one process is always
    :class:`SingleProcess` (``--nproc-per-node 1`` included)."""
    return SingleProcess(world) if world.size == 1 else STRATEGIES[name](world)


__all__ = ["STRATEGIES", "Replicated", "Sharded", "SingleProcess", "Strategy", "select"]
