"""Predicting a step's memory without running it: the real model code on fake tensors.

Under ``FakeTensorMode`` every operator computes only shapes and dtypes, so a forward, backward
and optimizer step costs a fraction of a real one and needs no device; the
:class:`~trainguard.memory.tracker.TensorMemory` mode counts the bytes as it would for real
tensors. The model's parameters are replaced by fake ones of the same shapes (``functional_call``),
so the model itself can live on ``meta`` (``trainguard autoconfig --profile`` never allocates it).
Model code that reads a tensor's value (``.item()``, ``nonzero``) cannot run on fake tensors:
:func:`measured_step` runs that step for real on the CPU instead, with the same mirrors and counter.

fp16/bf16 for a CUDA card is not run through CPU autocast, whose cast lists differ (it keeps
layer_norm and softmax in half precision where CUDA uses fp32): :class:`CudaAutocast` applies
CUDA's lists at the function level, above autograd, so the casts and what autograd saves are those
of a real CUDA run, including autocast's cache of the half-precision weights.

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
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from trainguard.engine.batch import ModelAdapter
from trainguard.engine.optim import materialize_state
from trainguard.memory.tracker import TensorMemory
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


# ---- CUDA autocast, mirrored at the function level ----------------------------------------------
_LOWER = {F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
          F.conv_transpose3d, F.prelu, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm,
          torch.mv, torch.addmm, torch.addmv, torch.addbmm, torch.baddbmm, torch.einsum, torch.chain_matmul,
          torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.mm,
          torch.Tensor.bmm, torch.Tensor.addmm, torch.Tensor.baddbmm,
          # recurrent layers (nn.GRU/LSTM/RNN call these; cuDNN's RNN under autocast casts input and weights)
          torch.gru, torch.lstm, torch.rnn_tanh, torch.rnn_relu, torch.gru_cell, torch.lstm_cell,
          torch.rnn_tanh_cell, torch.rnn_relu_cell}
_FP32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.softmin, F.cross_entropy, F.nll_loss,
         F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy_with_logits,
         F.kl_div, F.poisson_nll_loss, F.ctc_loss, F.softplus, F.cosine_similarity, F.normalize,
         torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax,
         torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow,
         torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.cumsum, torch.Tensor.cumsum,
         torch.logsumexp, torch.Tensor.logsumexp, torch.norm, torch.Tensor.norm, torch.cdist}


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's cast policy for ``dtype``, applied to torch functions (so autograd sees the
    casts). Functions on neither list run in their inputs' dtype, as under autocast. Limit: a
    Python-level composite (``F.multi_head_attention_forward``) runs as a whole in its inputs'
    dtype, where CUDA would cast the projections inside it.

    CUDA autocast's flag is set while the mode is on, as under a real ``torch.autocast("cuda")``:
    modules that look at it (``nn.GRU`` refuses a half input beside float weights unless autocast
    is on) behave as on the card. It changes nothing else here: the fake tensors are CPU tensors."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, torch.Tensor] = {}
        self._flag: list[bool] = []

    def __enter__(self):
        self._flag.append(torch.is_autocast_enabled("cuda"))
        torch.set_autocast_enabled("cuda", True)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.set_autocast_enabled("cuda", self._flag.pop())
        return super().__exit__(*exc)

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            if x.is_leaf and x.requires_grad:  # autocast caches the casts of weights for the region
                key = id(x)
                if key not in self.cache:
                    self.cache[key] = x.to(dtype)
                return self.cache[key]
            return x.to(dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, dtype) for v in x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER or func in _FP32:
            dtype = self.dtype if func in _LOWER else torch.float32
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
            return func(*args, **kwargs)
        return func(*args, **kwargs)


class _FusedAttention(torch.autograd.Function):
    """What a GPU's flash / memory-efficient attention allocates, without computing it: the output
    and a float32 log-sum-exp per query row are saved for the backward (O(T), not the O(T^2)
    attention matrix a CPU kernel stores); the backward adds a float32 accumulator for dq."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_zeros((*q.shape[:-1], v.shape[-1]))  # zeros, not empty: real steps (measured_step) read it
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq_accum = q.new_empty(q.shape, dtype=torch.float32)  # noqa: F841 - live while the grads are made
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class CudaAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as a CUDA card runs it (a fused kernel), for the forecast."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (args[i] if i < len(args) else kwargs[name] for i, name in enumerate(("query", "key", "value")))
            return _FusedAttention.apply(q, k, v)
        return func(*args, **kwargs)


