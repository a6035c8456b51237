"""Predicting a step's memory without running it: the real model code on fake tensors.

Under ``FakeTensorMode`` every operator computes only shapes and dtypes, so a forward, backward
and optimizer step costs a fraction of a real one and needs no device; the
:class:`~trainguard.memory.tracker.TensorMemory` mode counts the bytes as it would for real
tensors. The model's parameters are replaced by fake ones of the same shapes (``functional_call``),
so the model itself can live on ``meta`` (``trainguard autoconfig --profile`` never allocates it).
Model code that reads a tensor's value (``.item()``, ``nonzero``) cannot run on fake tensors:
:func:`measured_step` runs that step for real on the CPU instead, with the same mirrors and counter.

For a CUDA card the step runs under :mod:`~trainguard.memory.cuda_mirror`'s modes: CUDA autocast's
casts (CPU autocast's lists differ), fused attention and shape-only stand-ins for operators fake
tensors cannot run; :class:`CudaAutocast`, :class:`CudaAttention` and :class:`ShapeOnlyKernels`
are importable from here too.

A card also has costs no tensor shows: the CUDA context (300-400 MB with lazy module loading,
outside ``memory_allocated``), cuBLAS workspaces, the allocator's rounding and fragmentation.
:func:`fixed_costs` adds them for a profile's card; docs/memory.md gives the figures and errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from trainguard.engine.batch import ModelAdapter
from trainguard.engine.defer import KeptBuffers, norm_statistics
from trainguard.engine.optim import materialize_state
from trainguard.memory.cuda_mirror import CudaAttention, CudaAutocast, ShapeOnlyKernels  # noqa: F401 - importable from here
from trainguard.memory.cuda_mirror import cuda_modes, modes_in_recompute
from trainguard.memory.tracker import TensorMemory, rounded
from trainguard.memory.trial import Trial, worst_case_batch

MiB = 2**20
# Measured on an H100 80GB HBM3 (torch 2.11.0+cu130, driver 580, 2026-11-24; scripts/memory_accuracy.py --fixed):
CUDA_CONTEXT = {"hopper": 530 * MiB, "other": 350 * MiB}  # device memory used beside the allocator's, after init
# cuBLAS keeps one workspace per thread that multiplies matrices, allocated through the caching allocator
# (so inside max_memory_allocated): the forward's thread and the autograd engine's device thread, each
# 32 MiB on Hopper (torch's default ":4096:2:16:8", about 8 MiB, before it), plus 1 MiB for cuBLASLt.
CUBLAS_PER_THREAD = {"hopper": 33 * MiB, "other": 9 * MiB}
# What a real step on the card allocated beyond its tensors, the workspaces and the forecast's per-sample
# slope: 42-55 MiB for four of the example models (docs/memory.md), not attributed to one library yet.
UNATTRIBUTED = 48 * MiB


def fixed_costs(profile) -> dict[str, int]:
    """Device memory a CUDA card spends beside the tensors (zero for CPU/MPS profiles)."""
    if profile.device != "cuda":
        return {}
    arch = "hopper" if (profile.compute_capability or (0, 0)) >= (9, 0) else "other"
    return {"cuda_context": CUDA_CONTEXT[arch], "cublas_workspace": 2 * CUBLAS_PER_THREAD[arch],
            "unattributed": UNATTRIBUTED}


class _Call(nn.Module):
    """Lets ``functional_call`` swap the parameters of the model an adapter calls. ``step`` runs
    inside the swap, the backward included: a checkpointed block's recompute in the backward must
    see the same (fake) parameters as its forward did."""

    def __init__(self, adapter: ModelAdapter, step: Callable[[Any], None]):
        super().__init__()
        self.inner = adapter.model
        self.step = step

    def forward(self, data):
        return self.step(data)


def _step_phases(adapter: ModelAdapter, tracker: TensorMemory, phases: dict, extra: int, low, cuda: bool,
                 around: Callable[[Callable[[Any], None], Any], None], data: Any, opt: torch.optim.Optimizer) -> None:
    """Forward, backward and optimizer step on ``data``, each phase's peak into ``phases``.
    ``around(step, data)`` runs the forward and backward (inside a parameter swap, or directly).
    The engine's copies of the BatchNorm statistics (:class:`~trainguard.engine.defer.KeptBuffers`)
    are added to ``extra``: the real step holds them beside the model."""
    extra += KeptBuffers.COPIES * sum(rounded(t.nbytes) for t in norm_statistics(adapter.model))

    def forward_backward(data) -> None:
        modes = cuda_modes(cuda, low)
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            _, loss, _ = adapter(data)
        if low is not None:
            modes[-1].cache.clear()  # autocast frees its weight casts when the region ends
        phases["forward"] = tracker.peak + extra
        tracker.reset_peak()
        with modes_in_recompute(lambda: cuda_modes(cuda, low)):
            loss.backward()
        del loss
        phases["backward"] = tracker.peak + extra

    tracker.reset_peak()
    around(forward_backward, data)
    tracker.reset_peak()
    opt.step()
    phases["optimizer"] = tracker.peak + extra


def _optimizer(make_optimizer: Callable[[list], torch.optim.Optimizer], params: list[torch.Tensor],
               accumulate: bool) -> torch.optim.Optimizer:
    """The optimizer over the trainable ``params``, its state allocated; with ``accumulate``, their
    gradients exist already (every micro-batch after the first)."""
    trainable = [p for p in params if p.requires_grad]
    opt = make_optimizer(trainable)
    materialize_state(opt)
    if accumulate:
        for p in trainable:
            p.grad = torch.zeros_like(p)
    return opt


def _fake(t: torch.Tensor, grad: bool, rows: int | None = None) -> torch.Tensor:
    """Inside ``FakeTensorMode``: a fake tensor shaped as ``t`` (with ``rows`` rows)."""
    shape = t.shape if rows is None else (rows, *t.shape[1:])
    return torch.empty(shape, dtype=t.dtype, device="cpu").requires_grad_(grad)


def fake_step(model: nn.Module, loss_fn, fields: dict, make_optimizer: Callable[[list], torch.optim.Optimizer],
              item: Any, m: int, precision: str, extra: int = 0, accumulate: bool = True, cuda: bool = False) -> Trial:
    """Peak bytes of each phase of one training step at micro-batch ``m`` (``item`` repeated),
    as a CUDA device would count them; ``extra`` bytes are added to each phase (fixed costs).
    ``accumulate``: gradients exist before the backward (every micro-batch after the first).
    ``cuda``: attention as a CUDA card's fused kernels store it (see :class:`CudaAttention`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # the supported way to run without data

    one = worst_case_batch(item, 1)  # real shapes of one sample; the fake batch gets m rows without the data
    tracker = TensorMemory(None)
    adapter = ModelAdapter(model, loss_fn, fields)
    phases: dict[str, int] = {}
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    holder: dict[str, Callable] = {}
    call = _Call(adapter, lambda data: holder["step"](data))
    with quiet_fake_tensor_logs(), FakeTensorMode(allow_non_fake_inputs=False):
        params = {f"inner.{n}": _fake(p, p.requires_grad) for n, p in model.named_parameters()}
        buffers = {f"inner.{n}": _fake(b, False) for n, b in model.named_buffers()}
        data = _fake_batch(one, _fake, m)
        with tracker:
            tracker.track(list(params.values()), list(buffers.values()), data)
            opt = _optimizer(make_optimizer, list(params.values()), accumulate)

            def swapped(step, data):  # the model's own parameters replaced by the fake ones
                holder["step"] = step
                torch.func.functional_call(call, {**params, **buffers}, (data,))

            _step_phases(adapter, tracker, phases, extra, low, cuda, swapped, data, opt)
    return Trial(m, False, phases)


