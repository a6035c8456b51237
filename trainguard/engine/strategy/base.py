"""How a step runs over the job's processes: the interface the loop calls.

:class:`trainguard.engine.loop.Trainer` knows a strategy only through these methods, called at fixed
points of a step (engine/events.py shows where). One is chosen once, at build time, from
``train.strategy`` and the world size (:func:`trainguard.engine.strategy.select`):

* :class:`~trainguard.engine.strategy.single.SingleProcess`: one process; the step as written;
* :class:`~trainguard.engine.strategy.ddp.Replicated`: ``ddp``, a replica per rank, gradients averaged
  in flat buckets after the step's one exchange;
* :class:`~trainguard.engine.strategy.fsdp.Sharded`: ``fsdp``, FSDP2's shards, gradients reduced in the
  backward, stand-in micro-batches so every rank runs as many forwards.

A strategy owns what differs between them: preparing the model, accumulating a batch's micro-batches,
agreeing on the step across ranks, reducing gradients, reducing evaluation sums, and gathering and
scattering the model's and the optimizer's state for checkpoints. Everything else (guards, checkpoints,
logs) is a hook, and reads the strategy's result (``state.agreed``) or its two flags (``sharded``, ``spare``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from trainguard import distributed
from trainguard.distributed.agree import exchange
from trainguard.engine.batch import split_batch, to_device
from trainguard.engine.precision import autocast
from trainguard.engine.state import OutOfMemory


class Strategy:
    """One way of running a step. Defaults are those of one process; see the module doc."""

    name = "single"
    sharded = False  # every forward is a collective over the ranks (FSDP2): no rank may run one alone
    spare: Any = None  # sharded: one sample of this rank's latest batch, for stand-in forwards
    defers = False  # a step's verdict may be read one step later (engine/defer.py)

    def __init__(self, world: distributed.World = distributed.World()):
        self.world = world

    # -- building (trainguard.build.build_core) -------------------------------------------------
    def build_device(self, device: torch.device) -> torch.device:
        """Where the model is built before :meth:`prepare` (the host, for a model FSDP2 moves to the device)."""
        return device

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """The model as this strategy trains it, before the optimizer is built (every rank: rank 0's weights)."""

    def forward_module(self, model: nn.Module, compile: bool) -> nn.Module:
        """The module the step's forwards call (``compile``: ``train.compile``, checked or dropped by the preflight)."""
        return torch.compile(model) if compile else model

    def bind(self, trainer) -> None:
        """Once the Trainer exists: what the strategy keeps of its parts (parameters, buffers)."""

    # -- the step (Trainer.train_step, Trainer.forward_backward) ---------------------------------
    def begin_step(self, trainer) -> None:
        """Before a step's gradients."""

    def accumulate(self, trainer, batch) -> torch.Tensor:
        """Forward and backward over ``batch``'s micro-batches; the sample-weighted mean loss (a device tensor)."""
        raise NotImplementedError

    def micro_context(self, trainer, last: bool):
        """Around each micro-batch's forward and backward in :func:`micro_batches` (``last``: the batch's
        final one); a wrapper that reduces in the backward would skip its reduction on all but the last."""
        return contextlib.nullcontext()

    def agree(self, trainer, batch, loss: torch.Tensor | None, oom: OutOfMemory | None):
        """After this rank's backward: the ranks agree on the step and the gradients are reduced.
        Returns ``(loss, oom)``; sets ``trainer.state.agreed`` where there is something to agree on."""
        return loss, oom

    def samples(self, batch) -> int:
        """Samples the step consumed, every rank's together (for ``state.samples``)."""
        return len(batch) + len(batch.bad)

    # -- evaluation (Trainer.evaluate) -----------------------------------------------------------
    def begin_eval(self, trainer) -> None:
        """Before an evaluation's forwards."""

    def end_forwards(self, model: nn.Module) -> None:
        """After forwards without a backward (evaluation, the guards' searches)."""

    def reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Evaluation sums over every rank's share."""
        return sums

    # -- checkpoints (trainguard.checkpoint.checkpointer) ----------------------------------------
    def model_state(self, model: nn.Module) -> dict:
        """The whole model's state dict (a collective where the model is sharded: every rank calls it)."""
        return model.state_dict()

    def load_model_state(self, model: nn.Module, state: dict) -> None:
        model.load_state_dict(state)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's whole state for ``trainer.pt``, or None where it is saved as shards (:meth:`optimizer_shards`)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def optimizer_shards(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """This rank's part of the optimizer state, for a sharded checkpoint (also the layout a load fills); None: not sharded."""
        return None

    def load_optimizer_shards(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        raise NotImplementedError(f"{self.name} saves no optimizer shards")


def micro_batches(trainer, batch) -> torch.Tensor:
    """Forward and backward over ``batch`` in micro-batches of ``trainer.micro_batch_size``.

    Each micro-batch's loss is scaled by its share of the samples present, so the summed gradient
    equals that of one big batch whatever the micro-batch size. Returns the sample-weighted mean loss."""
    n, device = len(batch), trainer.device
    if n == 0:  # every sample failed to load: nothing to learn from (the Guard records it)
        return torch.full((), float("nan"), device=device)
    strategy = trainer.strategy
    if n <= trainer.micro_batch_size:  # one micro-batch: its loss is the step's
        micro = to_device(batch.data, device, non_blocking=True)
        with strategy.micro_context(trainer, last=True):
            with autocast(device.type, trainer.precision):
                _, loss, _ = trainer.adapter(micro)
            trainer.scaler.scale(loss).backward()
        return loss.detach().float()
    total = torch.zeros((), device=device)
    parts = split_batch(batch.data, trainer.micro_batch_size)
    for i, (micro, k) in enumerate(parts):
        micro = to_device(micro, device, non_blocking=True)
        share = k / n
        with strategy.micro_context(trainer, last=i == len(parts) - 1):
            with autocast(device.type, trainer.precision):
                _, loss, _ = trainer.adapter(micro)
            trainer.scaler.scale(loss * share).backward()
        total += loss.detach().float() * share
    return total


class InGroup(Strategy):
    """What every strategy of several processes shares: rank 0's buffers everywhere before a step and an
    evaluation (as DDP does for BatchNorm's statistics), the step's one exchange
    (:func:`trainguard.distributed.agree.exchange`), evaluation sums all-reduced. Subclasses say how this
    rank's gradient norm is taken, and how gradients are reduced once the ranks agreed."""

    buffers: list[torch.Tensor] = []

    def bind(self, trainer) -> None:
        self.buffers = list(trainer.model.buffers())

    def begin_step(self, trainer) -> None:
        distributed.broadcast_tensors(self.buffers)

    begin_eval = begin_step

    def samples(self, batch) -> int:
        return (len(batch) + len(batch.bad)) * self.world.size  # every rank's share is the same size

    def reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(sums)
        return sums

    def local_norm(self, trainer) -> torch.Tensor:
        raise NotImplementedError

    def present(self, trainer) -> list[bool]:
        """Per parameter: this rank's backward gave it a gradient."""
        return [p.grad is not None for p in trainer.params]

    def reduce_gradients(self, trainer, batch, agreed) -> None:
        raise NotImplementedError

    by_loss_only = False  # a rank is bad by its loss alone (its gradients were already reduced)

    def agree(self, trainer, batch, loss, oom):
        """The step's exchange, then, unless some rank ran out of memory, the gradients reduced
        to the mean over every sample of every rank. One rank's out-of-memory is every rank's. Reads no
        device value: the loss returned is the mean over ranks as a device scalar."""
        st = trainer.state
        healthy = oom is None and loss is not None and len(batch) > 0
        st.agreed = ag = exchange(loss, self.local_norm(trainer) if healthy else None, len(batch), len(batch.bad),
                                  oom is not None, st.received_signal, self.present(trainer),
                                  device=trainer.device, by_loss_only=self.by_loss_only)
        if ag.oom_ranks:  # every rank undoes the step and splits, not only those that ran out
            if oom is None:
                oom = OutOfMemory(st.step + 1, trainer.micro_batch_size, "out of device memory on another rank")
            oom.ranks = ag.oom_ranks
            return None, oom
        self.reduce_gradients(trainer, batch, ag)
        return ag.mean_loss, None  # a device scalar: read with the verdict, not here
