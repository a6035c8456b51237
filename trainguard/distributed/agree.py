"""The step's agreement across ranks: every rank's flags and counts in one small ``all_reduce(SUM)``,
so that every rank skips, splits, rolls back or stops together (a rank that decided alone would
desynchronise the gradients, or leave the others waiting in a collective it never enters).

* One process: :func:`step_signals` (the fused finite check of loss and gradient norm) is the
  step's one host sync.
* Several: :func:`exchange` runs after every rank's local forward/backward and before any
  gradient is reduced (a strategy calls it: :meth:`trainguard.engine.strategy.base.InGroup.agree`).
  What the host decides by (the samples present and failed to load, the signals received, each
  rank's out-of-memory flag, which parameters have gradients) is summed on the host, where the host
  knows it anyway; the loss and the local gradient norm are summed on the device and read only when
  a verdict is: at once (one host read), or one step later where the verdict is deferred
  (engine/defer.py; every rank reads the same sums at the same point, so every rank redoes a bad step
  together). The guards then read :class:`Agreed`, with no further collective
  (:mod:`trainguard.guards.consensus`).
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


@dataclass(eq=False)
class Agreed:
    """What every rank knows about the step after :func:`exchange` (the same on all ranks).

    The counts and flags the host decides by (samples, signals, out-of-memory, gradients present) were
    summed on the host. The loss and the gradient norms stay on the device (``sums``, all-reduced there):
    ``loss``, ``bad`` and ``bad_ranks`` read them on first use (one host read, the step's undeferred
    verdict); a deferred verdict reads nothing here (the guard flags the step from :attr:`mean_loss`
    and :attr:`norms`, and the host learns them one step later: engine/defer.py)."""

    sums: torch.Tensor          # on the device: [sum of sample-weighted losses, sum of local gradient norms, bad per rank]
    samples: int                # samples present (loaded) over all ranks
    failed_to_load: int         # samples that failed to load, over all ranks
    signal: int | None          # SIGINT or SIGTERM if some rank received one (SIGINT first)
    oom_ranks: list[int]        # ranks whose forward/backward ran out of memory
    present: list[bool]         # per parameter: some rank has a gradient
    local_samples: int          # samples present on this rank
    _read: tuple | None = None  # (loss, loss sum, norm sum, bad ranks) once read

    @property
    def mean_loss(self) -> torch.Tensor:
        """The mean over every present sample of every rank, a device scalar (NaN without samples)."""
        return self.sums[0] / self.samples if self.samples else torch.full_like(self.sums[0], float("nan"))

    @property
    def norms(self) -> torch.Tensor:
        """The sum of the ranks' local gradient norms, a device scalar: not finite when some rank's is not."""
        return self.sums[1]

    def _values(self) -> tuple:
        if self._read is None:
            loss, loss_sum, norm_sum, *bad = torch.cat([self.mean_loss.view(1), self.sums]).tolist()  # one read
            self._read = (loss, loss_sum, norm_sum, [r for r, b in enumerate(bad) if b])
        return self._read

    @property
    def loss(self) -> float:
        """:attr:`mean_loss` on the host (the division done on the device, as a deferred verdict's)."""
        return self._values()[0]

    @property
    def bad_ranks(self) -> list[int]:
        """Ranks whose own loss or gradient norm is not finite (sharded: loss)."""
        return self._values()[3]

    @property
    def bad(self) -> bool:
        """Some rank's loss or local gradient norm is not finite."""
        _, loss_sum, norm_sum, bad_ranks = self._values()
        return bool(bad_ranks) or not (math.isfinite(loss_sum) and math.isfinite(norm_sum))

    @property
    def local_bad(self) -> bool:
        return distributed.rank() in self.bad_ranks


def exchange(loss: torch.Tensor | None, norm: torch.Tensor | None, samples: int, failed_to_load: int,
             oom: bool, received: int | None, present: list[bool], *, device: torch.device | None = None,
             by_loss_only: bool = False) -> Agreed:
    """The step's exchange: every rank's flags and counts summed on the host (the process group's
    host side: :func:`trainguard.distributed.host_group`), and its loss and gradient norm summed on
    the device, where nothing waits for them (see the module doc and :class:`Agreed`).

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
    sums = torch.cat([head, bad_here])
    counts = [samples, failed_to_load, received == signal.SIGINT, received == signal.SIGTERM]
    flags = torch.tensor(counts + [oom and r == rank for r in range(world)] + list(present), dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(sums)  # queued on the device (NCCL), read only when a verdict is
        torch.distributed.all_reduce(flags, group=distributed.host_group())  # host memory: no device sync
    n, failed, sigint, sigterm, *rest = flags.numpy().tolist()
    oom_flags, present_sum = rest[:world], rest[world:]
    return Agreed(sums=sums, samples=int(n), failed_to_load=int(failed),
                  signal=signal.SIGINT if sigint else (signal.SIGTERM if sigterm else None),
                  oom_ranks=[r for r, f in enumerate(oom_flags) if f],
                  present=[p > 0 for p in present_sum], local_samples=samples)
