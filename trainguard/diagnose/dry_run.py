"""The config built exactly as ``trainguard train`` builds it, one batch through it, and the memory
forecast: the data, model and memory checks of ``trainguard diagnose`` (the memory checks
themselves in :mod:`~trainguard.diagnose.memory_fit`).

Nothing here re-implements train: the parts come from :mod:`trainguard.build` (``build_model``,
``build_train_data``, ``build_core``, ``resolve_runtime``), the first step from the shared
:func:`~trainguard.guards.preflight.preflight` (field filter, collate rules, embedding lookups,
shapes, batch coupling, compile), the worst case from ``DataStream.scan``, and the memory figures from the same
trial steps, cache and fake-tensor forecast that ``trainguard autoconfig`` uses.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainguard.diagnose.environment import cpu_check, disk_check, shm_check
from trainguard.diagnose.memory_fit import _sharded, memory_check, ram_check
from trainguard.errors import TrainguardError, first_line
from trainguard.guards.localize import _tensors as tensors_in
from trainguard.guards.preflight import Check, preflight
from trainguard.memory.autoconfig import card_here
from trainguard.memory.sizes import fmt_bytes

AWAY_SAMPLES = 2  # the dry run's micro-batch when the config's card is not this machine (2: BatchNorm needs more than 1)


def _fail(name: str, e: TrainguardError) -> Check:
    return Check(e.check or name, "fail", e.message, e.hint)


def _raised(name: str, section: str, e: Exception, what: str) -> Check:
    return Check(name, "fail", f"{section}._target_ raised {type(e).__name__}: {first_line(e)}",
                 f"check its arguments under `{section}` ({what}); run with --debug for the traceback")


def _tensor_bytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_in(x))


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def dry_run(cfg, prof, info, *, memory_budget: int | None, run_dir: Path, say: Callable[[str], None]) -> list[Check]:
    """Build the run as train does and check data, model and memory. ``cfg`` is resolved but not
    yet runtime-resolved (``auto`` values still there)."""
    from trainguard.memory.meter import host_side, open_memory, prefer_expandable_segments
    from trainguard.build import build_core, build_model, build_train_data, device_of, epochs_to_steps, resolve_runtime

    checks: list[Check] = []
    auto_micro = cfg.train.micro_batch_size == "auto"
    from trainguard import distributed

    job = distributed.current()
    world = job.size
    sharded = world > 1 and cfg.train.strategy == "fsdp" and torch.distributed.is_initialized()  # sharded and stepped as in train
    rcfg, _ = resolve_runtime(cfg, prof, info, world)  # precision errors were reported by hardware.precision
    device = device_of(info)
    workers = int(rcfg.data.num_workers)
    checks.append(cpu_check(info, workers))
    prefer_expandable_segments()
    memory = open_memory(device, memory_budget)  # as in train: a CUDA device or a budget (None: RAM, unmeasured)
    if memory is not None:
        memory.start()
    try:  # in train's order: the model (seeded), then the data, whose construction may draw from the RNGs too
        say("building the model")
        try:
            model, loss_fn = build_model(rcfg, torch.device("cpu") if sharded else device)  # fsdp: sharded onto it below
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            checks.append(Check("model.build", "pass", f"{type(model).__name__}: {_params(total)} parameters "
                                f"({_params(trainable)} trainable), {fmt_bytes(sum(_tensor_bytes(t) for t in model.state_dict().values()))}"))
        except TrainguardError as e:
            checks.append(_fail("model.build", e))
            model = None
        except Exception as e:  # noqa: BLE001
            checks.append(_raised("model.build", "model", e, "sizes, a checkpoint path"))
            model = None
        say("building the training data")
        try:
            with host_side(memory):
                data = build_train_data(rcfg)
            n = None if data.iterable else data.sampler.n
            checks.append(Check("data.build", "pass", f"{type(data.dataset).__name__}: "
                                + (f"{n:,} samples, {n // rcfg.train.batch_size:,} batches of {rcfg.train.batch_size} per epoch"
                                   if n is not None else "an iterable stream (length unknown)")
                                + (f"; train.epochs {rcfg.train.epochs:g} = {epochs_to_steps(rcfg.train.epochs, data):,} steps"
                                   if rcfg.train.epochs is not None and n is not None else "")))
        except TrainguardError as e:
            checks.append(_fail("data.build", e))
            data = None
        except Exception as e:  # noqa: BLE001 - the user's constructor: its error is the finding
            checks.append(_raised("data.build", "data.train", e, "paths, split names"))
            data = None
        if not _together(data is not None and model is not None, sharded):
            return checks
        if world > 1:  # from here on, one rank's view: each rank steps on its share of every global batch
            cfg, rcfg = cfg.model_copy(deep=True), rcfg.model_copy(deep=True)
            cfg.train.batch_size //= world
            rcfg.train.batch_size //= world
        say("scanning the data")
        try:
            with host_side(memory):
                scan = data.scan()
        except TrainguardError as e:
            checks.append(_fail("data.items", e))
            scan = None
        if not _together(scan is not None, sharded):
            return checks
        if sharded:
            distributed.fake_group()  # for the memory forecast; made here, where every rank is
        checks += scan_checks(scan, rcfg)
        if auto_micro:
            rcfg.train.micro_batch_size = rcfg.train.batch_size
        try:
            trainer = build_core(rcfg, device, memory, parts=(model, loss_fn, data),
                                 world=job if sharded else distributed.World())
        except TrainguardError as e:
            checks.append(_fail("memory.fit", e))
            return checks
        tuning = None
        if auto_micro and (memory is not None or sharded):
            from trainguard.memory.profile_forecast import predict_for_profile
            from trainguard.memory.tune import cached_tune

            say("searching the largest micro-batch that fits")
            try:
                if sharded:  # forecast, as train does under fsdp (no trial step runs out of memory mid-collective)
                    fc, why = _sharded(cfg, rcfg, prof, info, memory, memory_budget, scan.worst_item, world)
                    if fc is None:
                        raise TrainguardError(why, "set train.micro_batch_size to a number")
                    tuning = predict_for_profile(fc.cfg, prof, fc=fc, processes=world)
                else:
                    tuning, _ = cached_tune(trainer, rcfg, info.name)
                trainer.micro_batch_size = rcfg.train.micro_batch_size = tuning.micro_batch_size
            except TrainguardError as e:
                checks.append(_fail("memory.fit", e))
                return checks
        configured = trainer.micro_batch_size
        if not card_here(prof, info) and not memory_budget:
            trainer.micro_batch_size = min(configured, AWAY_SAMPLES)  # the real step is the card's; here, fields and shapes
        elif memory is None and not sharded:  # RAM is the device and nothing stops a step from taking it all: forecast first
            say("forecasting the step's RAM")
            host = ram_check(trainer, scan.worst_item, info, card_here(prof, info))
            if host is not None:
                checks.append(host)
        say("one forward and backward")
        checks += preflight(trainer)
        trainer.micro_batch_size = configured
        checks += structure_checks(model, scan)
        if not any(c.status == "fail" for c in checks if c.name.startswith(("model.", "data."))):
            say("memory forecast")
            checks.append(memory_check(trainer, cfg, rcfg, prof, info, memory_budget, tuning, scan, world if sharded else 1))
        ckpt = sum(_tensor_bytes(t) for t in model.state_dict().values()) + sum(
            _tensor_bytes(list(s.values())) for s in trainer.optimizer.state.values())
        checks.append(disk_check(run_dir, ckpt, rcfg.checkpoint.keep_last + bool(rcfg.checkpoint.best_metric)))
        checks.append(shm_check(workers, _shm_bytes(scan.worst_item, rcfg.train.batch_size)))
    finally:
        if memory is not None:
            memory.stop()
    return checks


def _together(ok: bool, sharded: bool) -> bool:
    """fsdp: go on only if every rank goes on (the sharded steps below are collectives: a rank that
    stopped alone would leave the others waiting in them)."""
    from trainguard import distributed

    return all(distributed.gather_objects(ok)) if sharded else ok


def _shm_bytes(item, batch_size: int) -> int:
    """Shared memory one batch of the worst case takes on its way from a worker: each tensor in
    its own segment, whole 4 KiB pages."""
    from trainguard.memory.trial import worst_case_batch

    page = 4096
    return sum(-(-t.numel() * t.element_size() // page) * page for t in tensors_in(worst_case_batch(item, batch_size)))


def _one(item):
    from trainguard.memory.trial import worst_case_batch

    return worst_case_batch(item, 1)


# ---- data ------------------------------------------------------------------------------------------------
def _float_fields(item, prefix: str = "") -> dict[str, torch.Tensor]:
    """The floating-point tensors of a collated one-sample batch, by field name."""
    if isinstance(item, torch.Tensor):
        return {prefix or "item": item} if item.is_floating_point() else {}
    if isinstance(item, Mapping):
        out = {}
        for k, v in item.items():
            out.update(_float_fields(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(item, tuple):
        out = {}
        for i, v in enumerate(item):
            out.update(_float_fields(v, f"{prefix}[{i}]" if prefix else f"[{i}]"))
        return out
    return {}


def scan_checks(scan, cfg) -> list[Check]:
    """What a cheap scan of up to 256 samples spread over the dataset shows: samples that fail to
    load, NaN/Inf in float fields, and the distribution of sizes (the worst case, for memory)."""
    checks = []
    n = len(scan.ids) + len(scan.bad)
    budget = cfg.guard.max_skip_fraction
    if scan.bad:
        frac = len(scan.bad) / n
        first = scan.bad[0]
        over = frac > budget
        checks.append(Check("data.items", "fail" if over else "warn",
                            f"{len(scan.bad)} of {n} samples scanned fail to load ({frac:.0%}), e.g. sample {first.sample_id}: {first.reason}",
                            ("more than guard.max_skip_fraction: train would stop; " if over else "the guards skip them within guard.max_skip_fraction; ")
                            + "fix the dataset's __getitem__ for those indices"))
    else:
        checks.append(Check("data.items", "pass", f"{n} samples scanned, spread over the dataset: all load"))
    bad: dict[str, list[int]] = {}
    for sid, item in zip(scan.ids, scan.items):
        for name, t in _float_fields(_one(item)).items():
            if not torch.isfinite(t).all():
                bad.setdefault(name, []).append(sid)
    if bad:
        ids = sorted({i for v in bad.values() for i in v})
        frac = len(ids) / n
        over = frac > budget
        where = ", ".join(f"`{k}` ({len(v)})" for k, v in bad.items())
        checks.append(Check("data.values", "fail" if over else "warn",
                            f"{len(ids)} of {n} samples scanned have NaN/Inf in {where}, e.g. samples {ids[:5]}",
                            (f"{frac:.0%} is more than guard.max_skip_fraction {budget:g}: train would stop on its skip budget; "
                             if over else "the guards skip those samples within the budget; ") + "clean them in the dataset"))
    else:
        checks.append(Check("data.values", "pass", f"no NaN/Inf in the float fields of the {len(scan.ids)} samples scanned"))
    sizes = scan.sizes
    med = statistics.median(sizes)
    spread = f"min {min(sizes):,}, median {med:,.0f}, max {max(sizes):,}"
    msg = f"sample sizes (elements): {spread}; the largest (sample {scan.worst_id}) is the memory worst case"
    if max(sizes) > 4 * med:
        checks.append(Check("data.sizes", "warn", msg + f": {max(sizes) / med:.0f}x the median",
                            "a few very long samples set the memory peak: crop or bucket them, or let micro_batch_size: auto size for them"))
    else:
        checks.append(Check("data.sizes", "pass", msg))
    return checks


# ---- model structure ----------------------------------------------------------------------------------
def structure_checks(model: nn.Module, scan) -> list[Check]:
    """channels_last (4-D conv inputs only) and gradient checkpointing: what applies to this model."""
    checks = []
    convs = {type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    if "Conv2d" in convs:
        checks.append(Check("model.channels_last", "pass", "Conv2d layers take 4-D inputs: the channels_last memory format "
                            "applies (faster convolutions on tensor-core GPUs)"))
    elif "Conv3d" in convs:
        checks.append(Check("model.channels_last", "skip", "Conv3d layers take 5-D inputs: channels_last (4-D only) does not "
                            "apply; torch.channels_last_3d is its 5-D form"))
    else:
        checks.append(Check("model.channels_last", "skip", "no 2-D convolutions: channels_last does not apply"))
    checks.append(checkpointing_check(model))
    return checks


def checkpointing_check(model: nn.Module) -> Check:
    """Is gradient checkpointing (activation recomputation) on, or available to turn on?"""
    # transformers >= 5 renamed is_gradient_checkpointing (its old name warns): the new name first
    on = getattr(model, "is_activation_checkpointing", None)
    if on if on is not None else getattr(model, "is_gradient_checkpointing", False):
        return Check("model.checkpointing", "pass", "gradient checkpointing is on (model.is_gradient_checkpointing)")
    enable = next((a for a in ("activation_checkpointing_enable", "gradient_checkpointing_enable") if callable(getattr(model, a, None))), None)
    if enable:
        return Check("model.checkpointing", "pass", f"gradient checkpointing is available: model.{enable}() "
                     "trades about a third more compute for much less activation memory")
    for m in model.modules():
        try:
            src = inspect.getsource(type(m).forward)
        except (OSError, TypeError):
            continue
        if "checkpoint(" in src:
            return Check("model.checkpointing", "pass", f"{type(m).__name__}.forward() calls torch.utils.checkpoint")
    return Check("model.checkpointing", "skip", "no gradient checkpointing in the model; wrapping its blocks in "
                 "torch.utils.checkpoint.checkpoint would trade compute for activation memory")
