"""Optimizer and learning-rate schedule, each built from its own config section."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainguard.config.schema import OptimConfig, ScheduleConfig


def build_optimizer(model: nn.Module | list, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over a model's (or a list of) parameters; weight decay only on tensors with
    2+ dims (not biases or norms); fused per ``optim.fused``."""
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = can_fuse(params) if cfg.fused == "auto" else cfg.fused
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused optimizer kernel for these parameters: one device of a kind it
    supports, real floating-point dtypes."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without it: its default implementation
        return False
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in _get_fused_kernels_supported_devices()
            and all(p.is_floating_point() for p in params))


def lr_factor(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int):
    """A LambdaLR stepping once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, max_steps))


def materialize_state(opt: torch.optim.Optimizer) -> bool:
    """Allocate the optimizer's state now, as its first step would, changing nothing else.

    The first ``step()`` allocates AdamW's moments (2x the parameters) or SGD's momentum. Done at
    start, an out-of-memory there is a clear setup error instead of a failure halfway through an
    update; the memory search then measures the real optimizer phase. Runs one step at lr 0 and
    weight decay 0 on zero gradients (a bitwise no-op on the parameters), then zeroes the state
    so it equals a fresh one. Returns False when there was state already (a resumed run).
    """
    if opt.state:
        return False
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        with torch.no_grad():
            opt.step()
    finally:
        for g, (lr, wd) in zip(opt.param_groups, saved):
            g["lr"], g["weight_decay"] = lr, wd
        for p, g in zip(params, grads):
            p.grad = g
    reset_state(opt)
    return True


def reset_state(opt: torch.optim.Optimizer) -> None:
    """Zero every state tensor and step count: the state of an optimizer that has taken no step."""
    with torch.no_grad():
        for state in opt.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    v.zero_()
                elif k == "step":
                    state[k] = 0
