"""Trial steps: a real forward, backward and optimizer step at a given micro-batch, measured.

Used by the micro-batch search (``trainguard autoconfig``, ``micro_batch_size: auto``) and to say
how much one sample needs when even that does not fit. The batch is the worst case: the largest
sample of a cheap scan, repeated. Afterwards the model, the optimizer, the gradients and the RNG
streams are as they were (see :func:`preserved`); the data stream is never touched.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch

from trainguard.engine.batch import slice_batch, to_device
from trainguard.engine.collate import collate_copies
from trainguard.engine.optim import reset_state
from trainguard.engine.precision import autocast

PHASES = ("forward", "backward", "optimizer")


@dataclass
class Trial:
    """One measured step at micro-batch ``m``: the peak of each phase (bytes), or an OOM."""

    m: int
    oom: bool
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int | None:
        return max(self.phases.values()) if self.phases and not self.oom else None

    def fits(self, usable: int) -> bool:
        return not self.oom and self.peak is not None and self.peak <= usable


@contextlib.contextmanager
def preserved(trainer):
    """Run trial steps, then put back weights, buffers, optimizer state (fresh) and RNG streams.

    Must run before the first training step: the optimizer state is reset to that of an
    optimizer which has taken no step (as :func:`~trainguard.engine.optim.materialize_state` left it).
    """
    mem = trainer.memory
    pause = mem.paused if mem is not None else contextlib.nullcontext
    with pause():  # host copies: not device memory
        saved = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    cuda = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
            for g, values in zip(trainer.optimizer.param_groups, groups):  # step counts some keep there (schedule-free)
                g.update(values)
            with pause(), torch.no_grad():
                for k, v in trainer.model.state_dict().items():
                    v.copy_(saved[k])
                reset_state(trainer.optimizer)
            del saved


def worst_case_batch(item, m: int):
    """``m`` copies of one sample, collated as its stream collates them (a scan's ``worst_item``
    carries the user's ``data.collate_fn``): the worst case when ``item`` is the largest sample."""
    return collate_copies(item, m)


def measure(trainer, item, m: int, *, optimizer_step: bool = True, enforce: bool = True,
            accumulate: bool = True, batch_size: int | None = None) -> Trial:
    """One step at micro-batch ``m`` on copies of ``item``, under ``trainer.memory``.

    ``accumulate``: gradients exist before the backward, as for every micro-batch after the first
    (the backward then holds a new gradient beside the old one before adding them up).
    ``batch_size``: the whole batch is collated on the host and micro-batch ``m`` moved to the
    device, as the loop does (on a simulated device the host batch counts too, as it does there).
    ``enforce=False`` (simulated devices) measures past the limit instead of raising.
    Call inside :func:`preserved`.
    """
    mem = trainer.memory
    tracker = getattr(mem, "tracker", None)
    if tracker is not None:
        tracker.enforce = enforce
    phases: dict[str, int] = {}
    oom = False
    model = trainer.model
    was_training = model.training
    model.train()
    try:
        if accumulate:
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        mem.release()
        mem.reset_peak()
        host = worst_case_batch(item, max(m, batch_size or m))
        micro = to_device(slice_batch(host, 0, m), trainer.device)
        with autocast(trainer.device.type, trainer.precision):
            _, loss, _ = trainer.adapter(micro)
        phases["forward"] = mem.peak()
        mem.reset_peak()
        loss.backward()
        del loss, micro, host
        phases["backward"] = mem.peak()
        if optimizer_step:
            mem.reset_peak()
            trainer.optimizer.step()
            phases["optimizer"] = mem.peak()
    except torch.OutOfMemoryError:
        oom = True
    finally:
        if tracker is not None:
            tracker.enforce = True
        model.train(was_training)
    trainer.optimizer.zero_grad(set_to_none=True)  # outside the except: the activations are free now
    mem.release()
    return Trial(m, oom, phases)
