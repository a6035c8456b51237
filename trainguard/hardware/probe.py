"""Probe the device at hand into one :class:`DeviceInfo` (torch.cuda, MPS, psutil)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DeviceInfo:
    """What the training device is and what it can do."""

    type: str                      # "cuda" | "mps" | "cpu"
    name: str
    memory_gb: float               # device memory (total); for cpu, total RAM
    free_memory_gb: float          # free device memory now (cuda: mem_get_info), for cpu available RAM
    compute_capability: tuple[int, int] | None
    bf16: bool
    fp16: bool
    cpu_count: int
    ram_gb: float
    torch_version: str

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_count() -> int:
    """CPU cores this process may use (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def probe(device_type: str = "auto") -> DeviceInfo:
    """Probe the device: CUDA first, then MPS, then CPU (or the type asked for)."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    cpus = cpu_count()
    common = dict(cpu_count=cpus, ram_gb=vm.total / 2**30, torch_version=torch.__version__)
    want_cuda = device_type in ("auto", "cuda")
    if want_cuda and torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        free, total = torch.cuda.mem_get_info(idx)
        return DeviceInfo(type="cuda", name=props.name, memory_gb=total / 2**30, free_memory_gb=free / 2**30,
                          compute_capability=(props.major, props.minor),
                          bf16=torch.cuda.is_bf16_supported(), fp16=props.major >= 6, **common)
    mps = getattr(torch.backends, "mps", None)
    if device_type in ("auto", "mps") and mps is not None and mps.is_available():
        return DeviceInfo(type="mps", name="Apple MPS", memory_gb=vm.total / 2**30,
                          free_memory_gb=vm.available / 2**30, compute_capability=None,
                          bf16=False, fp16=True, **common)
    return DeviceInfo(type="cpu", name=f"CPU ({cpus} cores)", memory_gb=vm.total / 2**30,
                      free_memory_gb=vm.available / 2**30, compute_capability=None,
                      bf16=True, fp16=False, **common)
