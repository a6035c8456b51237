"""FSDP2 (``fully_shard``): sharding a model block by block, compiling it block by block, the fake
process group of the memory forecast, and whole state dicts of a sharded model. Used by the fsdp
strategy (:mod:`trainguard.engine.strategy.fsdp`) and the forecast (:mod:`trainguard.memory.predict`)."""

from __future__ import annotations

import contextlib

import torch


def _size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP2 shards (and gathers) one at a time: the children of every ``nn.ModuleList``."""
    return [block for module in model.modules() if isinstance(module, torch.nn.ModuleList) for block in module]


def shard(model: torch.nn.Module, device: torch.device, mesh=None) -> None:
    """FSDP2: each block (:func:`blocks`), then the root, sharded over the ranks (or over ``mesh``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trainguard.errors import RunFailed, first_line

    mesh = mesh if mesh is not None else init_device_mesh(device.type, (_size(),))
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
        if world != _size():
            raise ValueError(f"a fake mesh of {world} ranks inside a job of {_size()}")
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



def forget_fake_group() -> None:
    """The fake group is destroyed with the job's (:func:`trainguard.distributed.shutdown`)."""
    global _FAKE_GROUP
    _FAKE_GROUP = None
