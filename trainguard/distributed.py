"""The process group a run belongs to: one process, or one rank of a torchrun job.

torchrun (``python -m torch.distributed.run``) sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
for each process it starts; :func:`current` reads them and :func:`init` joins the group
(NCCL on CUDA, gloo on CPU). Everything else asks :func:`current` rather than reading the
environment, so one process is simply a world of size 1, and every helper here is a no-op in it.

Data parallelism is done here rather than by wrapping the model in ``DistributedDataParallel``:
DDP reduces gradients from inside the backward, so a rank that runs out of memory mid-step
leaves the others waiting in its reducer (the deadlock Composer needed three rounds of fixes
for). Here every rank computes its gradients locally, the ranks agree on the step's flags
(:func:`trainguard.guards.consensus.exchange`, one small ``all_reduce``), and only then are the
gradients averaged, in place in their flat buckets (:class:`GradViews`). See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch

TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("TRAINGUARD_DIST_TIMEOUT", "600")))  # the store's; and the group's when set
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


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
    return w


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
    global _FAKE_GROUP
    _FAKE_GROUP = None  # destroyed with the job's


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


class GradViews:
    """Gradients as views into flat buckets, so averaging them over ranks copies nothing (DDP's
    ``gradient_as_bucket_view``). :meth:`prepare` gives every parameter a zeroed view as its
    gradient before a step's first backward, which accumulates into it in place; :meth:`reduce`
    scales and all-reduces each bucket as it is. Which parameters the backward reached is recorded
    by a hook (every gradient exists as a view, so ``grad is None`` no longer tells), and a
    parameter no rank reached gets its gradient back to ``None``, as in one process."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = [p for p in params if p.requires_grad]
        self.touched = [False] * len(self.params)
        self.index = index = {id(p): i for i, p in enumerate(self.params)}
        self.buckets: list[tuple[torch.Tensor, list[int], list[torch.Tensor]]] = []
        for bucket in _buckets(self.params):
            flat = torch.zeros(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
            views, offset = [], 0
            for p in bucket:
                views.append(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            self.buckets.append((flat, [index[id(p)] for p in bucket], views))
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self._touch(i))

    def _touch(self, i: int) -> None:
        self.touched[i] = True

    def prepare(self) -> None:
        """Zeroed views as the gradients, before a step's (or a retry's) first backward."""
        self.touched = [False] * len(self.params)
        for flat, members, views in self.buckets:
            flat.zero_()
            for i, v in zip(members, views):
                self.params[i].grad = v

    def present(self, params: list[torch.Tensor]) -> list[bool]:
        """Per parameter of ``params``: did this rank's backward reach it?"""
        return [id(p) in self.index and self.touched[self.index[id(p)]] for p in params]

    def reduce(self, weight: float, present: list[bool], params: list[torch.Tensor]) -> None:
        """Every gradient := the sum over ranks of ``weight`` x its local value. ``weight`` is this
        rank's share of the step's samples, so the result is the mean over all the samples of all
        ranks (ranks may hold fewer samples when some failed to load). ``present[i]``: some rank's
        backward reached ``params[i]`` (agreed beforehand); one that none reached keeps no gradient,
        so the optimizer leaves it alone, as in one process."""
        for flat, members, views in self.buckets:
            for i, v in zip(members, views):
                g = self.params[i].grad
                if g is None:  # e.g. dropped by a user hook: a zero share
                    v.zero_()
                elif g.data_ptr() != v.data_ptr():  # the backward replaced the view (someone held a reference)
                    v.copy_(g)
                self.params[i].grad = v
            flat.mul_(weight)
            torch.distributed.all_reduce(flat)
        for p, some in zip(params, present):
            if not some:
                p.grad = None


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` in groups of one device and dtype, each about ``BUCKET_BYTES`` at most."""
    groups: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, int] = {}
    for t in tensors:
        key, nbytes = (t.device, t.dtype), t.numel() * t.element_size()
        runs = groups.setdefault(key, [[]])
        if runs[-1] and filled[key] + nbytes > BUCKET_BYTES:
            runs.append([])
            filled[key] = 0
        runs[-1].append(t)
        filled[key] = filled.get(key, 0) + nbytes
    return [b for runs in groups.values() for b in runs if b]


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP2 shards (and gathers) one at a time: the children of every ``nn.ModuleList``."""
    return [block for module in model.modules() if isinstance(module, torch.nn.ModuleList) for block in module]


def shard(model: torch.nn.Module, device: torch.device, mesh=None) -> None:
    """FSDP2: each block (:func:`blocks`), then the root, sharded over the ranks (or over ``mesh``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trainguard.errors import RunFailed, first_line

    mesh = mesh if mesh is not None else init_device_mesh(device.type, (size(),))
    try:
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    except (ValueError, RuntimeError, TypeError) as e:
        raise RunFailed(f"train.strategy: fsdp cannot shard {type(model).__name__}: {first_line(e, 200)}",
                        "use train.strategy: ddp for this model, or change what FSDP2 refuses") from e


class _BlockForward:
    """A block's forward, compiled while its :class:`CompiledBlocks` runs, else eager. A call whose
    compiling fails runs eagerly instead, then and after: FSDP's collectives are in the block's hooks,
    outside this forward, so a rank that falls back still enters every collective with the others."""

    def __init__(self, eager, switch: dict):
        self.eager, self.compiled, self.switch = eager, torch.compile(eager), switch

    def __call__(self, *args, **kwargs):
        if self.switch["on"] and self.switch["failed"] is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the compiler's failure: this call, and later ones, run eagerly
                self.switch["failed"] = e
        return self.eager(*args, **kwargs)


class CompiledBlocks(torch.nn.Module):
    """``train.compile`` sharded (FSDP2): each block's forward compiled (:func:`blocks`), the model and
    its parameter names unchanged (torchtitan compiles per block too). Calling this runs the model
    with the compiled forwards; calling the model runs it eagerly (the preflight checks both).
    ``failed``: the exception of the first compile that failed on this rank (then it runs eagerly);
    the preflight has the ranks agree on it. A block's forward run again in the backward (activation
    checkpointing) runs eagerly."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self._orig_mod = model  # as torch.compile's wrapper names it: the field filter reads its forward
        self.switch = {"on": False, "failed": None}
        for block in blocks(model):
            block.forward = _BlockForward(block.forward, self.switch)

    @property
    def failed(self) -> Exception | None:
        return self.switch["failed"]

    def forward(self, *args, **kwargs):
        self.switch["on"] = True
        try:
            return self._orig_mod(*args, **kwargs)
        finally:
            self.switch["on"] = False


_FAKE_GROUP = None  # inside a job: the fake group beside the job's, made once (every rank makes it)


def fake_group():
    """Inside a job: the fake process group beside the job's (see :func:`fake_mesh`), made on the
    first call, which every rank must make at the same point (``new_group`` is collective)."""
    global _FAKE_GROUP
    if _FAKE_GROUP is None:
        _register_fake_backend()
        _FAKE_GROUP = torch.distributed.new_group(backend="fake")
    return _FAKE_GROUP


def _register_fake_backend() -> None:
    """torch names the "fake" backend but registers its constructor only in this module (torch's
    own tests and torchtitan's memory estimator import it the same way)."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401


@contextlib.contextmanager
def fake_mesh(world: int):
    """A device mesh of ``world`` ranks over torch's fake process group, whose collectives move no
    data: FSDP2 then shards, gathers and frees as it would on ``world`` ranks, in one process. For
    the memory forecast of a sharded step on fake tensors (:mod:`trainguard.memory.predict`);
    torchtitan's memory estimator does the same. Alone, the fake group is the default group while
    the context lasts; inside a job (``world`` must be its size) it is a group beside the job's,
    made on first use by ``new_group``, which every rank must call at the same point."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    dist = torch.distributed
    if dist.is_initialized():
        if world != size():
            raise ValueError(f"a fake mesh of {world} ranks inside a job of {size()}")
        yield DeviceMesh.from_group(fake_group(), "cpu")
        return
    _register_fake_backend()
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def reshard(model: torch.nn.Module) -> None:
    """After forwards without a backward (no_grad: evaluation, localization): FSDP2 leaves the root
    module's parameters gathered whole, expecting a backward, so ``model.parameters()`` would no
    longer be the sharded ones the optimizer holds (a checkpoint then fails, and the memory is
    held). Registers the shards again, on every FSDP module; no collective."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), else the tensor itself: checking it needs no collective."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _full():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: torch.nn.Module) -> dict:
    """The model's state_dict; sharded, gathered whole (a collective: every rank calls it, rank 0 gets it)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full())


def load_model_state(model: torch.nn.Module, state: dict, from_rank0: bool = False) -> None:
    """A whole state dict into ``model``; sharded, scattered into its shards. ``from_rank0``: only
    rank 0 passes the state (the others ``{}``); it is broadcast as it is loaded."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A whole optimizer state into ``optimizer``; sharded, scattered into its shards (checkpoints of
    fsdp runs before their optimizer was saved as shards, checkpoint/sharded.py)."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    set_sharded_optimizer_state(model, optimizer, state, full=True)


def set_sharded_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                                full: bool) -> None:
    """``set_optimizer_state_dict`` of a state keyed by parameter name (``full``: whole tensors, else
    this rank's shards). An optimizer without per-parameter state (SGD without momentum), which
    torch 2.13's loader cannot take, gets only its hyperparameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not state.get("state"):
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=full))
