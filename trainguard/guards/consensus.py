"""The one place where guard decisions become host values.

Every guard decision passes through here: one device-to-host copy per optimizer step, and in a
process group first one small ``all_reduce(SUM)``, so that every rank skips, splits, rolls back
or stops together (a rank that decided alone would desynchronise the gradients, or leave the
others waiting in a collective it never enters).

* One process: :func:`step_signals` (the fused finite check of loss and gradient norm) is the
  step's one host sync.
* Several: :func:`exchange` runs after every rank's local forward/backward and before any
  gradient is reduced. It carries the loss, the local gradient norm, the samples present and
  failed to load, the signals received, each rank's out-of-memory flag and which parameters
  have gradients. :func:`verdict` then reads the agreed values, with no further collective.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass

import torch

from trainguard import distributed


def agree(values: torch.Tensor) -> list[float]:
    """Sum per-rank guard signals (a small 1-D tensor) over ranks and bring them to the host.

    A sum carries a NaN or inf from any rank to every rank, so all ranks see the same verdict.
    One host sync per call. Single process: the values as they are.
    """
    if distributed.size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values.tolist()


def from_rank0(decision):
    """A decision rank 0 read from the run directory (a record left by a rank that left the job),
    the same on every rank. Single process: as it is."""
    return distributed.broadcast_object(decision)


def step_signals(loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, float]:
    """The fused finite check of a step: ``(bad, loss)`` from one device-to-host copy. ``bad`` if
    any rank's loss or gradient norm is not finite; ``loss`` is the mean over ranks."""
    loss_v, norm_v = agree(torch.stack([loss.float(), grad_norm.float()]))
    return not (math.isfinite(loss_v) and math.isfinite(norm_v)), loss_v / distributed.size()


@dataclass
class Agreed:
    """What every rank knows about the step after :func:`exchange` (the same on all ranks)."""

    loss: float                 # mean over every present sample of every rank
    bad: bool                   # some rank's loss or local gradient norm is not finite
    samples: int                # samples present (loaded) over all ranks
    failed_to_load: int         # samples that failed to load, over all ranks
    signal: int | None          # SIGINT or SIGTERM if some rank received one (SIGINT first)
    oom_ranks: list[int]        # ranks whose forward/backward ran out of memory
    bad_ranks: list[int]        # ranks whose own loss or gradient norm is not finite (sharded: loss)
    present: list[bool]         # per parameter: some rank has a gradient
    local_samples: int          # samples present on this rank

    @property
    def local_bad(self) -> bool:
        return distributed.rank() in self.bad_ranks


def total_norm_local(params: list[torch.Tensor]) -> torch.Tensor:
    """The norm of this rank's shards of the (DTensor) gradients."""
    grads = [p.grad.to_local() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float() if grads else torch.zeros(())


def exchange(loss: torch.Tensor | None, params: list[torch.Tensor], samples: int, failed_to_load: int,
             oom: bool, received: int | None, present: list[bool] | None = None) -> Agreed:
    """The step's one ``all_reduce``: every rank's flags and counts, summed (see the module doc)."""
    from trainguard.engine.loop import total_norm

    world, rank = distributed.size(), distributed.rank()
    device = params[0].device if params else torch.device("cpu")
    sharded = bool(params) and hasattr(params[0], "to_local")  # FSDP2: this rank's gradient shards
    if oom or samples == 0 or loss is None:
        loss_w, norm = torch.zeros((), device=device), torch.zeros((), device=device)
    else:
        loss_w, norm = loss.detach().float() * samples, (total_norm_local if sharded else total_norm)(params).float().to(device)
    head = torch.stack([loss_w, norm]).to(device)
    bad_here = torch.zeros(world, device=device)
    # on the device: no host sync. Sharded, the gradients were reduced in the backward (one rank's NaN
    # is in every rank's shards by now), so a rank is bad by its own loss only
    bad_here[rank] = (~torch.isfinite(head[:1] if sharded else head)).any().float()
    counts = [samples, failed_to_load, received == signal.SIGINT, received == signal.SIGTERM]
    flags = torch.tensor(counts + [oom and r == rank for r in range(world)]
                         + (present if present is not None else [p.grad is not None for p in params]),
                         dtype=torch.float32).to(device, non_blocking=True)
    values = agree(torch.cat([head, bad_here, flags]))
    loss_sum, norm_sum = values[:2]
    bad_ranks = [r for r in range(world) if values[2 + r]]
    n, failed, sigint, sigterm = values[2 + world:6 + world]
    oom_flags, present = values[6 + world:6 + 2 * world], values[6 + 2 * world:]
    return Agreed(loss=loss_sum / n if n else float("nan"),
                  bad=bool(bad_ranks) or not (math.isfinite(loss_sum) and math.isfinite(norm_sum)),
                  samples=int(n), failed_to_load=int(failed),
                  signal=signal.SIGINT if sigint else (signal.SIGTERM if sigterm else None),
                  oom_ranks=[r for r, f in enumerate(oom_flags) if f], bad_ranks=bad_ranks,
                  present=[p > 0 for p in present], local_samples=samples)


def verdict(trainer) -> tuple[bool, float]:
    """``(bad, loss)`` of the step just computed, the same on every rank."""
    agreed = trainer.state.agreed
    if agreed is not None:
        return agreed.bad, agreed.loss
    return step_signals(trainer.state.loss, trainer.state.grad_norm)