def measured_step(model: nn.Module, loss_fn, fields: dict, make_optimizer: Callable[[list], torch.optim.Optimizer],
                  item: Any, m: int, precision: str, extra: int = 0, accumulate: bool = True, cuda: bool = False,
                  limit: int | None = None, seed: int = 0) -> Trial:
    """:func:`fake_step` on real CPU tensors, for model code that fake tensors cannot run (it reads
    a tensor's value: ``.item()``, ``if labels.max() >= vocab``, a router's ``nonzero``): the worst-case
    sample's real values repeated ``m`` times, through copies of the model's weights (the model is
    left as it was, RNG streams included), with the same CUDA mirrors (autocast's casts, fused
    attention, CTC's lattice) and the same counter. ``limit``: tensor bytes past which the step stops
    as an OOM (``Trial.oom``), as under ``--memory-budget``, so a step larger than the card is never
    computed to its end. ``seed``: the RNG the step draws from (dropout, LayerDrop's coin: random
    control flow decides what runs, so each step starts from the same state). Costs a real step's
    compute on the CPU."""
    tracker = TensorMemory(limit, name="forecast budget")
    adapter = ModelAdapter(model, loss_fn, fields)
    phases: dict[str, int] = {}
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    holder: dict[str, Callable] = {}
    call = _Call(adapter, lambda data: holder["step"](data))
    params = {f"inner.{n}": p.detach().to("cpu", copy=True).requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    buffers = {f"inner.{n}": b.detach().to("cpu", copy=True) for n, b in model.named_buffers()}
    data = worst_case_batch(item, m)
    try:
        with torch.random.fork_rng(devices=[]), tracker:
            torch.manual_seed(seed)
            tracker.track(list(params.values()), list(buffers.values()), data)
            opt = _optimizer(make_optimizer, list(params.values()), accumulate)

            def swapped(step, data):
                holder["step"] = step
                torch.func.functional_call(call, {**params, **buffers}, (data,))

            _step_phases(adapter, tracker, phases, extra, low, cuda, swapped, data, opt)
    except torch.OutOfMemoryError:
        return Trial(m, True, {})
    return Trial(m, False, phases)


@contextlib.contextmanager
def quiet_fake_tensor_logs():
    """torch logs the traceback of an operator that fails under fake tensors (logger
    ``torch._subclasses.fake_tensor``, "failed while attempting to run meta for ...") before
    raising it; the forecast reports the error itself, so the log stays off while it runs."""
    import logging

    log = logging.getLogger("torch._subclasses.fake_tensor")
    was, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = was


def why_not_fake(e: BaseException) -> str:
    """Why the fake-tensor step failed, for a user: what the model did, the exception, and the
    innermost line of the model's own code (not torch's) that was running."""
    import traceback

    name = type(e).__name__
    if name in ("DataDependentOutputException", "GuardOnDataDependentSymNode"):
        what = "the model reads a tensor's value (.item(), a Python `if` on a tensor)"
    elif name == "DynamicOutputShapeException":
        what = "an output shaped by tensor values (nonzero, masked_select, unique)"
    elif name == "UnsupportedOperatorException":
        what = "an operator without a shape-only kernel"
    else:
        what = "an operator fake tensors cannot run"
    torch_dir = str(Path(torch.__file__).parent)
    own = str(Path(__file__).parent.parent)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith((torch_dir, own))]
    where = f" at {_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{what}{where}: {name}" + (f": {detail}" if detail and detail not in what else "")


