"""One interface over a run's device memory: the cap, the peak, what is in use.

* CUDA: the caching allocator's statistics (``max_memory_allocated``); ``--memory-budget`` is
  enforced by ``torch.cuda.set_per_process_memory_fraction``, so the allocator raises
  ``torch.OutOfMemoryError`` past it.
* Anything else with a budget: :class:`~trainguard.memory.tracker.TensorMemory` simulates a
  device of that size.
* Plain CPU (or MPS) without a budget: nothing to measure against; :func:`open_memory` returns None.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from trainguard.memory.tracker import TensorMemory


def prefer_expandable_segments() -> None:
    """Ask CUDA's allocator for expandable segments (less fragmentation, so fewer OOMs at the same
    peak), unless the user configured the allocator or the platform lacks them. Call before CUDA
    allocates anything."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    if sys.platform == "linux" and getattr(torch.version, "hip", None) is None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


class DeviceMemory:
    """Base: ``limit`` is what the run may use (the budget, else the device's size), in bytes."""

    kind = "none"

    def __init__(self, limit: int | None, budget: int | None):
        self.limit, self.budget = limit, budget
        self.run_peak = 0

    def start(self) -> "DeviceMemory":
        return self

    def stop(self) -> None:
        pass

    def in_use(self) -> int:
        raise NotImplementedError

    def peak(self) -> int:
        """The peak since the last :meth:`reset_peak`."""
        raise NotImplementedError

    def reset_peak(self) -> None:
        raise NotImplementedError

    def take_peak(self) -> int:
        """The peak since the last call (and the run's peak so far is kept in ``run_peak``)."""
        p = self.peak()
        self.run_peak = max(self.run_peak, p)
        self.reset_peak()
        return p

    def release(self) -> tuple[int, int | None]:
        """After an out-of-memory: give cached blocks back; returns (bytes in use, limit)."""
        return self.in_use(), self.limit

    def paused(self):
        """A context in which host-side work is not counted (simulated devices only)."""
        return contextlib.nullcontext()


class CudaMemory(DeviceMemory):
    kind = "cuda"

    def __init__(self, device: torch.device, budget: int | None):
        self.device = device
        self.total = torch.cuda.get_device_properties(device).total_memory
        super().__init__(min(budget, self.total) if budget else self.total, budget)
        self._capped = False

    def start(self) -> "CudaMemory":
        if self.budget and self.budget < self.total:
            torch.cuda.set_per_process_memory_fraction(self.budget / self.total, self.device)
            self._capped = True
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def stop(self) -> None:
        if self._capped:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            self._capped = False

    def in_use(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def release(self) -> tuple[int, int | None]:
        torch.cuda.empty_cache()
        return self.in_use(), self.limit


class SimulatedMemory(DeviceMemory):
    kind = "simulated"

    def __init__(self, budget: int, name: str = "memory budget"):
        super().__init__(budget, budget)
        self.tracker = TensorMemory(budget, name=name)
        self._active = False
        self.suspended = False

    def start(self) -> "SimulatedMemory":
        if not self._active:
            self.tracker.__enter__()
            self._active = True
        return self

    def stop(self) -> None:
        if self._active and not self.suspended:
            self.tracker.__exit__(None, None, None)
        self._active = self.suspended = False

    def can_suspend(self) -> bool:
        """Whether the tracker is the innermost dispatch mode (it can leave the stack and come back)."""
        return self._active and not self.suspended and self.tracker.innermost()

    def suspend(self) -> None:
        """Stop counting operators (a step whose peak is known: :mod:`trainguard.memory.sampled`)."""
        if self.can_suspend():
            self.tracker.__exit__(None, None, None)
            self.suspended = True

    def resume(self) -> None:
        if self.suspended:
            self.suspended = False
            self.tracker.__enter__()

    def in_use(self) -> int:
        return self.tracker.live

    def peak(self) -> int:
        return self.tracker.peak

    def reset_peak(self) -> None:
        self.tracker.reset_peak()

    @contextlib.contextmanager
    def paused(self):
        was, self.tracker.paused = self.tracker.paused, True
        try:
            yield
        finally:
            self.tracker.paused = was


def open_memory(device: torch.device, budget: int | None) -> DeviceMemory | None:
    """The memory interface for ``device`` under ``budget`` bytes (None: the whole device)."""
    if device.type == "cuda":
        return CudaMemory(device, budget)
    if budget:
        return SimulatedMemory(budget)
    return None


def host_side(memory: DeviceMemory | None):
    """Work on the host (building a dataset, loading items): not counted on a simulated device."""
    return memory.paused() if memory is not None else contextlib.nullcontext()
