"""The memory checks of ``trainguard diagnose``: the configured micro-batch's peak against the
device's memory (``memory.fit``) and, on a CPU without a budget, against the free RAM (``memory.ram``).

The figures are those ``trainguard autoconfig`` gives: trial steps and the cache
(:mod:`~trainguard.memory.tune`) on the device in hand, the fake-tensor forecast
(:mod:`~trainguard.memory.profile_forecast`) for the profile's card when it is not here and for one
rank of an fsdp job.
"""

from __future__ import annotations

import os

from trainguard.engine.batch import describe_split
from trainguard.errors import TrainguardError
from trainguard.guards.preflight import Check
from trainguard.memory.autoconfig import card_here
from trainguard.memory.sizes import fmt_bytes

GiB = 2**30


def memory_check(trainer, cfg, rcfg, prof, info, budget: int | None, tuning, scan, world: int = 1) -> Check:
    """The peak at the configured micro-batch against the memory of the device (measured here) or
    of the profile's card (predicted when it is not here), and what autoconfig would choose.
    ``world`` > 1: one rank of an fsdp job, always forecast (:func:`~trainguard.memory.profile_forecast.sharded_forecast`)."""
    from trainguard.memory.meter import SimulatedMemory
    from trainguard.memory.profile_forecast import NoForecast, forecast, predict_for_profile
    from trainguard.memory.tune import Tuning, cached_tune, usable_bytes

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
    head = f"{describe_split(bs, m)} peaks at {fmt_bytes(peak) if peak else 'more than the limit'} ({how}) of {fmt_bytes(usable)} usable on {where}"
    choice = ""
    if isinstance(tuning, Tuning):
        choice = (f"; autoconfig picks {tuning.split()} (the largest that fits is {tuning.max_micro_batch_size}"
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
    from trainguard.memory.meter import SimulatedMemory
    from trainguard.memory.profile_forecast import sharded_forecast

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
