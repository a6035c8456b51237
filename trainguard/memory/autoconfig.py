"""Choosing the micro-batch (and precision, workers) for a device: measured, cached, or predicted.

* :func:`~trainguard.memory.tune.tune` and :func:`~trainguard.memory.tune.cached_tune`
  (:mod:`~trainguard.memory.tune`): on the device in hand, real trial steps find the largest
  micro-batch that fits, remembered per model, config and device. Used by ``trainguard autoconfig``
  and ``micro_batch_size: auto``.
* :func:`~trainguard.memory.profile_forecast.predict_for_profile`
  (:mod:`~trainguard.memory.profile_forecast`): the same search on fake tensors for a profile's
  card that is not here, or for one rank of an fsdp job.
* :func:`autoconfigure`: ``trainguard autoconfig``'s library function, which picks one of them.

Their names are re-exported here, where callers import them.
"""

from __future__ import annotations

from trainguard.memory.profile_forecast import (  # noqa: F401 - importable from here
    NoForecast, ProfileForecast, forecast, predict_for_profile, sharded_forecast)
from trainguard.memory.sizes import fmt_bytes
from trainguard.memory.tune import (  # noqa: F401 - importable from here
    Tuning, _choose, _fewest, cache_key, cache_path, cached_tune, too_small, tune, usable_bytes)

__all__ = ["NoForecast", "ProfileForecast", "Tuning", "autoconfigure", "cache_key", "cache_path", "cached_tune", "card_here",
           "forecast", "predict_for_profile", "sharded_forecast", "too_small", "tune", "usable_bytes"]


def autoconfigure(config_path, *, profile: str | None = None, overrides: list[str] | None = None,
                  memory_budget: int | None = None, on_trial=None, processes: int = 1) -> tuple[Tuning, dict]:
    """Tune a config for the device in hand (``measured``) or for a profile whose card is not here
    (``predicted``). Returns the tuning and the user's config with the chosen values filled in.
    ``processes``: for a job of that many (``--nproc-per-node``), each stepping on its share of
    ``train.batch_size``; under ``train.strategy: fsdp`` with the model sharded over them, which is
    always forecast (:func:`sharded_forecast`), the card in hand or not."""
    from trainguard.config.load import deep_merge, load_yaml_with_extends, parse_override, resolve_config
    from trainguard.hardware.probe import probe

    cfg, prof, why = resolve_config(config_path, profile=profile, overrides=overrides)
    info = probe()
    if processes > 1:
        from trainguard.build import check_world_batch

        check_world_batch(cfg, processes)
    sharded = processes > 1 and cfg.train.strategy == "fsdp"
    share = cfg.model_copy(deep=True)
    share.train.batch_size //= processes
    if card_here(prof, info) or memory_budget:
        tuning = _measure_here(share, prof, info, memory_budget, on_trial, processes, sharded)
    else:
        if share.train.precision == "auto":
            share.train.precision = prof.precision
        if share.train.precision == "bf16" and not prof.bf16:
            from trainguard.errors import ConfigError

            raise ConfigError(f"precision bf16 is not supported on {prof.name} ({prof.description})",
                              "use --set train.precision=fp16 (with loss scaling) or fp32")
        tuning = predict_for_profile(share, prof, on_trial,
                                     fc=sharded_forecast(share, prof, None, None, processes) if sharded else None,
                                     processes=processes)
        tuning.notes.insert(0, f"predicted for {prof.name}: this machine has {info.name}")
    if processes > 1:
        tuning.processes, tuning.batch_size = processes, cfg.train.batch_size
        tuning.notes.insert(0, f"per process: {tuning.split()} x "
                               f"{processes} processes = batch_size {cfg.train.batch_size}"
                               + (" (fsdp: one rank's step, the model sharded over them)" if sharded else ""))
    user = load_yaml_with_extends(config_path)
    for item in overrides or []:
        user = deep_merge(user, parse_override(item))
    tuned = deep_merge(user, {"hardware": prof.name,
                              "train": {"micro_batch_size": tuning.micro_batch_size, "precision": tuning.precision},
                              "data": {"num_workers": tuning.num_workers}})
    return tuning, tuned


def card_here(prof, info) -> bool:
    """Is the profile's device the one in hand (so memory is measured, not predicted)?"""
    from trainguard.hardware.profiles import match_profile

    return prof.device == info.type and (info.type != "cuda" or match_profile(info)[0].name == prof.name)


def _measure_here(cfg, prof, info, memory_budget: int | None, on_trial, processes: int = 1,
                  sharded: bool = False) -> Tuning:
    """On the device in hand, for one process's share (``cfg.train.batch_size``); sharded, forecast."""
    from trainguard.memory.meter import SimulatedMemory, open_memory, prefer_expandable_segments
    from trainguard.build import build_core, device_of, resolve_runtime

    prefer_expandable_segments()
    cfg.train.micro_batch_size = cfg.train.batch_size  # cfg holds one process's share; the search starts there
    cfg, _ = resolve_runtime(cfg, prof, info, processes)  # workers: the node's cores shared by the processes
    device = device_of(info)
    memory = open_memory(device, memory_budget)
    if memory is None:  # a CPU without a budget: the RAM that is free is the limit, shared by the processes
        memory = SimulatedMemory(int(info.free_memory_gb * 2**30 / processes), name="free RAM")
    if sharded:
        tuning = predict_for_profile(cfg, prof, on_trial, fc=sharded_forecast(cfg, prof, memory, None, processes),
                                     processes=processes)
    else:
        memory.start()
        try:
            trainer = build_core(cfg, device, memory)
            tuning = tune(trainer, cfg.train.batch_size, cfg.memory.headroom, on_trial, processes)
        finally:
            memory.stop()
    tuning.num_workers, tuning.device, tuning.profile = int(cfg.data.num_workers), info.name, prof.name
    if memory.kind == "simulated":
        what = "--memory-budget" if memory_budget else "free RAM"
        how = "forecast" if sharded else "measured"
        tuning.notes.insert(0, f"{how} on {info.name} against {what} {fmt_bytes(memory.limit)} (simulated device memory)")
    return tuning
