"""Preflight: one real forward and backward on the first micro-batch, before the first step.

A shape mismatch, a missing forward() argument, an empty dataset or a model without a loss
fails here in seconds (exit 1) with the module's qualified name, both shapes and a hint,
instead of an hour into the run. ``trainguard diagnose`` calls :func:`preflight` too: they cannot disagree.
It leaves no trace: RNG streams, buffers and gradients are as they were.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from trainguard import distributed
from trainguard.engine.batch import slice_batch, to_device
from trainguard.engine.precision import autocast
from trainguard.errors import RunFailed, TrainguardError, first_line
from trainguard.guards.localize import module_name, module_trace, preserved_state


@dataclass
class Check:
    """One preflight result, in the shape `diagnose --json` reports."""

    name: str
    status: str          # pass | warn | fail | skip
    message: str
    hint: str | None = None


def preflight(trainer) -> list[Check]:
    """Run the checks; returns them all (the caller decides what a failure means).

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
    compiled, trainer.adapter.model = trainer.adapter.model, model  # eager first: errors name the module
    try:
        while True:
            trace = module_trace(model)
            oom, unused = False, []
            try:
                with preserved_state(model), trace, embedding_inputs(model):
                    micro = to_device(slice_batch(batch.data, 0, n), trainer.device)
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
            if trainer.sharded:  # the others may be inside the forward's collectives: this rank leaves the job
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
    finally:
        trainer.adapter.model = compiled
    checks.append(Check("model.forward", "pass", f"forward and backward ran on {n} samples; loss {loss.item():.4g}"))
    if not torch.isfinite(loss):
        checks.append(Check("model.loss", "warn", f"the first micro-batch gives a non-finite loss ({loss.item()})",
                            "the guards will skip such steps; check the data and the loss (e.g. CTC input vs target lengths)"))
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


@contextlib.contextmanager
def embedding_inputs(model: nn.Module):
    """Check what reaches each ``nn.Embedding`` during a forward: integer indices within its rows.

    Float indices (token ids saved as floats) and ids past the vocabulary are data errors that
    torch reports obscurely (on CUDA, an out-of-range id is a device-side assert that kills the
    process); here they name the layer, the dtype or the offending id.
    """
    def check(mod, args, name):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        layer = f"Embedding `{module_name(name)}` ({mod.num_embeddings} rows)"
        if x.is_floating_point() or x.is_complex():
            raise RunFailed(f"{layer} receives {str(x.dtype).replace('torch.', '')} indices; embedding indices must be integers",
                            "cast the token ids to int in the dataset (ids read back as floats, e.g. through pandas or JSON with NaN)",
                            check="data.indices")
        if x.numel():
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= mod.num_embeddings:
                bad = hi if hi >= mod.num_embeddings else lo
                raise RunFailed(f"{layer} receives index {bad}, outside [0, {mod.num_embeddings})",
                                "the tokenizer's vocabulary and the model's vocab size differ: build the model with the tokenizer's vocab size",
                                check="data.indices")

    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: check(mod, a, n))
               for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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


def require(checks: list[Check]) -> None:
    """Raise the first failure as RunFailed (exit 1)."""
    for c in checks:
        if c.status == "fail":
            raise RunFailed(f"preflight: {c.message}", c.hint)
