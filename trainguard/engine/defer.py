"""A step whose verdict the host reads one step later: no host sync on a healthy step.

A guard that judges a step (finite loss and gradient norm, no loss spike) needs two numbers from the
device. Read at once, the host waits for the step to finish before it can queue the next: the device
idles while the host fetches and launches. Deferred, the guard gives the step a device flag instead
(``state.found_inf``, at BEFORE_OPTIMIZER_STEP); the fused optimizer skips its update on the device
when the flag is set (torch's ``found_inf``, as GradScaler uses it), and the host reads the flag, the
loss and the norm from a pinned copy in the next step, once that step's forward and backward are
queued (:meth:`trainguard.engine.loop.Trainer.settle`), or at once where a hook reads the step's
values at its STEP_END (a log line, a checkpoint, an evaluation, a stop).

A healthy verdict then fires VERDICT (the guard adds the loss to its spike window). A bad one is
done again at once, undeferred, from where it started: :class:`Pending` holds what the step changed
that its masked update did not undo (the RNG streams, the BatchNorm statistics, the scheduler and the
optimizer's hyperparameters, the counters and the batch), so the redone step computes the same gradients and the
guard decides on it as if it had never been deferred. Under several processes (``ddp``) the step's
exchange sums the ranks' losses and norms on the device (:mod:`trainguard.distributed.agree`), so every
rank computes the same flag, reads the same sums at the same point of the next step, and redoes a
bad step with the others. Deferral needs one process or ``ddp`` (not ``fsdp``), an optimizer
that takes ``found_inf`` (:func:`takes_found_inf`) and no fp16 GradScaler; ``TRAINGUARD_VERDICT=sync``
turns it off (every verdict read at once, as before 2026-12). Not under a simulated memory budget
(``--memory-budget`` on a CPU): the deferred step keeps its batch until its verdict is read, host
memory on a card, which the simulation would count as the device's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEFER = os.environ.get("TRAINGUARD_VERDICT", "").strip().lower() != "sync"


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` skips its update on the device for a set ``found_inf`` (torch's
    fused Adam, AdamW, SGD, Adagrad: the ``_step_supports_amp_scaling`` contract GradScaler relies on)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def norm_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics of every BatchNorm that keeps them (mean, var, batches seen): what a
    training forward changes besides the RNG streams."""
    return [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]


class KeptBuffers:
    """Copies of the buffers a forward changes (:func:`norm_statistics`), taken at each step's start
    into one of two sets in turn, so a deferred step's copy outlives the next step's. They are device
    memory the whole run: the memory forecast counts them (:func:`trainguard.memory.predict.fake_step`)."""

    COPIES = 2

    def __init__(self, model: nn.Module):
        self.live = norm_statistics(model)
        self.sets = [[t.clone() for t in self.live] for _ in range(self.COPIES)] if self.live else []
        self.turn = 0
        self.before: list[torch.Tensor] = self.sets[0] if self.sets else []

    def capture(self) -> list[torch.Tensor]:
        """This step's copy (a few KB, one multi-tensor copy); empty without BatchNorm."""
        if self.live:
            self.turn ^= 1
            self.before = self.sets[self.turn]
            torch._foreach_copy_(self.before, self.live)
        return self.before

    def put_back(self, copy: list[torch.Tensor]) -> None:
        if copy:
            torch._foreach_copy_(self.live, copy)


def _rng(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class StepStart:
    """What a step changes that a masked update does not undo, as it was when the step began."""

    rng: tuple
    buffers: list[torch.Tensor]
    scheduler: dict
    groups: list[dict]  # the optimizer's hyperparameters per group (lr; momentum or betas under OneCycleLR)
    step: int
    samples: int
    epoch: int
    position: int
    batch: Any
    batch_ids: list[int]

    @classmethod
    def take(cls, trainer, buffers: list[torch.Tensor]) -> "StepStart":
        st = trainer.state
        return cls(_rng(trainer.device), buffers, trainer.scheduler.state_dict(),
                   [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups],
                   st.step, st.samples, st.epoch, st.position, trainer.batch, st.batch_ids)


class Pending:
    """A deferred step: its start, and its loss, gradient norm and flag on their way to the host."""

    def __init__(self, start: StepStart, loss: torch.Tensor, grad_norm: torch.Tensor, flag: torch.Tensor):
        self.start, self.step = start, start.step + 1
        values = torch.stack([loss.detach().float(), grad_norm.detach().float(), flag.float()])
        if values.device.type == "cuda":  # a copy queued behind the step: reading it later waits for nothing else
            self.values = torch.empty(3, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.values, self.ready = values.cpu(), None

    def read(self) -> tuple[float, float, bool]:
        """``(loss, grad norm, bad)``: from the host copy (no ``.item()``), once the step is done."""
        if self.ready is not None:
            self.ready.synchronize()
        loss, norm, flag = self.values.numpy().tolist()
        return loss, norm, flag != 0.0

    def restore(self, trainer) -> None:
        """The trainer as at the step's start (its masked update changed no weights nor optimizer state)."""
        s, st = self.start, trainer.state
        _set_rng(s.rng, trainer.device)
        trainer.kept.put_back(s.buffers)
        trainer.scheduler.load_state_dict(s.scheduler)
        for g, kept in zip(trainer.optimizer.param_groups, s.groups):
            g.update(kept)
        st.step, st.samples, st.epoch, st.position, st.batch_ids = s.step, s.samples, s.epoch, s.position, s.batch_ids
        trainer.batch = s.batch
