"""The mutable state of one run: counters, the data position, and the flags hooks may set."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class OutOfMemory:
    """A forward/backward that ran out of device memory (the exception itself is not kept: its
    traceback would hold the activations)."""

    step: int                          # the step being computed (1-based)
    micro_batch_size: int
    message: str                       # the exception's first line
    in_use: int | None = None          # bytes the device had in use after the failed attempt was undone
    limit: int | None = None           # the device's (or the budget's) size in bytes
    ranks: list[int] = field(default_factory=list)  # in a process group: the ranks that ran out

    def describe(self) -> str:
        on = f" on rank {', '.join(map(str, self.ranks))}" if self.ranks else ""
        return f"out of device memory{on} at step {self.step} with micro-batch {self.micro_batch_size}: {self.message}"


@dataclass
class Verdict:
    """A deferred step's verdict, read on the host one step later (VERDICT fires for a healthy one)."""

    step: int
    loss: float
    grad_norm: float


@dataclass
class RunState:
    """Everything that changes while training; the counters go into every checkpoint."""

    step: int = 0                      # optimizer steps taken (skipped steps count too)
    samples: int = 0                   # samples consumed
    epoch: int = 0                     # data epoch
    position: int = 0                  # batches (map-style) or items (iterable) consumed in this epoch
    skipped_steps: int = 0
    skipped_samples: int = 0
    # per-step scratch, set by the loop
    batch_ids: list[int] = field(default_factory=list)
    loss: Any = None                   # this step's loss (a 0-dim tensor on the device; no host sync)
    loss_value: float | None = None    # the same on the host, where a guard read it at once (None: not read)
    grad_norm: Any = None
    lr: float = 0.0
    input_wait_s: float = 0.0          # seconds fit() has waited for batches from the loader (this process)
    agreed: Any = None                 # in a process group: this step's distributed.agree.Agreed (its strategy's exchange)
    received_signal: int | None = None  # SIGINT/SIGTERM received by this process (SignalHandler)
    verdict: Verdict | None = None     # the last deferred step whose verdict the host read (engine/defer.py)
    # flags hooks set to change the run
    skip_step: bool = False            # skip this step's optimizer update
    found_inf: Any = None              # a device flag: set, the update is skipped on the device (deferred verdict)
    stop: bool = False                 # stop after this step
    oom: OutOfMemory | None = None     # set when this step's forward/backward ran out of memory
    status: str = "running"            # running | completed | failed | interrupted
    error: str | None = None
    hint: str | None = None            # what the user can do about `error`
    exit_code: int = 0
    # results
    eval_metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: str | None = None
    final_loss: float | None = None
    report: dict[str, Any] = field(default_factory=dict)   # sections hooks add to summary.json

    def request_stop(self, status: str, error: str | None = None, exit_code: int = 1, hint: str | None = None) -> None:
        """Ask the loop to stop at the next step boundary."""
        self.stop, self.status, self.error, self.exit_code, self.hint = True, status, error, exit_code, hint

    def counters(self) -> dict[str, int]:
        """The counters that a checkpoint stores."""
        return {k: getattr(self, k) for k in ("step", "samples", "epoch", "position", "skipped_steps", "skipped_samples")}


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """A forward that leaves no trace: the RNG streams and the model's buffers (BatchNorm statistics)
    are as they were afterwards (diagnostics, and FSDP's stand-in micro-batches)."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
