"""The config built exactly as ``trainguard train`` builds it, one batch through it, and the memory
forecast: the data, model and memory checks of ``trainguard diagnose``.

Nothing here re-implements train: the parts come from :mod:`trainguard.build` (``build_model``,
``build_train_data``, ``build_core``, ``resolve_runtime``), the first step from the shared
:func:`~trainguard.guards.preflight.preflight` (field filter, collate rules, embedding lookups,
shapes, batch coupling, compile), the worst case from ``DataStream.scan``, and the memory figures from the same
trial steps, cache and fake-tensor forecast that ``trainguard autoconfig`` uses.
"""

from __future__ import annotations

import inspect
import os
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trainguard.diagnose.environment import cpu_check, disk_check, shm_check
from trainguard.errors import TrainguardError, first_line
from trainguard.guards.localize import _tensors as tensors_in
from trainguard.guards.preflight import Check, preflight
from trainguard.memory.autoconfig import card_here
from trainguard.memory.sizes import fmt_bytes

GiB = 2**30
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
            from trainguard.memory.autoconfig import cached_tune, predict_for_profile

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


# ---- memory --------------------------------------------------------------------------------------------
def memory_check(trainer, cfg, rcfg, prof, info, budget: int | None, tuning, scan, world: int = 1) -> Check:
    """The peak at the configured micro-batch against the memory of the device (measured here) or
    of the profile's card (predicted when it is not here), and what autoconfig would choose.
    ``world`` > 1: one rank of an fsdp job, always forecast (:func:`~trainguard.memory.autoconfig.sharded_forecast`)."""
    from trainguard.memory.autoconfig import NoForecast, Tuning, cached_tune, forecast, predict_for_profile, usable_bytes

    from trainguard.memory.meter import SimulatedMemory

    bs = rcfg.train.batch_size
    m = trainer.micro_batch_size
    on_oom = rcfg.guard.on_oom
    memory = trainer.memory
    aside = ""  # why the forecast was measured rather than faked, if it was
    try:
        if world > 1:  # fsdp: one rank's step forecast with FSDP2 sharding over a fake group (nothing runs out of memory)
            fc, where = _sharded(cfg, rcfg, prof, info, memory, budget, scan.worst_item, world)
            if fc is None:
                return Check("memory.fit", "skip", where)
            if not isinstance(tuning, Tuning):
                tuning = predict_for_profile(fc.cfg, prof, fc=fc, processes=world)
            peak = tuning.predicted_peak_bytes if tuning.micro_batch_size == m else fc.step(m).peak
            usable, how = fc.usable, f"predicted for one of {world} ranks, train.strategy: fsdp"
        elif budget or (memory is not None and card_here(prof, info)):  # measured on the device in hand
            where = f"--memory-budget {fmt_bytes(budget)} (simulated)" if memory.kind == "simulated" else info.name
            usable = usable_bytes(memory, rcfg.memory.headroom)
            if tuning is None:
                tuning, _ = cached_tune(trainer, rcfg, info.name)
            peak = tuning.predicted_peak_bytes if tuning.micro_batch_size == m else _measured(trainer, scan.worst_item, m, bs)
            how = "measured"
        elif prof.device == "cuda":  # the profile's card is not here: fake-tensor forecast, as autoconfig --profile
            pcfg = cfg.model_copy(deep=True)
            pcfg.train.precision = prof.precision if cfg.train.precision == "auto" else cfg.train.precision
            if pcfg.train.precision == "bf16" and not prof.bf16:
                return Check("memory.fit", "skip", f"no forecast: {prof.name} cannot run bf16 (see hardware.precision)")
            fc = forecast(pcfg, prof, trainer.model, trainer.adapter.loss_fn, scan.worst_item)
            tuning = predict_for_profile(pcfg, prof, fc=fc)
            if cfg.train.micro_batch_size == "auto":
                m = tuning.micro_batch_size
            peak = tuning.predicted_peak_bytes if tuning.micro_batch_size == m else fc.step(m).peak
            usable, where, how = fc.usable, f"{prof.name} ({prof.description}, {pcfg.train.precision})", "predicted"
            if fc.measured:  # fake tensors cannot run the model: real CPU steps under the card's usable memory
                how, aside = "predicted from real steps on this CPU", f"; fake tensors cannot run the model: {fc.measured}"
        else:  # a CPU (or MPS) without a budget: RAM is the limit (the OS kills past it), nothing is searched
            ram = SimulatedMemory(int(info.free_memory_gb * GiB), name="free RAM")
            trainer.memory = ram.start()
            ram.tracker.track(trainer.model, trainer.optimizer)  # built before the tracker: counted now
            try:
                peak = _measured(trainer, scan.worst_item, m, bs)
            finally:
                ram.stop()
                trainer.memory = None
            usable, where, how = ram.limit, f"free RAM on {info.name}", "measured"
            tuning = None
    except NoForecast as e:  # what the forecast cannot judge is a skip, with the reason
        return Check("memory.fit", "skip", e.message, e.hint)
    except TrainguardError as e:
        return Check("memory.fit", "fail", e.message, e.hint)
    head = f"micro-batch {m} x {bs // m} accumulation peaks at {fmt_bytes(peak) if peak else 'more than the limit'} ({how}) of {fmt_bytes(usable)} usable on {where}"
    choice = ""
    if isinstance(tuning, Tuning):
        choice = (f"; autoconfig picks micro-batch {tuning.micro_batch_size} (the largest that fits is {tuning.max_micro_batch_size}"
                  + (", searched up to the batch size" if tuning.forecast == "measured" else "") + ")")
    choice += aside
    if peak is not None and peak <= usable:
        return Check("memory.fit", "pass", head + choice)
    smaller = tuning.micro_batch_size if isinstance(tuning, Tuning) else None
    if on_oom == "split" and smaller:
        return Check("memory.fit", "warn", head + f": the first step will run out of memory and split (guard.on_oom: split){choice}",
                     f"set train.micro_batch_size: {smaller} (or auto) to start there")
    return Check("memory.fit", "fail", head + (": it does not fit" if not smaller else f": guard.on_oom is stop, so train would end at step 1{choice}"),
                 f"set train.micro_batch_size: {smaller} (or auto)" if smaller else
                 "a smaller micro-batch, a smaller model, precision fp16/bf16, gradient checkpointing, or a larger card")