def _short(path: str) -> str:
    """A source path as a user knows it: from its package (``transformers/models/...``) on."""
    parts = Path(path).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return str(Path(*parts[parts.index(marker) + 1:]))
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def fake_sharded_step(model: nn.Module, loss_fn, fields: dict, make_optimizer: Callable[[list], torch.optim.Optimizer],
                      item: Any, m: int, precision: str, world: int, extra: int = 0, accumulate: bool = True,
                      cuda: bool = False) -> Trial:
    """:func:`fake_step` for ``train.strategy: fsdp`` on ``world`` ranks: one rank's peaks, with
    FSDP2 itself sharding a copy of ``model`` as train does (``distributed.shard``) over a fake
    process group (:func:`trainguard.distributed.fake_mesh`). The counter sees FSDP2 gather a
    block's parameters and free them again (``UntypedStorage.resize_``), and the shards of the
    parameters, gradients and optimizer state (DTensors, counted by their local tensors).

    ``cuda``: on a card FSDP2 gathers the next block while the current one computes (its streams
    overlap them; on CPU it runs them in turn), and the backward's reduce-scatter of one block
    overlaps the next block's gradients: one block's parameters more are added to the forward,
    and a block's parameters and gradients to the backward."""
    import copy

    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainguard import distributed

    shell = copy.deepcopy(model)  # sharding changes the module: the forecast keeps the caller's whole
    block = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in distributed.blocks(shell)), default=0)
    overlap = {"forward": block, "backward": 2 * block} if cuda else {}
    one = worst_case_batch(item, 1)
    tracker = TensorMemory(None)
    adapter = ModelAdapter(shell, loss_fn, fields)
    phases: dict[str, int] = {}
    low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    with quiet_fake_tensor_logs(), distributed.fake_mesh(world) as mesh:
        distributed.shard(shell, torch.device("cpu"), mesh=mesh)
        with FakeTensorMode(allow_non_fake_inputs=True):  # FSDP2 keeps a few real (meta) tensors of its own
            shell.to_empty(device="cpu")
            data = _fake_batch(one, _fake, m)
            with tracker:
                tracker.track(shell, data)
                opt = _optimizer(make_optimizer, list(shell.parameters()), accumulate)
                _step_phases(adapter, tracker, phases, extra, low, cuda, lambda step, data: step(data), data, opt)
    for phase, n in overlap.items():
        phases[phase] += n
    return Trial(m, False, phases)


def _fake_batch(x: Any, fake, m: int) -> Any:
    """A collated one-sample batch as a fake batch of ``m`` samples."""
    if isinstance(x, torch.Tensor):
        return fake(x, False, m)
    if isinstance(x, Mapping):
        return {k: _fake_batch(v, fake, m) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_fake_batch(v, fake, m) for v in x)
    if isinstance(x, list):  # strings and other per-sample values stay a list, one per sample
        return x[:1] * m
    return x


def optimizer_like(opt: torch.optim.Optimizer) -> Callable[[list], torch.optim.Optimizer]:
    """A factory for an optimizer of the same class and settings over other parameters."""
    import inspect

    takes = inspect.signature(type(opt).__init__).parameters  # defaults may hold more than __init__ takes
    return lambda params: type(opt)(params, **{k: v for k, v in opt.defaults.items() if k in takes})


def predict_trainer(trainer, item, m: int) -> Trial:
    """:func:`fake_step` for the model, loss, fields, optimizer and precision of a built trainer."""
    a = trainer.adapter
    return fake_step(trainer.model, a.loss_fn, a.fields, optimizer_like(trainer.optimizer), item, m, trainer.precision,
                     cuda=trainer.device.type == "cuda")
