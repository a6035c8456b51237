"""The process group a run belongs to: one process, or one rank of a torchrun job.

torchrun (``python -m torch.distributed.run``) sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
for each process it starts; :func:`current` reads them and :func:`init` joins the group
(NCCL on CUDA, gloo on CPU). Everything else asks :func:`current` rather than reading the
environment, so one process is simply a world of size 1, and every helper here is a no-op in it.

This package is the layer below the engine that knows collectives:

* here: the group, and small collectives (objects, tensors broadcast from rank 0);
* :mod:`.buckets`: gradients as views into flat buckets, averaged over ranks without a copy;
* :mod:`.fsdp`: FSDP2 sharding, compiling block by block, the fake group of the memory forecast, and
  whole state dicts of a sharded model;
* :mod:`.agree`: the step's exchange of flags (on the host) and losses (on the device), from which
  every rank takes the same decision.

How a step uses them is a strategy's business (:mod:`trainguard.engine.strategy`). See docs/distributed.md.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch

from trainguard.distributed import fsdp
from trainguard.distributed.buckets import GradViews, _buckets
from trainguard.distributed.fsdp import (CompiledBlocks, blocks, fake_group, fake_mesh, is_sharded, load_model_state,
                                         load_optimizer_state, model_state, reshard, set_sharded_optimizer_state, shard)

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("TRAINGUARD_DIST_TIMEOUT", "600")))  # the store's; and the group's when set


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


def init(device_type: str, timeout_s: float | None = None) -> World:
    """Join the job's process group (once; NCCL for CUDA, gloo otherwise). A world of 1 joins
    nothing, except under torchrun (``--nproc-per-node 1``), where the backend is initialised
    all the same: that is the smoke test of a launch on one GPU. ``timeout_s``: the group's own
    timeout (a collective that waits longer fails), from ``guard.stall_timeout``
    (:func:`trainguard.guards.stall.group_timeout`); ``TRAINGUARD_DIST_TIMEOUT`` overrides it."""
    w = current()
    launched = w.size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not torch.distributed.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(w.local_rank)
        kwargs: dict[str, Any] = {"device_id": torch.device("cuda", w.local_rank)} if device_type == "cuda" else {}
        store = _restart_store(w)
        if store is not None:
            kwargs.update(store=store, rank=w.rank, world_size=w.size)
        timeout = TIMEOUT if timeout_s is None or "TRAINGUARD_DIST_TIMEOUT" in os.environ else \
            datetime.timedelta(seconds=timeout_s)
        torch.distributed.init_process_group(backend=backend, timeout=timeout, **kwargs)
        host_group()  # made now, with the job's timeout, rather than in the first step
    return w


_HOST_GROUP: tuple = (None, None)  # (the job's group, a gloo group beside it)


def host_group():
    """The group for values held in host memory (the step's flags and counts: :mod:`.agree`), so that
    exchanging them waits for nothing on the device: a gloo group beside an NCCL one (made at the first
    call, which every rank makes at the same point), else the job's own (None)."""
    global _HOST_GROUP
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.group.WORLD
    if _HOST_GROUP[0] is not world:
        other = torch.distributed.get_backend() != "gloo"
        _HOST_GROUP = (world, torch.distributed.new_group(backend="gloo") if other else None)
    return _HOST_GROUP[1]


def progress_store():
    """A client of the job's c10d store (torchrun's agent's, at ``MASTER_ADDR:MASTER_PORT``), under
    a prefix of this job's own: where each rank's stall watchdog publishes its progress, from its
    own thread. None outside a process group."""
    env = os.environ
    if current().size < 2 or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    from torch.distributed import PrefixStore, TCPStore

    base = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                    timeout=datetime.timedelta(seconds=10))
    job = f"{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return PrefixStore(f"trainguard/progress/{job}", base)


def _restart_store(w: World):
    """After torchrun restarted the workers (``--max-restarts``), a store whose keys are this attempt's
    own. torchrun's workers share its agent's store and torch adds no per-attempt prefix there, so
    without one a restarted group reads the last attempt's addresses and cannot connect (pytorch
    issue 167288; seen here as gloo's "connectFullMesh failed ... Connection refused", then a hang).
    None on a first attempt, which torch sets up itself."""
    env = os.environ
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not attempt or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in env:
        return None
    from torch.distributed import PrefixStore, TCPStore

    base = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), w.size, is_master=False, timeout=TIMEOUT)
    return PrefixStore(f"trainguard/attempt_{attempt}", base)


def shutdown(together: bool = False) -> None:
    """Leave the process group (end of a run). Without it, the backend's threads can abort the
    process at exit ("terminate called without an active exception"), which fails the job.
    ``together``: every rank got here (a run that ended normally): wait for all of them first, so
    that no rank tears the group down while another still finishes its last collective."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if together:
            torch.distributed.barrier()
        # free what reference cycles still hold (a model, its device mesh, and through it the group)
        # while the interpreter is alive: freed at its exit instead, the gloo group's threads can abort
        # the process ("terminate called without an active exception"; 1 fsdp run in 5 with DCP
        # checkpoints before this, 0 in 12 after)
        gc.collect()
        torch.distributed.destroy_process_group()
    global _HOST_GROUP
    _HOST_GROUP = (None, None)  # destroyed with the job's
    fsdp.forget_fake_group()  # destroyed with the job's


def size() -> int:
    """Processes taking part in collectives now (1 outside an initialised group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    return torch.distributed.get_rank() if size() > 1 else 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a path, a decision)."""
    if size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (rare: bad steps, checkpoints)."""
    if size() == 1:
        return [obj]
    out: list[Any] = [None] * size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (parameters, buffers) on every rank with rank 0's, in place."""
    if size() == 1 or not tensors:
        return
    for bucket in _buckets(tensors):
        flat = torch._utils._flatten_dense_tensors(bucket)
        torch.distributed.broadcast(flat, src=0)
        for t, v in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            t.copy_(v)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), else the tensor itself: checking it needs no collective."""
    return t.to_local() if hasattr(t, "to_local") else t


__all__ = ["CompiledBlocks", "GradViews", "World", "blocks", "broadcast_object", "broadcast_tensors", "current", "fake_group",
           "fake_mesh", "gather_objects", "host_group", "init", "is_sharded", "load_model_state", "load_optimizer_state", "local",
           "model_state", "progress_store", "rank", "reshard", "set_sharded_optimizer_state", "shard", "shutdown", "size"]
