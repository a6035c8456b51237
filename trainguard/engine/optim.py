"""Optimizer and learning-rate schedule, each built from its own config section: trainguard's
built-in ones (`name:`), or the user's own (`_target_:`), called as torchtune does (the parameter
groups, or the optimizer, first). The run's schedule is a :class:`Schedule` around either, which
also carries the LR scale the guards lower on rollback, for any scheduler."""

from __future__ import annotations

import copy
import contextlib
import inspect
import math
import weakref
from typing import Any, Callable

import torch
from torch import nn

from trainguard.config.instantiate import instantiate, locate
from trainguard.config.schema import OptimConfig, ScheduleConfig
from trainguard.errors import ConfigError, RunFailed, TrainguardError, first_line

# Built-in optimizers whose zero-gradient step at lr 0 and weight decay 0 is a bitwise no-op on the
# weights and whose zeroed state is a fresh one's: no copy of the weights, no check (today's path).
KNOWN_EXACT = (torch.optim.AdamW, torch.optim.SGD)
_NOTES: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()  # said once at start
_LAZY: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()  # state allocated by the first step instead


def build_optimizer(model: nn.Module | list, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over a model's (or a list of) parameters; weight decay only on tensors with
    2+ dims (not biases or norms); fused per ``optim.fused``."""
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    if cfg.target is not None:
        return _user_optimizer(cfg, params, decay, no_decay)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = can_fuse(params) if cfg.fused == "auto" else cfg.fused
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def _user_optimizer(cfg: OptimConfig, params: list, decay: list, no_decay: list) -> torch.optim.Optimizer:
    """``optim._target_`` called with the parameter groups first, then its keys (nested ``_target_``
    values built first); ``fused=`` only if it takes it."""
    fn = locate(cfg.target, "optim._target_")
    kwargs = instantiate(dict(cfg.kwargs), "optim")
    takes = _keywords(fn)
    notes = []
    if "weight_decay" in takes or "weight_decay" in kwargs:  # the decay group gets the optimizer's value
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": params}]
    auto_fused = "fused" in takes and cfg.fused == "auto" and can_fuse(params)
    if auto_fused or ("fused" in takes and cfg.fused is True):
        kwargs["fused"] = True
    elif cfg.fused is True:
        notes.append(f"optim.fused: true, but `{cfg.target}` takes no `fused` argument: its own implementation is used")
    try:
        opt = _call(fn, "optim", cfg.target, groups, kwargs)
    except TrainguardError as e:
        if not auto_fused:
            raise
        kwargs.pop("fused")  # optim.fused: auto, and this optimizer has no fused kernel for these parameters
        opt = _call(fn, "optim", cfg.target, groups, kwargs)
        notes.append(f"`{cfg.target}` refused fused=True here ({e.message}): its default implementation is used")
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"optim: `{cfg.target}` returned a {type(opt).__name__}, not an optimizer",
                          "optim._target_ must name a torch.optim.Optimizer (or a function returning one)")
    if _required_args(opt.step):
        raise ConfigError(f"optim: `{cfg.target}`'s step() needs an argument ({', '.join(_required_args(opt.step))}): "
                          "trainguard calls it with none, once per optimizer step",
                          "use an optimizer that steps without a closure (LBFGS needs one)")
    _NOTES[opt] = notes
    return opt


def _keywords(fn: Callable) -> set[str]:
    """The keyword arguments ``fn`` names (an empty set when it has no signature)."""
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _required_args(method: Callable) -> list[str]:
    """The arguments a bound method cannot be called without."""
    try:
        ps = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in ps if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _call(fn: Callable, where: str, target: str, first: Any, kwargs: dict) -> Any:
    """``fn(first, **kwargs)``: arguments it cannot take, or refuses, are a config error naming ``where``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature: the call itself speaks
        sig = None
    if sig is not None:
        try:
            sig.bind(first, **kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}: cannot call `{target}` with {sorted(kwargs)}: {e}",
                              f"fix the keys under `{where}` (its signature is {getattr(fn, '__name__', target)}{sig})") from None
    try:
        return fn(first, **kwargs)
    except TrainguardError:
        raise
    except (ValueError, TypeError) as e:  # e.g. "Invalid learning rate: -1.0"
        raise ConfigError(f"{where}: `{target}` refused its arguments: {type(e).__name__}: {first_line(e)}",
                          f"fix the keys under `{where}`") from e
    except Exception as e:
        raise RunFailed(f"{where}: `{target}` raised {type(e).__name__}: {first_line(e)}",
                        "the error is in that code; re-run with --debug for the traceback") from e


def notes(*parts: Any) -> list[str]:
    """What the run must say at start about its optimizer and schedule (what they cannot do)."""
    return [n for p in parts for n in _NOTES.get(p, ())]


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused optimizer kernel for these parameters: one device of a kind it
    supports, real floating-point dtypes."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without it: its default implementation
        return False
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in _get_fused_kernels_supported_devices()
            and all(p.is_floating_point() for p in params))


