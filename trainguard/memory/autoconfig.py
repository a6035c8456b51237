"""Choosing the micro-batch (and precision, workers) for a device: measured, cached, or predicted.

* :func:`tune`: on the device in hand (CUDA, or a simulated ``--memory-budget``), real trial steps
  on the worst-case batch find the largest micro-batch that fits ``(1 - headroom)`` of the memory;
  the micro-batch is then the largest divisor of ``train.batch_size`` at most that, so the
  effective batch is unchanged. Used by ``trainguard autoconfig`` and ``micro_batch_size: auto``.
* :func:`cached_tune`: the same, remembered per (model, data, optimizer, batch, precision, device),
  so the next run on that hardware starts tuned. A stale entry is harmless: an OOM splits.
* :func:`predict_for_profile`: the same search on fake tensors for a profile's card that is not
  here (``trainguard autoconfig --profile gtx1650`` on a laptop); for model code fake tensors cannot
  run (it reads a tensor's value), real CPU steps capped at the card's usable memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from trainguard.errors import RunFailed, TrainguardError, first_line
from trainguard.memory.search import SearchResult, divisor_at_most, search
from trainguard.memory.sizes import fmt_bytes, one_sample_does_not_fit
from trainguard.memory.trial import Trial


class NoForecast(RunFailed):
    """The forecast cannot say what a step needs (diagnose reports it as ``memory.fit: skip``)."""


@dataclass
class Tuning:
    """What autoconfig chose, and why (the ``--json`` output has these fields)."""

    micro_batch_size: int
    grad_accum: int
    batch_size: int
    precision: str
    num_workers: int
    memory_limit_bytes: int | None       # what the run may use: the budget, else the device's memory
    usable_bytes: int | None             # less the headroom (and, predicted, a card's fixed costs)
    predicted_peak_bytes: int | None     # the peak at micro_batch_size (measured or predicted, see `method`)
    method: str                          # measured | predicted | cached | none
    max_micro_batch_size: int            # the largest micro-batch that fits, divisor of batch_size or not
    trials: int = 0
    device: str = ""
    profile: str = ""
    notes: list[str] = field(default_factory=list)
    processes: int = 1                   # micro_batch_size x grad_accum x processes = batch_size
    forecast: str = ""                   # predicted: "fake" (fake-tensor steps) or "measured" (real CPU steps, budgeted)

    def as_json(self) -> dict:
        return asdict(self)


def usable_bytes(memory, headroom: float) -> int:
    """Bytes a step may peak at: the limit less the headroom, and on a CUDA card without a budget
    less what other processes (and the CUDA context) already hold."""
    usable = int(memory.limit * (1 - headroom))
    if memory.kind == "cuda" and not memory.budget:
        import torch

        free, total = torch.cuda.mem_get_info(memory.device)
        others = total - free - torch.cuda.memory_reserved(memory.device)
        usable -= max(0, others)
    return usable


def _whole_batch(res: SearchResult, measure: Callable[[int], Trial], batch_size: int,
                 on_trial: Callable[[Trial], None] | None) -> None:
    """The search assumes memory grows with the micro-batch, but at ``batch_size`` itself there is
    no accumulation, so no gradient is held from an earlier micro-batch: the whole batch can fit
    where one sample less, accumulating, does not. Measured once when the search stopped short of
    it by at most half (the most that holding no gradients can make up for a model whose gradients
    are a sizable part of its step)."""
    if res.largest < batch_size <= 2 * res.largest and all(t.m != batch_size for t in res.trials):
        t = measure(batch_size)
        res.trials.append(t)
        if on_trial:
            on_trial(t)
        if t.fits(res.usable):
            res.largest = batch_size


def _batch(batch_size: int, processes: int) -> str:
    """How the notes name the samples a micro-batch must divide: one process's share in a job."""
    return (f"train.batch_size {batch_size}" if processes == 1 else
            f"the {batch_size} samples per process (train.batch_size {batch_size * processes} / {processes})")


def _choose(res: SearchResult, batch_size: int, processes: int = 1) -> tuple[int, list[str]]:
    m = divisor_at_most(batch_size, res.largest)
    notes = []
    if m < res.largest:
        notes.append(f"up to {res.largest} samples fit per micro-batch; {m} is the largest that divides "
                     + _batch(batch_size, processes) + ("" if m * 4 >= res.largest * 3 else
                                                        " (a batch_size with more divisors would use the memory better)"))
    return m, notes


