"""Building the parts of a run from their own config sections: shared by ``trainguard train``
(:mod:`trainguard.run`), ``diagnose`` and ``autoconfig``, so that each builds what train builds.

* :func:`resolve_runtime`: every ``auto`` replaced by the value this run uses, :func:`device_of` the device;
* :func:`build_model`, :func:`build_train_data`, :func:`build_val_data`: the user's parts, checked;
* :func:`build_core`: model, data, optimizer, schedule and strategy wired into a hook-less :class:`Trainer`.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from rich.console import Console

from trainguard import distributed
from trainguard.config.instantiate import instantiate
from trainguard.config.schema import Config
from trainguard.engine.batch import ModelAdapter
from trainguard.engine.collate import build_collate
from trainguard.engine.data import DataStream
from trainguard.engine.loop import Trainer
from trainguard.engine.optim import build_optimizer, build_scheduler, materialize_state
from trainguard.engine.precision import grad_scaler, resolve_precision
from trainguard.engine.strategy import select
from trainguard.errors import ConfigError, RunFailed, first_line
from trainguard.guards.stall import allowances
from trainguard.memory.meter import host_side
from trainguard.memory.sizes import fmt_bytes

console = Console(stderr=True, highlight=False, soft_wrap=True)  # the run's (quiet on ranks other than 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_of(info) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if info.type == "cuda" else torch.device(info.type)


def check_world_batch(cfg: Config, world: int) -> None:
    """Every process takes an equal share of ``train.batch_size`` (a config error otherwise); a share
    is then split into the fewest micro-batches of at most ``train.micro_batch_size``."""
    batch = cfg.train.batch_size
    if batch % world:
        lower, upper = batch // world * world, (batch // world + 1) * world
        raise ConfigError(f"train.batch_size {batch} does not split evenly over {world} processes "
                          "(every process takes an equal share of it)",
                          f"set train.batch_size to " + (f"{lower} or {upper}" if lower else f"{upper}"))


def resolve_runtime(cfg: Config, prof, info, world: int = 1) -> tuple[Config, list[str]]:
    """Replace every `auto` with the value this run uses; returns notes to show the user."""
    notes = []
    precision, note = resolve_precision(cfg.train.precision, info, prof)
    if note:
        notes.append(note)
    if cfg.train.device in ("cuda", "mps") and info.type != cfg.train.device:
        raise ConfigError(f"train.device is {cfg.train.device} but no {cfg.train.device} device is available",
                          "set train.device: auto (or cpu)")
    mbs = cfg.train.batch_size // world if cfg.train.micro_batch_size == "auto" else cfg.train.micro_batch_size
    workers = cfg.data.num_workers
    if workers == "auto":  # the node's cores shared by its processes, one left for each main loop
        workers = max(0, min(prof.num_workers, info.cpu_count // world - 1))
    pin = (info.type == "cuda") if cfg.data.pin_memory == "auto" else (cfg.data.pin_memory and info.type == "cuda")
    compile_ = cfg.train.compile and prof.device == info.type
    if cfg.train.compile and prof.device != info.type:
        notes.append(f"train.compile is ignored: profile {prof.name} is for {prof.device}, this run is on {info.type}")
    cfg = cfg.model_copy(deep=True)
    cfg.train.compile = compile_
    cfg.train.precision, cfg.train.micro_batch_size = precision, mbs
    cfg.data.num_workers, cfg.data.pin_memory = workers, pin
    cfg.hardware = prof.name
    return cfg, notes


def build_dataset(spec: dict, where: str):
    ds = instantiate(spec, where)
    if not isinstance(ds, (torch.utils.data.Dataset, torch.utils.data.IterableDataset)) and not hasattr(ds, "__getitem__"):
        raise ConfigError(f"{where}._target_ returned {type(ds).__name__}, not a Dataset",
                          "return a torch.utils.data.Dataset (with __len__/__getitem__) or an IterableDataset")
    return ds


def build_model(cfg: Config, device: torch.device):
    """The model (seeded from ``cfg.seed``, on ``device``) and the loss function, if any."""
    seed_everything(cfg.seed)
    if cfg.model is None:
        raise ConfigError("no model: the config has no `model:` section", "add `model: {_target_: pkg.module:build_model}`")
    model = instantiate(cfg.model, "model")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model._target_ returned {type(model).__name__}, not a torch.nn.Module", "return an nn.Module instance")
    model.to(device)
    return model, (instantiate(cfg.loss, "loss") if cfg.loss else None)


def build_train_data(cfg: Config, world: distributed.World = distributed.World()) -> DataStream:
    """The training data stream in the engine-owned order (this rank's share of each batch)."""
    if cfg.data.train is None:
        raise ConfigError("no training data: the config has no `data.train`", "add `data: {train: {_target_: pkg.module:build_dataset}}`")
    train_ds = build_dataset(cfg.data.train, "data.train")
    data = DataStream(train_ds, cfg.train.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
                      num_workers=int(cfg.data.num_workers), pin_memory=bool(cfg.data.pin_memory),
                      per_item=cfg.data.item_seeding == "always", rank=world.rank, world=world.size,
                      collate_fn=build_collate(cfg.data.collate_fn, cfg.seed), stream_split=cfg.data.stream_split,
                      fetch_timeout=allowances(cfg.guard.stall_timeout)[2])
    if not data.iterable and cfg.train.batch_size > data.sampler.n:  # each rank's share is cut from one global batch
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than data.train, which has {data.sampler.n} "
                          "samples: an epoch would be shorter than one batch",
                          f"set train.batch_size to at most {data.sampler.n}, or check data.train (its path, split and filters)")
    return data


