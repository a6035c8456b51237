"""Finite loss spikes: the rule, and the samples behind a spike.

The rule (docs/guards.md, "Loss spikes"): a step's loss is a spike when, against the window of
the last ``spike_window`` healthy steps' losses (finite, not spikes themselves), after
``spike_warmup`` of them, both

* ``loss > spike_factor x median(window)``, and
* ``z = (ln loss - median(ln window)) / s > spike_zscore``, where ``s`` is the window's noise:
  1.4826 x the median absolute change of the log-loss from one step to the next, / sqrt(2)

hold. The first says the jump is large; the second that it is far outside the window's own
noise, measured on the log-loss so that a heavy-tailed loss (a small batch, a nearly solved
task: most batches near 0, a few near 1) is judged by its spread in ratios, not by its median
alone, and from step to step, so that the fast fall of the first steps is not taken for noise.
A window whose median is not positive is not judged (the log needs a positive loss).

Cost on a healthy step: one comparison with a cached bound (the rule's threshold, recomputed
every ``spike_window // 4`` healthy steps) and a deque append. Only a loss above the bound is
judged with the window's current median and MAD. The loss is the one the guard already has on
the host (the step's one sync; in a process group the mean over every rank's samples, the same
on every rank), so every rank decides alike.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass

import torch

from trainguard.engine.batch import slice_batch, split_batch, to_device
from trainguard.engine.precision import autocast

TINY = 1e-30   # a zero (or negative) loss in the window counts as this tiny one in the log
LOG_TINY = math.log(TINY)
MAD_SIGMA = 1.4826  # MAD x this estimates the standard deviation of normal noise


@dataclass
class Spike:
    """A loss the rule judged a spike, with the rule's numbers."""

    loss: float
    median: float       # of the window's losses
    z: float            # robust z-score of the log-loss
    ratio: float        # loss / median
    window: int         # losses in the window

    def describe(self) -> str:
        return (f"loss spike: {self.loss:.4g} is {self.ratio:.3g} x the median {self.median:.4g} of the last "
                f"{self.window} healthy steps, z = {self.z:.3g}")

    def fields(self) -> dict:
        """For the event: the rule's numbers."""
        return {"loss": self.loss, "median": self.median, "z": round(self.z, 3), "ratio": round(self.ratio, 3),
                "window": self.window}


