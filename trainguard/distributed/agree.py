"""The step's agreement across ranks: every rank's flags and counts in one small ``all_reduce(SUM)``,
so that every rank skips, splits, rolls back or stops together (a rank that decided alone would
desynchronise the gradients, or leave the others waiting in a collective it never enters).

* One process: :func:`step_signals` (the fused finite check of loss and gradient norm) is the
  step's one host sync.
* Several: :func:`exchange` runs after every rank's local forward/backward and before any
  gradient is reduced (a strategy calls it: :meth:`trainguard.engine.strategy.base.InGroup.agree`).
  It carries the loss, the local gradient norm, the samples present and failed to load, the
  signals received, each rank's out-of-memory flag and which parameters have gradients. The
  guards then read :class:`Agreed`, with no further collective (:mod:`trainguard.guards.consensus`).
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass

import torch

from trainguard import distributed


def agree(values: torch.Tensor) -> list[float]:
    """Sum per-rank signals (a small 1-D tensor) over ranks and bring them to the host.

    A sum carries a NaN or inf from any rank to every rank, so all ranks see the same verdict.
    One host sync per call. Single process: the values as they are.
    """
    if distributed.size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values.tolist()


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


def exchange(loss: torch.Tensor | None, norm: torch.Tensor | None, samples: int, failed_to_load: int,
             oom: bool, received: int | None, present: list[bool], *, device: torch.device | None = None,
             by_loss_only: bool = False) -> Agreed:
    """The step's one ``all_reduce``: every rank's flags and counts, summed (see the module doc).

    ``norm``: this rank's gradient norm (None when it has none to give: out of memory, no samples);
    ``present``: per parameter, whether this rank's backward reached it; ``by_loss_only``: a rank is bad
    by its loss alone (FSDP2: the gradients were reduced in the backward, so one rank's NaN is in every
    rank's shards by now)."""
    world, rank = distributed.size(), distributed.rank()
    if device is None:
        device = next((t.device for t in (loss, norm) if t is not None), torch.device("cpu"))
    if oom or samples == 0 or loss is None or norm is None:
        loss_w, norm = torch.zeros((), device=device), torch.zeros((), device=device)
    else:
        loss_w, norm = loss.detach().float() * samples, norm.float().to(device)
    head = torch.stack([loss_w, norm]).to(device)
    bad_here = torch.zeros(world, device=device)
    bad_here[rank] = (~torch.isfinite(head[:1] if by_loss_only else head)).any().float()  # on the device: no host sync
    counts = [samples, failed_to_load, received == signal.SIGINT, received == signal.SIGTERM]
    flags = torch.tensor(counts + [oom and r == rank for r in range(world)] + list(present),
                         dtype=torch.float32).to(device, non_blocking=True)
    values = agree(torch.cat([head, bad_here, flags]))
    loss_sum, norm_sum = values[:2]
    bad_ranks = [r for r in range(world) if values[2 + r]]
    n, failed, sigint, sigterm = values[2 + world:6 + world]
    oom_flags, present_sum = values[6 + world:6 + 2 * world], values[6 + 2 * world:]
    return Agreed(loss=loss_sum / n if n else float("nan"),
                  bad=bool(bad_ranks) or not (math.isfinite(loss_sum) and math.isfinite(norm_sum)),
                  samples=int(n), failed_to_load=int(failed),
                  signal=signal.SIGINT if sigint else (signal.SIGTERM if sigterm else None),
                  oom_ranks=[r for r, f in enumerate(oom_flags) if f], bad_ranks=bad_ranks,
                  present=[p > 0 for p in present_sum], local_samples=samples)
