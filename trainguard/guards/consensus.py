"""The one place where guard decisions become host values.

Every guard decision passes through :func:`agree`: today it is a single device-to-host copy;
under DDP it becomes one ``all_reduce(MAX)`` so that every rank skips, rolls back or stops
together (a rank that skipped alone would desynchronise the gradients).
"""

from __future__ import annotations

import torch


def agree(flags: torch.Tensor) -> list[float]:
    """Reduce per-rank guard signals (a small 1-D tensor; larger = worse) and bring them to the host.

    One host sync per call. Single process: the values as they are.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flags = flags.clone()
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags.tolist()