def lr_factor(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int) -> "Schedule":
    """The run's :class:`Schedule`: the built-in LambdaLR, or ``schedule._target_`` called with the
    optimizer first (a ``num_training_steps``/``total_steps`` it takes and is not given: ``max_steps``)."""
    if cfg.target is None:
        if any(g.get("lr") is None for g in opt.param_groups):  # e.g. Adafactor's relative steps
            raise ConfigError(f"`{type(opt).__qualname__}` sets its own learning rate (lr: null), which the built-in "
                              f"schedule (schedule.name: {cfg.name}) cannot scale",
                              "keep its own schedule (for Adafactor: schedule: {_target_: "
                              "transformers.optimization.AdafactorSchedule}), or set optim.lr (for Adafactor: with "
                              "relative_step: false, scale_parameter: false, warmup_init: false) for the built-in one")
        return Schedule(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, max_steps)), opt)
    fn = locate(cfg.target, "schedule._target_")
    kwargs = instantiate(dict(cfg.kwargs), "schedule")
    takes = _keywords(fn)
    for name in ("num_training_steps", "total_steps"):  # transformers' get_*_schedule, OneCycleLR
        if name in takes and name not in kwargs and "epochs" not in kwargs:
            kwargs[name] = max_steps
    inner = _call(fn, "schedule", cfg.target, opt, kwargs)
    if not callable(getattr(inner, "step", None)) or _required_args(inner.step):
        need = _required_args(inner.step) if callable(getattr(inner, "step", None)) else []
        raise ConfigError(f"schedule: `{cfg.target}` returned a {type(inner).__name__} whose step() "
                          + (f"needs an argument ({', '.join(need)})" if need else "is missing")
                          + ": trainguard calls step() with none, once per optimizer step",
                          "use a schedule that follows the step count (ReduceLROnPlateau, which needs a metric, "
                          "can be driven from a trainguard.Hook at EVAL_END instead)")
    sched = Schedule(inner, opt)
    if not (callable(getattr(inner, "state_dict", None)) and callable(getattr(inner, "load_state_dict", None))):
        sched.notes.append(f"schedule `{cfg.target}` has no state_dict()/load_state_dict(): a resumed run "
                           "restarts it from its first step (not an exact resume)")
    return sched


class Schedule:
    """Any learning-rate scheduler, stepped once per optimizer step, with the guards' LR scale on top.

    The scale (lowered on rollback) multiplies the LRs the scheduler sets. The scheduler always
    sees its own, unscaled LRs in the parameter groups when it steps, so chained schedulers
    (which update the groups' ``lr``) and closed-form ones (LambdaLR, OneCycleLR) both hold.
    Unscaled, ``step()`` is the scheduler's own and nothing more.
    """

    def __init__(self, inner: Any, optimizer: torch.optim.Optimizer):
        self.inner, self.optimizer = inner, optimizer
        self.lr_scale = 1.0
        self._unscaled: list | None = None  # the scheduler's own LRs, while scaled
        self.notes: list[str] = []
        _NOTES[self] = self.notes

    def __getattr__(self, name: str) -> Any:  # the scheduler's own API (get_last_lr, last_epoch) for hooks
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def step(self) -> None:
        if self._unscaled is None:
            self.inner.step()
            return
        for group, lr in zip(self.optimizer.param_groups, self._unscaled):
            group["lr"] = lr
        self._unscaled = None
        self.inner.step()
        self.set_lr_scale(self.lr_scale)

    def set_lr_scale(self, scale: float) -> None:
        """Multiply the scheduler's LRs by ``scale`` from now on (1.0: its own LRs again)."""
        groups = self.optimizer.param_groups
        own = self._unscaled if self._unscaled is not None else [g["lr"] for g in groups]
        self.lr_scale = scale
        self._unscaled = None if scale == 1.0 else own
        for group, lr in zip(groups, own):
            group["lr"] = lr * scale if scale != 1.0 and lr is not None else lr

    def state_dict(self) -> dict:
        inner = self.inner.state_dict() if callable(getattr(self.inner, "state_dict", None)) else None
        return {"schedule": inner, "lr_scale": self.lr_scale, "unscaled_lrs": self._unscaled}

    def load_state_dict(self, state: dict) -> None:
        if not ("schedule" in state and "lr_scale" in state):  # a checkpoint from before Schedule: the LambdaLR's own
            state = {"schedule": state, "lr_scale": 1.0, "unscaled_lrs": None}
        if state["schedule"] is not None and callable(getattr(self.inner, "load_state_dict", None)):
            self.inner.load_state_dict(state["schedule"])
        self.lr_scale, self._unscaled = state["lr_scale"], state["unscaled_lrs"]