def too_small(need: int | None, usable: int, limit: int, headroom: float, where: str = "") -> RunFailed:
    return RunFailed(*one_sample_does_not_fit(
        need, f"{fmt_bytes(usable)} usable{where} ({fmt_bytes(limit)} less {headroom:.0%} headroom)"))


def tune(trainer, batch_size: int, headroom: float, on_trial: Callable[[Trial], None] | None = None,
         processes: int = 1) -> Tuning:
    """Search the largest micro-batch on ``trainer``'s device; the trainer is left as it was.

    Must run before the first step (see :func:`trainguard.memory.trial.preserved`).
    """
    from trainguard.memory import trial

    mem = trainer.memory
    usable = usable_bytes(mem, headroom)
    item = trainer.data.scan().worst_item
    with trial.preserved(trainer):
        res = search(lambda m: trial.measure(trainer, item, m, enforce=False, accumulate=m < batch_size,
                                                         batch_size=batch_size),
                     usable, batch_size, on_trial=on_trial)
        if res.largest == 0:
            need = res.trials[0].peak if not res.trials[0].oom else None
            raise too_small(need, usable, mem.limit, headroom)
        _whole_batch(res, lambda m: trial.measure(trainer, item, m, enforce=False, accumulate=False, batch_size=batch_size),
                     batch_size, on_trial)
    m, notes = _choose(res, batch_size, processes)
    peak = next((t.peak for t in res.trials if t.m == m and not t.oom), None) or (round(res.lines.predict(m)) if res.lines else None)
    return Tuning(m, batch_size // m, batch_size, trainer.precision, 0, mem.limit, usable, peak, "measured",
                  res.largest, len(res.trials), notes=notes)


