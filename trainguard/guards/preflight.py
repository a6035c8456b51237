"""Preflight: one real forward and backward on the first micro-batch, before the first step.

A shape mismatch, a missing forward() argument, an empty dataset, a model without a loss or with
nothing to train (:func:`nothing_to_train`) fails here in seconds (exit 1) with the module's
qualified name, both shapes and a hint, instead of an hour into the run. Embedding lookups are checked for float or out-of-range ids
(:func:`embedding_inputs`), and the loss for coupling the samples of a batch (:func:`batch_coupling`).
``trainguard diagnose`` calls :func:`preflight` too: they cannot disagree.
It leaves no trace: RNG streams, buffers and gradients are as they were.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from trainguard import distributed
from trainguard.engine.batch import slice_batch, to_device
from trainguard.engine.precision import autocast
from trainguard.errors import RunFailed, TrainguardError, first_line
from trainguard.engine.state import preserved_state
from trainguard.guards.checks import Check, require  # noqa: F401 - importable from here (run.py, diagnose)
from trainguard.guards.localize import module_trace
from trainguard.guards.lookups import embedding_inputs


def preflight(trainer, coupling: bool = True) -> list[Check]:
    """Run the checks; returns them all (the caller decides what a failure means).

    ``coupling``: also run :func:`batch_coupling` (diagnose always does; train when a step runs
    more than one micro-batch from the start, else at the first OOM split).

    A compiled model (``train.compile``) is checked eagerly first, so a model error names its
    module; then one compiled forward/backward runs, and if compiling fails the trainer falls
    back to the eager model (a ``model.compile`` warning says why): never a silent fallback.
    """
    checks: list[Check] = []
    n = trainer.micro_batch_size
    try:
        batch = trainer.data.peek(n)
        if batch.error is not None:
            raise RunFailed(*batch.error)
    except TrainguardError as e:
        return [Check("data.first_batch", "fail", e.message, e.hint)]
    if batch.bad and not batch.ids:
        first = batch.bad[0]
        return [Check("data.first_batch", "fail", f"the first {len(batch.bad)} samples all failed to load, e.g. sample {first.sample_id}: {first.reason}",
                      "fix the dataset's __getitem__ (run it on one index by hand to see the error)")]
    checks.append(Check("data.first_batch", "warn" if batch.bad else "pass",
                        f"first micro-batch: {len(batch)} samples" + (f", {len(batch.bad)} failed to load" if batch.bad else "")))
    n = len(batch)
    model = trainer.model
    nothing = nothing_to_train(model)
    if nothing is not None:
        checks.append(nothing)
        return checks
    compiled, trainer.adapter.model = trainer.adapter.model, model  # eager first: errors name the module
    try:
        while True:
            trace = module_trace(model)
            oom, unused = False, []
            try:
                micro = to_device(slice_batch(batch.data, 0, n), trainer.device)
                with preserved_state(model), trace, embedding_inputs(model, micro, trainer.adapter.fields) as lookups:
                    with autocast(trainer.device.type, trainer.precision):
                        _, loss, _ = trainer.adapter(micro)
                    loss.backward()
                    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
            except TrainguardError as e:
                checks.append(Check(e.check or "model.forward", "fail", e.message, e.hint))
                return checks
            except torch.OutOfMemoryError:
                oom = True  # handled below, once the exception (and the activations it holds) is gone
            except Exception as e:  # the model's own error: name the module and the shapes
                where = trace.explain()
                msg = f"{type(e).__name__}: {first_line(e)}"
                checks.append(Check("model.forward", "fail", f"the first forward/backward failed {where}: {msg}" if where else f"the first forward/backward failed: {msg}",
                                    "the data's shapes and the model's layer sizes disagree: fix the layer size or the data"
                                    if where else "run with --debug for the traceback"))
                return checks
            finally:
                trainer.optimizer.zero_grad(set_to_none=True)
            if not oom:
                break
            if trainer.strategy.sharded:  # the others may be inside the forward's collectives: this rank leaves the job
                from trainguard.engine.events import Event  # (guards/oom.py; diagnose has no such hook)
                from trainguard.engine.state import OutOfMemory

                trainer.state.oom = OutOfMemory(trainer.state.step + 1, n, "out of device memory in the preflight forward/backward")
                trainer.fire(Event.OUT_OF_MEMORY)
                trainer.state.oom = None
            if n == 1:
                from trainguard.guards.oom import one_sample_need
                from trainguard.memory.sizes import fmt_bytes, one_sample_does_not_fit

                limit = getattr(trainer.memory, "limit", None)
                avail = f"{fmt_bytes(limit)} available" if limit else "more than the device has"
                checks.append(Check("memory.first_step", "fail", *one_sample_does_not_fit(one_sample_need(trainer, batch), avail)))
                return checks
            checks.append(Check("memory.first_step", "warn", f"micro-batch {n} ran out of device memory in the preflight forward/backward; "
                                "step 1 will split it (guard.on_oom)", "set train.micro_batch_size: auto to start at the largest that fits"))
            n = 1  # the other checks still run, on one sample
        coupled = batch_coupling(trainer, batch, n) if coupling else None  # eager, like the step above
    finally:
        trainer.adapter.model = compiled
    checks.append(Check("model.forward", "pass", f"forward and backward ran on {n} samples; loss {loss.item():.4g}"))
    if trainer.adapter.loss_note:  # the (logits, loss) tuple rule: said once
        checks.append(Check("model.output", "pass", trainer.adapter.loss_note))
    if not torch.isfinite(loss):
        checks.append(Check("model.loss", "warn", f"the first micro-batch gives a non-finite loss ({loss.item()})",
                            "the guards will skip such steps; check the data and the loss (e.g. CTC input vs target lengths)"))
    if lookups.checked or lookups.unjudged:
        checks.append(lookups.check())
    if coupled is not None:
        checks.append(coupled)
    if isinstance(batch.data, dict):
        a = trainer.adapter
        kept = sorted(a.accepted & {a.fields.get(k, k) for k in batch.data})
        left = f"; left out: {', '.join(a.dropped)} (not named by {type(model).__name__}.forward())" if a.dropped else ""
        checks.append(Check("data.fields", "pass", f"the model gets {', '.join(kept) or 'no named field'}{left}",
                            "to pass a field, rename it to a forward() argument (or list it) in data.fields" if left else None))
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        checks.append(Check("model.gradients", "warn", f"{len(unused)} parameters get no gradient from the first batch: {', '.join(unused[:3])}{more}",
                            "unused layers cost memory, and multi-GPU (DDP) training needs to know; remove them or freeze them (requires_grad=False)"))
    if compiled is not model:
        checks.append(compile_or_fall_back(trainer, slice_batch(batch.data, 0, n)))
    return checks


def nothing_to_train(model: nn.Module) -> Check | None:
    """``model.parameters``: a fail if not one parameter element requires a gradient (no parameters,
    all frozen, or all of size 0: a width read as 0); None otherwise. A model with some frozen
    parameters (a frozen backbone and a head) is healthy. Sizes only: no host sync."""
    params = list(model.parameters())
    if any(p.requires_grad and p.numel() for p in params):
        return None
    name = type(model).__name__
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    if not params:
        what, hint = "has no parameters at all", ("return the module that holds the layers from model._target_ "
                                                    "(parameters registered as nn.Parameter or in submodules)")
    elif frozen:
        what = f"has {frozen:,} parameter elements, all frozen (requires_grad=False)" + (
            ", and its trainable parameters are of size 0" if any(p.requires_grad for p in params) else "")
        hint = "unfreeze what should train, e.g. `model.head.requires_grad_(True)` over a frozen backbone"
    else:
        what = f"has {len(params)} parameter tensors, all of size 0 (shapes {', '.join(str(tuple(p.shape)) for p in params[:3])})"
        hint = "check the model's sizes: a layer width of 0 (e.g. a size read from a config or from the data that is 0)"
    return Check("model.parameters", "fail", f"the model {name} {what}: nothing to train", hint)


class Coupling(Check):
    """``model.batch_coupling``: how the loss of a batch relates to the losses of its parts.

    ``kind``: ``sample_mean`` (a mean over samples: splitting changes nothing), ``token_mean`` (a mean
    over the label tokens: a split weights micro-batches by samples, see docs/guards.md), ``sum``
    (a sum over samples: a split scales it) or ``coupled`` (the samples meet, e.g. in-batch
    negatives); empty when not judged (``skip``). Not a dataclass field: ``diagnose --json`` keeps
    the four keys of every check."""

    def __init__(self, name: str, status: str, message: str, hint: str | None = None, kind: str = ""):
        super().__init__(name, status, message, hint)
        self.kind = kind

    def warning(self, micro_batch_size: int, grad_accum: int) -> str:
        """What the run does to such a loss with ``grad_accum`` micro-batches of ``micro_batch_size``."""
        what = {"coupled": f"each sample's loss now sees only the {micro_batch_size - 1} others of its micro-batch "
                           "(e.g. fewer in-batch negatives), so the loss and the gradient are not those of the whole batch",
                "sum": f"each micro-batch's sum is weighted by its share of the batch, so the step's loss and "
                       f"gradient are 1/{grad_accum} of the whole batch's sum"}[self.kind]
        return f"{self.message}; this step runs {grad_accum} micro-batches of {micro_batch_size}: {what}"


COUPLING_HINT = ("keep one micro-batch per step (train.micro_batch_size = train.batch_size, and a --memory-budget or card "
                 "that fits it), or make the loss a mean over samples (e.g. gather the in-batch negatives across "
                 "micro-batches yourself); a smaller train.batch_size keeps the step in one micro-batch")


def batch_coupling(trainer, batch, n: int) -> Coupling:
    """Compare the loss of the first micro-batch with the weighted mean of its two halves' losses.

    Eval mode and no grad (dropout and BatchNorm's batch statistics do not blur it), three forwards
    that together cost about two of the batch's, on the eager model; RNG and buffers left as they
    were. With one sample in the micro-batch but several per step, two samples are fetched for it.
    """
    name = "model.batch_coupling"
    if trainer.strategy.sharded:  # every sharded forward is a collective: no forwards that ranks might not all run
        return Coupling(name, "skip", "not checked under train.strategy: fsdp")
    if batch is None or batch.data is None:
        return Coupling(name, "skip", "not checked: no batch")
    n = min(n, len(batch))
    if n < 2 and trainer.data.batch_size > 1 and not trainer.data.iterable:  # (a stream's own iterator is not reopened)
        try:
            more = trainer.data.peek(2)
        except TrainguardError:
            more = None
        if more is not None and more.error is None and len(more) >= 2:
            batch, n = more, 2
    if n < 2:
        return Coupling(name, "skip", "the batch has 1 sample: nothing to split")
    model, k = trainer.model, n // 2
    training = {m: m.training for m in model.modules()}
    losses, counts = [], []
    compiled, trainer.adapter.model = trainer.adapter.model, model
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            for start, stop in ((0, n), (0, k), (k, n)):
                micro = to_device(slice_batch(batch.data, start, stop), trainer.device)
                with autocast(trainer.device.type, trainer.precision):
                    _, loss, labels = trainer.adapter(micro)
                losses.append(float(loss))
                counts.append(_label_counts(labels))
    except torch.OutOfMemoryError:
        return Coupling(name, "skip", "not checked: the no-grad forwards ran out of device memory")
    except Exception as e:  # noqa: BLE001 - a model that cannot run in eval mode is not judged here
        return Coupling(name, "skip", f"not checked: the forward in eval mode failed ({_reason(e)})")
    finally:
        trainer.adapter.model = compiled
        for m, t in training.items():
            m.training = t
    full, a, b = losses
    if not all(math.isfinite(v) for v in losses):
        return Coupling(name, "skip", f"not checked: a non-finite loss ({full:.4g} for the batch, {a:.4g} and {b:.4g} for its halves)")
    # relative; low-precision autocast, and TF32 matmuls (their kernels differ by batch size), round per batch size
    tol = 1e-4 if trainer.precision == "fp32" and not getattr(trainer.cfg, "tf32", False) else 2e-2
    close = lambda v: abs(full - v) <= tol * max(abs(full), 1e-3)  # noqa: E731
    parts = f"loss {full:.4g} on {n} samples, {a:.4g} and {b:.4g} on its halves"
    if close((k * a + (n - k) * b) / n):
        return Coupling(name, "pass", f"the loss is a mean over samples ({parts}): splitting the batch leaves it unchanged", kind="sample_mean")
    for c_full, c_a, c_b in zip(*counts):
        if c_a + c_b == c_full and c_full and close((c_a * a + c_b * b) / c_full):
            return Coupling(name, "pass", f"the loss is a mean over label tokens ({parts}, weighted by their {c_a} and {c_b} "
                            "tokens): no sample sees another, but a split weights micro-batches by samples, so the tokens "
                            "of shorter (padded) samples weigh a little differently", kind="token_mean")
    if close(a + b):
        return Coupling(name, "warn", f"the loss is a sum over samples ({parts})", COUPLING_HINT, kind="sum")
    return Coupling(name, "warn", f"the loss couples the samples of a batch ({parts}; their weighted mean is "
                    f"{(k * a + (n - k) * b) / n:.4g}): a contrastive loss or in-batch negatives", COUPLING_HINT, kind="coupled")


def _label_counts(labels) -> list[int]:
    """Label tokens that count (ids >= 0; -100 and -1 are ignored): as given, and shifted by one
    position (a causal LM predicts labels[:, 1:]). Empty when the labels are not token ids."""
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.is_floating_point():
        return []
    return [int((labels >= 0).sum()), int((labels[:, 1:] >= 0).sum())]




def compile_or_fall_back(trainer, micro_batch) -> Check:
    """One forward/backward through the compiled model; if compiling fails, the trainer goes on
    with the eager model (the reason is in the check, and train logs it)."""
    if getattr(trainer.memory, "kind", None) == "simulated":
        trainer.adapter.model = trainer.model
        return Check("model.compile", "skip", "torch.compile is not used under a simulated --memory-budget (dynamo does not "
                     "trace through the memory tracker): the run is eager", "drop --memory-budget on a CPU to run compiled")
    start = time.perf_counter()
    blocks = trainer.adapter.model if isinstance(trainer.adapter.model, distributed.CompiledBlocks) else None
    try:
        with preserved_state(trainer.model):
            micro = to_device(micro_batch, trainer.device)
            with autocast(trainer.device.type, trainer.precision):
                _, loss, _ = trainer.adapter(micro)
            loss.backward()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # the eager step ran: this is the compiler's failure, not the model's
        if blocks is not None:  # sharded, in the backward: the other ranks wait in its collectives
            raise RunFailed(f"train.compile with train.strategy: fsdp: the compiled backward failed "
                            f"({_reason(e)})", "set train.compile: false") from e
        return _fall_back(trainer, _reason(e))
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
    if blocks is not None:  # a block that failed to compile ran eagerly on that rank: all ranks agree to
        reasons = distributed.gather_objects(None if blocks.failed is None else _reason(blocks.failed))  # run one model
        if any(reasons):
            return _fall_back(trainer, "; ".join(f"rank {r}: {why}" for r, why in enumerate(reasons) if why))
    return Check("model.compile", "pass", f"torch.compile: the model compiled and ran one forward/backward "
                 f"({time.perf_counter() - start:.1f} s)" + (", block by block (train.strategy: fsdp)" if blocks is not None else ""))


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e, 160)}"


def _fall_back(trainer, why: str) -> Check:
    trainer.adapter.model = trainer.model
    return Check("model.compile", "warn", f"torch.compile failed ({why}); training runs the eager model",
                 "set train.compile: false to skip the attempt; "
                 "the reason above is torch's (a graph break, an op without a fake/meta kernel, ...)")
