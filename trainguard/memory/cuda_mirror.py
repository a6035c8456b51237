"""CUDA's allocations mirrored on CPU fake tensors: torch-function modes for the memory forecast.

fp16/bf16 for a CUDA card is not run through CPU autocast, whose cast lists differ (it keeps
layer_norm and softmax in half precision where CUDA uses fp32): :class:`CudaAutocast` applies
CUDA's lists at the function level, above autograd, so the casts and what autograd saves are those
of a real CUDA run, including autocast's cache of the half-precision weights. :class:`CudaAttention`
stands in for the fused attention kernels, :class:`ShapeOnlyKernels` for operators fake tensors
cannot run. :func:`cuda_modes` makes a fresh set per step; :func:`modes_in_recompute` keeps them on
inside a checkpointed block's recompute. :mod:`~trainguard.memory.predict` runs its steps under them.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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


def cuda_modes(cuda: bool, low: torch.dtype | None) -> list:
    """The modes that make a CPU step allocate as a CUDA one would (fresh ones per call)."""
    return [ShapeOnlyKernels()] + ([CudaAttention()] if cuda else []) + ([CudaAutocast(low)] if low is not None else [])


@contextlib.contextmanager
def modes_in_recompute(make_modes: Callable[[], list]):
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