def materialize_state(opt: torch.optim.Optimizer, host: Callable[[], Any] = contextlib.nullcontext,
                      verify: bool = False) -> bool:
    """Allocate the optimizer's state now, as its first step would, changing nothing else.

    The first ``step()`` allocates AdamW's moments (2x the parameters) or SGD's momentum. Done at
    start, an out-of-memory there is a clear setup error instead of a failure halfway through an
    update; the memory search then measures the real optimizer phase. Runs one step at lr 0 and
    weight decay 0 on zero gradients (a bitwise no-op on the parameters for AdamW and SGD), then
    zeroes the state so it equals a fresh one. Any other optimizer may move the weights even so
    (one that ignores ``lr``, or decays under another name): they are copied to the host first
    (inside ``host()``, which keeps the copy off a simulated device's count) and put back. With
    ``verify``, whether its zeroed state takes the same next steps as a fresh one is tried on a
    stand-in; where not, the state is dropped (allocated by the first step, as without this
    function) and :func:`notes` says so. Returns False when there was state already (a resumed run).
    """
    if opt.state:
        return False
    known = type(opt) in KNOWN_EXACT and not opt.defaults.get("dampening")  # SGD's first step copies the gradient
    params = [p for g in opt.param_groups for p in g["params"]]
    if not known:
        with host(), torch.no_grad():
            weights = [_local(p).detach().to("cpu", copy=True) for p in params]
    try:
        _zero_step(opt, params)
    finally:
        if not known:
            with host(), torch.no_grad():
                for p, w in zip(params, weights):
                    _local(p).copy_(w)
            del weights
    why = _why_not_fresh(opt) if verify and not known else None
    if why is not None:
        _LAZY.add(opt)
        _NOTES.setdefault(opt, []).append(
            f"the state of `{type(opt).__module__}.{type(opt).__qualname__}` is not allocated ahead ({why}): its "
            "first step allocates it, and an out of memory there stops the run instead of being a setup error")
    reset_state(opt)
    return True


def _zero_step(opt: torch.optim.Optimizer, params: list) -> None:
    """One step on zero gradients at lr 0 and weight decay 0 (where the groups have those keys);
    every group's values (all of them: schedule-free AdamW, Prodigy and D-Adaptation keep step
    counts there) and the gradients are put back."""
    saved = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            g.update(dict.fromkeys([k for k in ("lr", "weight_decay") if k in g], 0.0))
        with torch.no_grad():
            opt.step()
    finally:
        for g, values in zip(opt.param_groups, saved):
            for k in [k for k in g if k != "params" and k not in values]:  # keys the step added
                del g[k]
            g.update(values)
        for p, g in zip(params, grads):
            p.grad = g


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's (DTensor's) local shard; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _why_not_fresh(opt: torch.optim.Optimizer) -> str | None:
    """None if an optimizer of this class and these group settings, its state allocated by
    :func:`_zero_step` and zeroed by :func:`reset_state`, takes the same two steps as a fresh one,
    bitwise: tried on stand-ins (a few numbers per group, the groups' dtypes and devices, their
    dims kept to 0, 1 or 2). Else why not."""
    def make() -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(0)
        groups, ps = [], []
        for g in opt.param_groups:
            like = [_local(p) for p in g["params"][:1]]
            mine = [torch.randn((4, 3) if p.dim() >= 2 else (5,) if p.dim() else (), generator=gen)
                    .to(p.device, p.dtype).requires_grad_() for p in like]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": mine})
            ps += mine
        takes = _keywords(type(opt))
        return type(opt)(groups, **{k: v for k, v in opt.defaults.items() if k in takes}), ps

    try:
        with torch.random.fork_rng(devices=[]):
            (warm, a), (fresh, b) = make(), make()
            _zero_step(warm, a)
            with torch.no_grad():  # as materialize_state puts the weights back
                for x, y in zip(a, b):
                    x.copy_(y)
            reset_state(warm)
            gen = torch.Generator().manual_seed(1)
            for _ in range(2):
                for x, y in zip(a, b):
                    x.grad = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
                    y.grad = x.grad.clone()
                with torch.no_grad():
                    warm.step()
                    fresh.step()
            if all(torch.equal(x, y) for x, y in zip(a, b)):
                return None
            return "zeroed, it would not step as a fresh one: tried on a stand-in"
    except Exception as e:  # noqa: BLE001 - a stand-in this optimizer refuses: not known to be exact
        return f"it could not be tried on a stand-in: {type(e).__name__}: {first_line(e, 120)}"


def reset_state(opt: torch.optim.Optimizer) -> None:
    """Zero every state tensor and step count: the state of an optimizer that has taken no step.
    An optimizer whose zeroed state is not a fresh one's (see :func:`materialize_state`) loses its
    state instead."""
    if opt in _LAZY:
        opt.state.clear()
        return
    with torch.no_grad():
        for state in opt.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    v.zero_()
                elif k == "step":
                    state[k] = 0
