"""The micro-batch forecast for a card that is not here, or for one rank of an fsdp job.

:func:`predict_for_profile` runs :func:`~trainguard.memory.tune.tune`'s search on fake tensors
(``trainguard autoconfig --profile gtx1650`` on a laptop), against the profile's memory less its
headroom and fixed costs; for model code fake tensors cannot run (it reads a tensor's value), real
CPU steps capped at the card's usable memory. :func:`sharded_forecast` is the same for one rank
under ``train.strategy: fsdp``, against the memory in hand or the profile's card.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from trainguard.errors import RunFailed, TrainguardError, first_line
from trainguard.memory.search import search
from trainguard.memory.sizes import fmt_bytes
from trainguard.memory.tune import Tuning, _batch, _choose, _fewest, too_small, usable_bytes


class NoForecast(RunFailed):
    """The forecast cannot say what a step needs (diagnose reports it as ``memory.fit: skip``)."""


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
    _fewest(res, fc.step, bs, on_trial)
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
    return Tuning(m, -(-bs // m), bs, fc.precision, int(cfg.data.num_workers)
                  if cfg.data.num_workers != "auto" else prof.num_workers, fc.limit, fc.usable, peak, "predicted",
                  res.largest, len(res.trials), device=prof.description, profile=prof.name, notes=notes,
                  forecast="measured" if fc.measured else "fake")