class _CTCLoss(torch.autograd.Function):
    """What ``F.ctc_loss`` allocates, without computing it (its output shape depends on the length
    values, which fake tensors do not have). The kernel saves the float alphas (B, T, 2S+1) and the
    per-sample losses; its backward adds the betas and a gradient shaped as the log-probs. S is the
    targets' padded width (or, concatenated, their mean length): the worst case."""

    @staticmethod
    def forward(ctx, log_probs, targets, reduction: str):
        t, b = log_probs.shape[0], (log_probs.shape[1] if log_probs.dim() == 3 else 1)
        s = targets.shape[-1] if targets.dim() == 2 else max(1, targets.numel() // b)
        ctx.lattice = (b, t, 2 * s + 1)
        alpha = log_probs.new_empty(ctx.lattice)
        nll = log_probs.new_zeros((b,))  # zeros: a defined loss where measured_step runs this on real tensors
        ctx.save_for_backward(log_probs, alpha, nll)
        return nll.clone() if reduction == "none" else nll.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        log_probs, alpha, nll = ctx.saved_tensors
        beta = log_probs.new_empty(ctx.lattice)  # noqa: F841 - live while the gradient is made
        return torch.zeros_like(log_probs), None, None


class _GroupedMM(torch.autograd.Function):
    """What ``F.grouped_mm`` (the experts' matmul of MoE models) allocates, without computing it:
    torch's shape-only kernel for it accepts bf16 inputs only, where a card's fp16/fp32 step has
    others. The output as torch shapes it (2-D tokens sorted by expert times 3-D experts' weights:
    (tokens, N); 2-D by 2-D grouped along K: (groups, M, N); 3-D by 3-D: batched), the inputs
    saved for the backward, and a gradient shaped as each input."""

    @staticmethod
    def forward(ctx, a, b, groups: int, out_dtype):
        if a.dim() == 2 and b.dim() == 2:
            shape = (groups, a.shape[0], b.shape[-1])
        elif a.dim() == 2:
            shape = (a.shape[0], b.shape[-1])
        else:
            shape = (*a.shape[:-1], b.shape[-1])
        ctx.save_for_backward(a, b)
        return a.new_zeros(shape, dtype=out_dtype or a.dtype)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return torch.zeros_like(a), torch.zeros_like(b), None, None


_GROUPED_MM = {f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f is not None}


class ShapeOnlyKernels(TorchFunctionMode):
    """Operators that fake tensors cannot run, replaced for the forecast by what they allocate:
    :class:`_CTCLoss` (an output shaped by the lengths' values) and :class:`_GroupedMM` (a
    shape-only kernel for bf16 only)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.ctc_loss:
            names = ("log_probs", "targets", "input_lengths", "target_lengths", "blank", "reduction")
            bound = {**dict(zip(names, args)), **kwargs}
            return _CTCLoss.apply(bound["log_probs"], bound["targets"], bound.get("reduction", "mean"))
        if func in _GROUPED_MM:
            bound = {**dict(zip(("mat_a", "mat_b", "offs", "bias", "out_dtype"), args)), **kwargs}
            if bound.get("bias") is None:  # (with a bias, torch's own kernel runs)
                offs = bound.get("offs")
                return _GroupedMM.apply(bound["mat_a"], bound["mat_b"], 1 if offs is None else offs.shape[0],
                                        bound.get("out_dtype"))
        return func(*args, **kwargs)


# ---- the fake step ---------------------------------------------------------------------------------
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


def _cuda_modes(cuda: bool, low: torch.dtype | None) -> list:
    """The modes that make a CPU step allocate as a CUDA one would (fresh ones per call)."""
    return [ShapeOnlyKernels()] + ([CudaAttention()] if cuda else []) + ([CudaAutocast(low)] if low is not None else [])


def _step_phases(adapter: ModelAdapter, tracker: TensorMemory, phases: dict, extra: int, low, cuda: bool,
                 around: Callable[[Callable[[Any], None], Any], None], data: Any, opt: torch.optim.Optimizer) -> None:
    """Forward, backward and optimizer step on ``data``, each phase's peak into ``phases``.
    ``around(step, data)`` runs the forward and backward (inside a parameter swap, or directly)."""

    def forward_backward(data) -> None:
        modes = _cuda_modes(cuda, low)
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            _, loss, _ = adapter(data)
        if low is not None:
            modes[-1].cache.clear()  # autocast frees its weight casts when the region ends
        phases["forward"] = tracker.peak + extra
        tracker.reset_peak()
        with _modes_in_recompute(lambda: _cuda_modes(cuda, low)):
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


@contextlib.contextmanager
def _modes_in_recompute(make_modes: Callable[[], list]):
    """Checkpointed blocks (``torch.utils.checkpoint``) run their forward again inside the backward.
    Real autocast is re-entered there by checkpoint itself, but the autograd engine runs Python
    code with an empty torch-function mode stack, so the modes standing in for CUDA (autocast's
    casts, fused attention) are lost. While the backward runs, the outermost module forward
    entered with no mode on the stack gets fresh ones, closed when that forward returns."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from torch.overrides import _get_current_function_mode_stack

    open_: list[tuple[nn.Module, list]] = []

    def enter(module, args):
        if not _get_current_function_mode_stack():
            modes = make_modes()
            for mode in modes:
                mode.__enter__()
            open_.append((module, modes))

    def leave(module, args, out):
        if open_ and open_[-1][0] is module:
            for mode in reversed(open_.pop()[1]):
                mode.__exit__(None, None, None)

    hooks = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # early stop leaves by an exception
            yield
    finally:
        for h in hooks:
            h.remove()
        while open_:  # a forward that raised: its modes are gone with the engine's thread state
            open_.pop()


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
