"""Mixed precision through ``torch.amp``: resolving ``precision: auto`` and the GradScaler."""

from __future__ import annotations

import contextlib

import torch

from trainguard.errors import ConfigError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_precision(requested: str, info, profile) -> tuple[str, str | None]:
    """The precision to use on the probed device, and a note if it differs from the request.

    A profile's default precision applies only to the device type it describes: running a
    GTX 1650 config on a CPU falls back to what the CPU does well, with a note.
    """
    device_default = {"cuda": "bf16" if info.bf16 else "fp16", "mps": "fp32", "cpu": "fp32"}[info.type]
    if requested == "auto":
        return (profile.precision if profile.device == info.type else device_default), None
    if profile.device != info.type and requested == profile.precision and requested != device_default:
        return device_default, (f"profile {profile.name} is for {profile.device} but this run is on {info.type}: "
                                f"precision {requested} -> {device_default}")
    if requested == "bf16" and info.type == "cuda" and not info.bf16:
        raise ConfigError(f"precision bf16 is not supported on {info.name}",
                          "use --set train.precision=fp16 (with loss scaling) or fp32")
    if requested == "fp16" and info.type == "cpu":
        return requested, "fp16 autocast on CPU is slow; fp32 or bf16 is usually better there"
    return requested, None


def autocast(device_type: str, precision: str):
    """An autocast context for the precision (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=DTYPES[precision])


def grad_scaler(device_type: str, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")
