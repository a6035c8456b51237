"""The guards' view of a step's verdict: the same on every rank.

The agreement itself is the distributed layer's (:mod:`trainguard.distributed.agree`): under several
processes the step's strategy runs the exchange and leaves its result in ``state.agreed``; in one
process the verdict is the fused finite check of loss and gradient norm, one host read.
"""

from __future__ import annotations

from trainguard import distributed
from trainguard.distributed.agree import Agreed, agree, step_signals  # noqa: F401 - what guards read

__all__ = ["Agreed", "agree", "from_rank0", "step_signals", "verdict"]


def from_rank0(decision):
    """A decision rank 0 read from the run directory (a record left by a rank that left the job),
    the same on every rank. Single process: as it is."""
    return distributed.broadcast_object(decision)


def verdict(trainer) -> tuple[bool, float]:
    """``(bad, loss)`` of the step just computed, the same on every rank (the loss also in
    ``state.loss_value``, for the logger)."""
    agreed = trainer.state.agreed
    bad, loss = (agreed.bad, agreed.loss) if agreed is not None else step_signals(trainer.state.loss, trainer.state.grad_norm)
    trainer.state.loss_value = loss
    return bad, loss