def _sharded(cfg, rcfg, prof, info, memory, budget: int | None, item, world: int):
    """fsdp: the forecast of one rank's step against what it has: the budget, the card in hand, the
    node's free RAM shared by its ranks (a CPU), or else the profile's card. Returns (forecast,
    where), or (None, why not)."""
    from trainguard.memory.autoconfig import sharded_forecast
    from trainguard.memory.meter import SimulatedMemory

    here = memory is not None and bool(budget or card_here(prof, info))
    pcfg = rcfg.model_copy(deep=True)
    if not here:  # the profile's card: its precision, as for a replicated model below
        pcfg.train.precision = prof.precision if cfg.train.precision == "auto" else cfg.train.precision
    if pcfg.train.precision == "bf16" and prof.device == "cuda" and not prof.bf16:
        return None, f"no forecast: {prof.name} cannot run bf16 (see hardware.precision)"
    limit = memory if here else None
    where = (f"--memory-budget {fmt_bytes(budget)} (simulated)" if budget else info.name if here
             else f"{prof.name} ({prof.description}, {pcfg.train.precision})")
    if memory is None and prof.device != "cuda" and card_here(prof, info):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        limit = SimulatedMemory(int(info.free_memory_gb * GiB / local), name="free RAM")
        where = f"free RAM on {info.name}, shared by {local} ranks"
    return sharded_forecast(pcfg, prof, limit, item, world), where


def ram_check(trainer, item, info, here: bool) -> Check | None:
    """On a CPU (or MPS) without a budget, a step larger than the free RAM is not an error but the
    OS killing the process: forecast it on fake tensors before running anything real. When it does
    not fit, the real checks run at the largest micro-batch that does (``trainer.micro_batch_size``)."""
    from trainguard.memory.predict import predict_trainer

    free = int(info.free_memory_gb * GiB * 0.9)
    m = trainer.micro_batch_size
    try:
        need = predict_trainer(trainer, item, m).peak
    except Exception:  # noqa: BLE001 - a model the fake-tensor forecast cannot run: measure for real as train would
        return None
    if need is None or need <= free:
        return None
    n = m
    while n > 1 and (predict_trainer(trainer, item, n).peak or 0) > free:
        n //= 2
    trainer.micro_batch_size = n
    return Check("memory.ram", "fail" if here else "warn",
                 f"micro-batch {m} needs about {fmt_bytes(need)} of RAM on {info.name} (forecast), more than the "
                 f"{fmt_bytes(free)} free: train on this machine would be killed by the OS; the checks below ran at micro-batch {n}",
                 f"set train.micro_batch_size: {n} (or smaller) for this machine" if here else
                 "this config is for another card (see config.profile): train it there, or use hardware: auto here")


def _measured(trainer, item, m: int, batch_size: int) -> int | None:
    """One real trial step at micro-batch ``m`` (None when it ran out of memory)."""
    from trainguard.memory import trial

    with trial.preserved(trainer):
        t = trial.measure(trainer, item, m, enforce=False, accumulate=m < batch_size, batch_size=batch_size)
    return t.peak
