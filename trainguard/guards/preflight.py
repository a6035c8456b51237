"""Preflight: one real forward and backward on the first micro-batch, before the first step.

A shape mismatch, a missing forward() argument, an empty dataset or a model without a loss
fails here in seconds (exit 1) with the module's qualified name, both shapes and a hint,
instead of an hour into the run. ``trainguard diagnose`` will call :func:`preflight` too.
It leaves no trace: RNG streams, buffers and gradients are as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainguard.engine.batch import slice_batch, to_device
from trainguard.engine.precision import autocast
from trainguard.errors import RunFailed, TrainguardError
from trainguard.guards.localize import preserved_state, module_trace


@dataclass
class Check:
    """One preflight result, in the shape `diagnose --json` reports."""

    name: str
    status: str          # pass | warn | fail | skip
    message: str
    hint: str | None = None


def preflight(trainer) -> list[Check]:
    """Run the checks; returns them all (the caller decides what a failure means)."""
    checks: list[Check] = []
    n = trainer.micro_batch_size
    try:
        batch = trainer.data.peek(n)
        if batch.error is not None:
            raise RunFailed(*batch.error)
    except TrainguardError as e:
        return [Check("data", "fail", e.message, e.hint)]
    if batch.bad and not batch.ids:
        first = batch.bad[0]
        return [Check("data", "fail", f"the first {len(batch.bad)} samples all failed to load, e.g. sample {first.sample_id}: {first.reason}",
                      "fix the dataset's __getitem__ (run it on one index by hand to see the error)")]
    checks.append(Check("data", "warn" if batch.bad else "pass",
                        f"first micro-batch: {len(batch)} samples" + (f", {len(batch.bad)} failed to load" if batch.bad else "")))
    n = len(batch)
    model = trainer.model
    while True:
        trace = module_trace(model)
        oom = False
        try:
            with preserved_state(model), trace:
                micro = to_device(slice_batch(batch.data, 0, n), trainer.device)
                with autocast(trainer.device.type, trainer.precision):
                    _, loss, _ = trainer.adapter(micro)
                loss.backward()
        except TrainguardError as e:
            checks.append(Check("forward", "fail", e.message, e.hint))
            return checks
        except torch.OutOfMemoryError:
            oom = True  # handled below, once the exception (and the activations it holds) is gone
        except Exception as e:  # the model's own error: name the module and the shapes
            where = trace.explain()
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            checks.append(Check("forward", "fail", f"the first forward/backward failed {where}: {msg}" if where else f"the first forward/backward failed: {msg}",
                                "the data's shapes and the model's layer sizes disagree: fix the layer size or the data"
                                if where else "run with --debug for the traceback"))
            return checks
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
        if not oom:
            break
        if n == 1:
            from trainguard.guards.oom import one_sample_need
            from trainguard.memory.sizes import fmt_bytes, one_sample_does_not_fit

            limit = getattr(trainer.memory, "limit", None)
            avail = f"{fmt_bytes(limit)} available" if limit else "more than the device has"
            checks.append(Check("memory", "fail", *one_sample_does_not_fit(one_sample_need(trainer, batch), avail)))
            return checks
        checks.append(Check("memory", "warn", f"micro-batch {n} ran out of device memory in the preflight forward/backward; "
                            "step 1 will split it (guard.on_oom)", "set train.micro_batch_size: auto to start at the largest that fits"))
        n = 1  # the other checks still run, on one sample
    checks.append(Check("forward", "pass", f"forward and backward ran; loss {loss.item():.4g}"))
    if not torch.isfinite(loss):
        checks.append(Check("loss", "warn", f"the first micro-batch gives a non-finite loss ({loss.item()})",
                            "the guards will skip such steps; check the data and the loss (e.g. CTC input vs target lengths)"))
    dropped = trainer.adapter.dropped or []
    if dropped:
        checks.append(Check("fields", "warn", f"dataset fields not taken by {type(model).__name__}.forward(), left out: {', '.join(dropped)}",
                            "rename a field to a forward() argument with data.fields if it was meant for the model"))
    return checks


def require(checks: list[Check]) -> None:
    """Raise the first failure as RunFailed (exit 1)."""
    for c in checks:
        if c.status == "fail":
            raise RunFailed(f"preflight: {c.message}", c.hint)