def _median(xs: list[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


class SpikeRule:
    """The running window and the cached bound (see the module doc)."""

    def __init__(self, factor: float, zscore: float, window: int, warmup: int):
        self.factor, self.zscore, self.warmup = factor, zscore, warmup
        self.window: deque[float] = deque(maxlen=window)
        self.every = max(1, window // 4)
        self.bound = math.inf   # losses at or below it are not spikes (as of the last refresh)
        self.since = (-warmup) % self.every  # healthy losses added since the last refresh: the first comes at the warm-up's end

    # ---- the hot path ------------------------------------------------------------------
    def add(self, loss: float) -> None:
        """A healthy step's loss joins the window."""
        self.window.append(loss)
        self.since += 1
        if self.since >= self.every:
            self.refresh()

    def check(self, loss: float) -> Spike | None:
        """The spike this loss is, or None. One comparison unless the loss is above the bound."""
        if loss <= self.bound:
            return None
        return self.judge(loss)

    # ---- only above the bound, and every few steps -------------------------------------------
    def stats(self) -> tuple[float, float, float] | None:
        """``(median, median of the log-losses, the noise of the log-loss)`` of the window, or None
        while it is warming up or its median is not positive. (The median is ``exp`` of the log-losses'
        median: of an even window, the geometric mean of its two middle losses.)"""
        w = self.window
        if len(w) < self.warmup:
            return None
        logs = list(map(math.log, w)) if min(w) > TINY else [math.log(x) if x > TINY else LOG_TINY for x in w]
        lm = _median(sorted(logs))
        if lm <= LOG_TINY:
            return None
        # the noise from one step to the next (in step order): a falling or rising loss is not noise
        s = MAD_SIGMA * _median(sorted(map(abs, map(operator.sub, logs[1:], logs[:-1])))) / math.sqrt(2)
        return math.exp(lm), lm, max(s, 1e-12)

    def threshold(self, stats: tuple[float, float, float] | None) -> float:
        if stats is None:
            return math.inf
        median, lm, s = stats
        e = lm + self.zscore * s
        return max(self.factor * median, math.exp(e) if e < 700 else math.inf)

    def refresh(self) -> None:
        self.since = 0
        self.bound = self.threshold(self.stats())

    def judge(self, loss: float) -> Spike | None:
        """The rule on the window as it is now (not the cached bound)."""
        stats = self.stats()
        if stats is None or not math.isfinite(loss) or loss <= 0:
            return None
        median, lm, s = stats
        z = (math.log(loss) - lm) / s
        if loss > self.factor * median and z > self.zscore:
            return Spike(loss, median, z, loss / median, len(self.window))
        return None

    def restart(self) -> None:
        """The loss has moved to a new level: the window starts again (and warms up again)."""
        self.window.clear()
        self.refresh()
        self.since = (-self.warmup) % self.every

    # ---- checkpointed ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"window": list(self.window), "spike_bound": self.bound, "spike_since": self.since}

    def load_state_dict(self, d: dict) -> None:
        self.window = deque(d["window"], maxlen=self.window.maxlen)
        if "spike_bound" in d:
            self.bound, self.since = d["spike_bound"], d["spike_since"]
        else:  # a checkpoint from before the bound was kept
            self.refresh()


def sample_losses(trainer, batch, limit: int = 1024) -> tuple[list[float] | None, str | None]:
    """Each sample's own loss (a forward of one sample, no gradient; RNG streams, buffers and
    BatchNorm statistics left as they were), only after a spike: ``(losses, None)``, or
    ``(None, why not)`` when the batch is larger than ``limit`` or the model cannot run one sample alone."""
    from trainguard.engine.state import preserved_state
    from trainguard.guards.localize import _batchnorm_alone, _norm_statistics_frozen

    if not len(batch):
        return [], None
    if len(batch) > limit:
        return None, f"its {len(batch)} samples are more than the {limit} examined one by one"
    model, adapter, device = trainer.model, trainer.adapter, trainer.device
    losses: list[torch.Tensor] = []
    try:
        with preserved_state(model), torch.no_grad(), _norm_statistics_frozen(model):
            for micro, k in split_batch(batch.data, trainer.micro_batch_size):
                micro = to_device(micro, device)
                for i in range(k):
                    with autocast(device.type, trainer.precision), _batchnorm_alone(model, 1):
                        _, loss, _ = adapter(slice_batch(micro, i, i + 1))
                    losses.append(loss.detach().float().reshape(()))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a model that cannot run one sample alone
        return None, f"the model cannot run one sample alone ({type(e).__name__}: {str(e)[:160]})"
    return torch.stack(losses).tolist(), None


def culprits(rule: SpikeRule, ids: list[int], losses: list[float], max_fraction: float = 0.25) -> list[int]:
    """The samples that make the step a spike: the fewest highest-loss ones, each a spike by its own
    loss, without which the rest's mean loss is not one; at most ``max_fraction`` of the samples
    (at least one, of two or more). [] when no such few stand out: the step is then skipped whole."""
    n = len(losses)
    if n < 2 or not all(math.isfinite(v) for v in losses):
        return []
    order = sorted(range(n), key=lambda r: -losses[r])
    total = sum(losses)
    dropped: list[int] = []
    for r in order[:max(1, int(max_fraction * n))]:
        if rule.judge(losses[r]) is None:
            return []  # the next highest is no spike alone, and the rest still is one
        dropped.append(r)
        total -= losses[r]
        if rule.judge(total / (n - len(dropped))) is None:
            return sorted(ids[r] for r in dropped)
    return []