# ---- the cache ---------------------------------------------------------------------------------------
def cache_path() -> Path:
    root = os.environ.get("TRAINGUARD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainguard"
    return Path(root) / "autoconfig.json"


def cache_key(cfg, device_name: str, limit: int | None) -> str:
    import torch

    what = {"model": cfg.model, "loss": cfg.loss, "data": cfg.data.train, "fields": cfg.data.fields,
            "optim": cfg.optim.model_dump(mode="json"), "batch_size": cfg.train.batch_size,
            "precision": cfg.train.precision, "headroom": cfg.memory.headroom, "device": device_name,
            "limit": limit, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def cached_tune(trainer, cfg, device_name: str, on_trial=None, world: int = 1) -> tuple[Tuning, bool]:
    """:func:`tune`, or its remembered answer for the same model, config and device. Returns (tuning, from_cache).
    With ``world`` ranks each takes ``batch_size / world`` samples a step: the search is for that share."""
    key = cache_key(cfg, device_name, trainer.memory.limit) + (f"/world{world}" if world > 1 else "")
    hit = _read_cache().get(key)
    if hit:
        return Tuning(**{**hit, "method": "cached"}), True
    tuning = tune(trainer, cfg.train.batch_size // world, cfg.memory.headroom, on_trial, world)
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = {**tuning.as_json(), "notes": tuning.notes + [f"searched {time.strftime('%Y-%m-%d %H:%M')}"]}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:  # a read-only home: tuning still works, it is only not remembered
        pass
    return tuning, False


# ---- prediction for a card that is not here -----------------------------------------------------------
@dataclass
class ProfileForecast:
    """Fake-tensor steps of a config's model as the profile's card would count them."""

    cfg: object
    prof: object
    model: object
    loss_fn: object
    item: object
    precision: str
    limit: int
    usable: int
    costs: dict
    world: int = 1  # train.strategy: fsdp over this many ranks (1: the whole model on the card)
    memory: object = None  # the device memory of a run in progress: not to count the forecast's fake tensors
    measured: str | None = None  # why fake tensors cannot run the model: its steps then run for real on the CPU

    def step(self, m: int):
        """The predicted :class:`~trainguard.memory.trial.Trial` at micro-batch ``m`` (one rank's, sharded).

        On fake tensors; where the model's code cannot run on them (it reads a tensor's value),
        real steps of the worst-case batch on this CPU, counted as the fake ones are, under a
        simulated budget of the card's usable memory (:func:`~trainguard.memory.predict.measured_step`):
        ``measured`` then says why, and every later step is measured too."""
        from trainguard.engine.optim import build_optimizer
        from trainguard.memory import predict

        make_opt = lambda ps: build_optimizer(ps, self.cfg.optim)  # noqa: E731
        extra = sum(v for k, v in self.costs.items() if k != "cuda_context")  # the context is outside the allocator
        kwargs = dict(extra=extra, accumulate=m < self.cfg.train.batch_size, cuda=self.prof.device == "cuda")
        with self.memory.paused() if self.memory is not None else contextlib.nullcontext():
            if self.measured is None:
                try:
                    args = (self.model, self.loss_fn, self.cfg.data.fields, make_opt, self.item, m, self.precision)
                    if self.world > 1:
                        return predict.fake_sharded_step(*args, self.world, **kwargs)
                    return predict.fake_step(*args, **kwargs)
                except TrainguardError:
                    raise
                except Exception as e:  # noqa: BLE001 - fake tensors' limits (and the model's own errors): measured below
                    if self.world > 1:  # a real sharded step would need the ranks: say so instead
                        raise NoForecast(f"the memory forecast of one fsdp rank cannot run {type(self.model).__name__}: "
                                         f"{predict.why_not_fake(e)}", "set train.micro_batch_size to a number (under "
                                         "fsdp the micro-batch is only forecast, never searched with trial steps)") from e
                    self.measured = predict.why_not_fake(e)
            try:
                return predict.measured_step(self._real_model(), self.loss_fn, self.cfg.data.fields, make_opt, self.item,
                                             m, self.precision, limit=max(0, self.usable - extra), seed=self.cfg.seed,
                                             **kwargs)
            except TrainguardError:
                raise
            except Exception as e:  # noqa: BLE001 - the real step fails too: the model's own error, named
                raise NoForecast(f"no memory forecast: fake tensors cannot run {type(self.model).__name__} "
                                 f"({self.measured}), and its real step at micro-batch {m} on this CPU failed: "
                                 f"{type(e).__name__}: {first_line(e)}",
                                 "run `trainguard diagnose` on the config: it runs the model's first step and names "
                                 "the module that fails (--debug for the traceback)") from e

    def _real_model(self):
        """The model with real weights (the forecast's own is on ``meta``): built once, seeded as train seeds it."""
        import psutil
        import torch

        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        meta = any(t.is_meta for t in (*self.model.parameters(), *self.model.buffers()))
        ram = psutil.virtual_memory().available
        if (1 + meta) * weights + self.usable > 0.9 * ram:  # the weights (built now), their copy, and the capped step
            raise NoForecast(f"no memory forecast: fake tensors cannot run {type(self.model).__name__} ({self.measured}), "
                             f"and measuring its step on this CPU needs about {fmt_bytes((1 + meta) * weights + self.usable)} "
                             f"of RAM, more than the {fmt_bytes(ram)} available",
                             "run `trainguard autoconfig` on the card itself (measured there), or set "
                             "train.micro_batch_size to a number")
        if not meta:
            return self.model
        from trainguard.config.instantiate import instantiate

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            self.model = instantiate(self.cfg.model, "model")
        return self.model


def forecast(cfg, prof, model=None, loss_fn=None, item=None, world: int = 1) -> ProfileForecast:
    """Set up :class:`ProfileForecast`; the model, loss and worst-case item are built (the model
    on ``meta``: no memory for its weights) unless given. ``world`` > 1: one rank of an fsdp job,
    whose ``cfg.train.batch_size`` is the rank's share."""
    import torch

    from trainguard.config.instantiate import instantiate
    from trainguard.engine.batch import ModelAdapter
    from trainguard.engine.collate import build_collate
    from trainguard.engine.data import DataStream
    from trainguard.memory import predict

    if model is None:
        try:
            with torch.device("meta"):  # no memory for the weights: only their shapes are needed
                model = instantiate(cfg.model, "model")
        except Exception:  # noqa: BLE001 - some models cannot be built on meta; build them for real
            model = instantiate(cfg.model, "model")
        loss_fn = instantiate(cfg.loss, "loss") if cfg.loss else None
    if item is None:
        ds = instantiate(cfg.data.train, "data.train")
        collate = build_collate(cfg.data.collate_fn, cfg.seed)
        if collate is not None and cfg.data.filter_fields:  # the fields the model gets, as in training (engine.batch.FieldFilter)
            collate.keep = ModelAdapter(model, loss_fn, cfg.data.fields).filter
        item = DataStream(ds, cfg.train.batch_size, seed=cfg.seed, shuffle=False, num_workers=0, pin_memory=False,
                          collate_fn=collate).scan().worst_item  # collated as training does
    costs = predict.fixed_costs(prof)
    limit = int(prof.memory_gb * 2**30)
    usable = int(limit * (1 - cfg.memory.headroom)) - costs.get("cuda_context", 0)
    return ProfileForecast(cfg, prof, model, loss_fn, item, cfg.train.precision, limit, usable, costs, world)


def sharded_forecast(cfg, prof, memory, item, world: int) -> ProfileForecast:
    """``train.strategy: fsdp``: the forecast of one rank's step (:func:`forecast` with ``world``),
    against the memory in hand (``memory``: a CUDA card or a ``--memory-budget``, less its headroom
    and, on a card, the workspaces the forecast adds) or, without it, the profile's card. Used
    for fsdp in place of trial steps, which would run out of memory on purpose in the middle of the
    ranks' collectives. Every rank computes the same answer: the forecast exchanges nothing."""
    fc = forecast(cfg, prof, item=item, world=world)
    if memory is not None:
        fc.memory = memory
        fc.limit = memory.limit
        fc.usable = usable_bytes(memory, cfg.memory.headroom)
        if memory.kind != "cuda":  # a simulated budget: no card's fixed costs
            fc.costs = {}
    return fc


def predict_for_profile(cfg, prof, on_trial=None, fc: ProfileForecast | None = None, processes: int = 1) -> Tuning:
    """The micro-batch search on fake tensors, against the profile's memory less its headroom and fixed costs."""
    fc = fc or forecast(cfg, prof)
    bs = cfg.train.batch_size
    first = {1: fc.step(1)}  # on fake tensors, or measured on this CPU where they cannot run the model (fc.measured)
    # fake steps are cheap: look past batch_size, so the answer also says how far the card would go; real ones are not
    res = search(lambda m: first.pop(m, None) or fc.step(m), fc.usable, bs if fc.measured else 4096 * bs, on_trial=on_trial)
    if res.largest == 0:
        raise too_small(res.trials[0].peak, fc.usable, fc.limit, cfg.memory.headroom, f" on {prof.name}")
    _whole_batch(res, fc.step, bs, on_trial)
    m, notes = _choose(res, bs, processes)
    if res.largest > bs:
        notes = [f"the card fits up to {res.largest} samples per micro-batch: {_batch(bs, processes)} "
                 "runs without accumulation, with room for a larger batch"]
    peak = next(t.peak for t in res.trials if t.m == res.largest) if m == res.largest else fc.step(m).peak
    if fc.costs:
        notes.append("fixed costs added: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in fc.costs.items()))
    if fc.measured:
        notes.insert(0, f"fake tensors cannot run this model ({fc.measured}): measured instead, real steps of the "
                        f"worst-case batch on this CPU under a simulated {fmt_bytes(fc.usable)} budget, with the card's "
                        f"autocast and fused attention mirrored; searched up to {_batch(bs, processes)}")
    return Tuning(m, bs // m, bs, fc.precision, int(cfg.data.num_workers)
                  if cfg.data.num_workers != "auto" else prof.num_workers, fc.limit, fc.usable, peak, "predicted",
                  res.largest, len(res.trials), device=prof.description, profile=prof.name, notes=notes,
                  forecast="measured" if fc.measured else "fake")


# ---- `trainguard autoconfig` ------------------------------------------------------------------------
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

        check_world_batch(cfg.model_copy(update={"train": cfg.train.model_copy(update={"micro_batch_size": "auto"})}),
                          processes)
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
        tuning.notes.insert(0, f"per process: micro-batch {tuning.micro_batch_size} x {tuning.grad_accum} accumulation x "
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
