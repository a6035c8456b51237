"""Gradient norms, as device tensors (no host sync)."""

from __future__ import annotations

import torch


def total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, as a device tensor (what ``clip_grad_norm_`` returns)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if len({(g.device, g.dtype) for g in grads}) > 1:
        return torch.nn.utils.clip_grad_norm_(params, float("inf"))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def local_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The norm of this rank's shards of (DTensor, FSDP2) gradients: no collective."""
    grads = [p.grad.to_local() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float() if grads else torch.zeros(())