def epochs_to_steps(epochs: float, data: DataStream) -> int:
    """``train.epochs`` as optimizer steps: whole batches per epoch (the last partial one is not used)."""
    if data.iterable:
        raise ConfigError("train.epochs needs a dataset with a length; data.train is an IterableDataset",
                          "set train.max_steps instead")
    return max(1, math.ceil(epochs * len(data.sampler)))


def build_core(cfg: Config, device: torch.device, memory=None, parts: tuple | None = None,
               world: distributed.World = distributed.World()) -> Trainer:
    """Model, loss, training data, optimizer and schedule, each from its own config section, wired
    into a :class:`Trainer` without hooks (what ``trainguard autoconfig`` measures, too).
    ``cfg.train.micro_batch_size`` must be resolved (an int). ``parts``: ``(model, loss_fn, data)``
    already built by :func:`build_model` and :func:`build_train_data` (``trainguard diagnose``).
    The strategy (:func:`trainguard.engine.strategy.select`, from ``train.strategy`` and ``world``)
    prepares the model: in a process group every rank starts from rank 0's weights; sharded (fsdp),
    the model is built whole in host memory and FSDP2 moves it to the device block by block."""
    strategy = select(cfg.train.strategy, world)
    if parts is None:
        model, loss_fn = build_model(cfg, strategy.build_device(device))
        with host_side(memory):
            parts = (model, loss_fn, build_train_data(cfg, world))
    model, loss_fn, data = parts
    if cfg.train.epochs is not None:
        cfg.train.max_steps = epochs_to_steps(cfg.train.epochs, data)
    strategy.prepare(model, device)
    if world.rank:  # each rank its own dropout stream (rank 0's is that of one process)
        torch.manual_seed(cfg.seed + 7919 * world.rank)
    optimizer = build_optimizer(model, cfg.optim)
    host = lambda: host_side(memory)  # noqa: E731 - the weights' host copy (an optimizer that may move them) is not device memory
    try:
        try:
            materialize_state(optimizer, host, verify=True)  # the first step's allocation, now: an OOM here is a clear setup error
        except RuntimeError as e:
            if isinstance(e, torch.OutOfMemoryError) or cfg.optim.fused != "auto" or not optimizer.defaults.get("fused"):
                raise
            console.print(f"[yellow]note[/yellow]: the fused optimizer kernel failed here ({first_line(e, 120)}): "
                          "torch's default implementation is used")
            optimizer = build_optimizer(model, cfg.optim.model_copy(update={"fused": False}))
            materialize_state(optimizer, host, verify=True)
    except torch.OutOfMemoryError:
        raise RunFailed(f"the model and its optimizer state alone do not fit in device memory"
                        + (f" ({fmt_bytes(memory.limit)} available)" if memory is not None else ""),
                        "a smaller model, an optimizer with less state (optim.name: sgd), or more memory", check="memory.fit") from None
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.max_steps)
    adapter = ModelAdapter(strategy.forward_module(model, bool(cfg.train.compile)), loss_fn, cfg.data.fields)
    if data.collate_fn is not None and cfg.data.filter_fields:  # the collator sees only the fields the model gets
        data.collate_fn.keep = adapter.filter
    return Trainer(model=model, adapter=adapter, optimizer=optimizer,
                   scheduler=scheduler, scaler=grad_scaler(device.type, cfg.train.precision), data=data, device=device,
                   precision=cfg.train.precision, micro_batch_size=int(cfg.train.micro_batch_size), cfg=cfg.train,
                   memory=memory, strategy=strategy)



def build_val_data(cfg: Config, strategy, collate_fn) -> DataStream | None:
    """The validation stream (``data.val``), each rank's share of each batch; None without one."""
    if not cfg.data.val:
        return None
    val_ds, world = build_dataset(cfg.data.val, "data.val"), strategy.world
    if strategy.sharded and isinstance(val_ds, torch.utils.data.IterableDataset):  # every sharded forward is a collective
        raise ConfigError("data.val is a stream (an IterableDataset): under train.strategy: fsdp every rank must evaluate "
                          "the same number of batches, and the ranks' parts of a stream differ in length",
                          "give data.val as a map-style dataset (__len__ and __getitem__), or use train.strategy: ddp")
    return DataStream(val_ds, int(cfg.train.micro_batch_size) * world.size, shuffle=False, name="val", seed=cfg.seed,
                      num_workers=int(cfg.data.num_workers), pin_memory=bool(cfg.data.pin_memory),
                      per_item=cfg.data.item_seeding == "always", rank=world.rank, world=world.size,
                      collate_fn=collate_fn, stream_split=cfg.data.stream_split)
