"""The one place where guard decisions become host values.

Every guard decision passes through :func:`agree`: one device-to-host copy, and in a process
group first one ``all_reduce(SUM)``, so that every rank skips, rolls back or stops together (a
rank that skipped alone would desynchronise the gradients).
"""

from __future__ import annotations

import math

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


def step_signals(loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, float]:
    """The fused finite check of a step: ``(bad, loss)`` from one device-to-host copy. ``bad`` if
    any rank's loss or gradient norm is not finite; ``loss`` is the mean over ranks."""
    loss_v, norm_v = agree(torch.stack([loss.float(), grad_norm.float()]))
    return not (math.isfinite(loss_v) and math.isfinite(norm_v)), loss_v / distributed.size()
