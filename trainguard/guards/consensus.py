"""The one place where guard decisions become host values.

Every guard decision passes through :func:`agree`: today it is a single device-to-host copy;
under DDP it becomes one ``all_reduce(MAX)`` so that every rank skips, rolls back or stops
together (a rank that skipped alone would desynchronise the gradients).
"""

from __future__ import annotations

import math

import torch


def agree(values: torch.Tensor) -> list[float]:
    """Sum per-rank guard signals (a small 1-D tensor) over ranks and bring them to the host.

    A sum carries a NaN or inf from any rank to every rank, so all ranks see the same verdict.
    One host sync per call. Single process: the values as they are.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values.tolist()


def step_signals(loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, float]:
    """The fused finite check of a step: ``(bad, loss)`` from one device-to-host copy."""
    loss_v, norm_v = agree(torch.stack([loss.float(), grad_norm.float()]))
    return not (math.isfinite(loss_v) and math.isfinite(norm_v)), loss_v
