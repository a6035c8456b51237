"""The process group a run belongs to: one process, or one rank of a torchrun job.

torchrun (``python -m torch.distributed.run``) sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
for each process it starts; :func:`current` reads them and :func:`init` joins the group
(NCCL on CUDA, gloo on CPU). Everything else asks :func:`current` rather than reading the
environment, so one process is simply a world of size 1. See docs/distributed.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0        # this process among all of the job's
    local_rank: int = 0  # ... among this node's (its GPU index)
    size: int = 1        # processes in the job

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and the console."""
        return self.rank == 0


def current() -> World:
    """This process's place in the job, from torchrun's environment (a world of 1 without it)."""
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return World()
    return World(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", env["RANK"])), size=int(env["WORLD_SIZE"]))


def init(device_type: str) -> World:
    """Join the job's process group (once; NCCL for CUDA, gloo otherwise). A world of 1 joins nothing."""
    w = current()
    if w.size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(w.local_rank)
        torch.distributed.init_process_group(backend=backend)
    return w


def size() -> int:
    """Processes taking part in collectives now (1 outside an initialised group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
