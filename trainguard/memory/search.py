"""The largest micro-batch that fits, in few trial steps.

Memory per phase (forward, backward, optimizer step) is close to a line in the micro-batch size,
but which phase peaks changes as the batch grows (the optimizer step for small batches, the
backward for large ones), so one line through the overall peak misses by 8-25% on a transformer
while one line per phase, taking the max, is within 1% (docs/memory.md). The search fits those
lines through the trials that fit, tries the predicted largest size, and narrows between the
largest size known to fit and the smallest known not to, until they are within 5% or the trials
run out. Every answer it returns was measured, not only predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from trainguard.engine.batch import micro_sizes
from trainguard.memory.trial import Trial

MAX_TRIALS = 12


@dataclass
class PhaseLines:
    """``bytes = a + b * m`` for each phase, fitted through measured (or faked) steps."""

    lines: dict[str, tuple[float, float]]

    @classmethod
    def fit(cls, trials: list[Trial]) -> "PhaseLines | None":
        pts = sorted((t for t in trials if not t.oom and t.phases), key=lambda t: t.m)
        if not pts:
            return None
        lo, hi = pts[0], pts[-1]
        lines = {}
        for ph in lo.phases:
            if ph not in hi.phases:
                continue
            b = (hi.phases[ph] - lo.phases[ph]) / (hi.m - lo.m) if hi.m != lo.m else 0.0
            lines[ph] = (lo.phases[ph] - b * lo.m, max(0.0, b))
        return cls(lines)

    def predict(self, m: float) -> float:
        return max(a + b * m for a, b in self.lines.values())

    def largest(self, usable: int, cap: int) -> int:
        """The largest ``m <= cap`` whose predicted peak is within ``usable`` (0 if even 1 is not)."""
        best = cap
        for a, b in self.lines.values():
            if b > 0:
                best = min(best, int((usable - a) // b))
            elif a > usable:
                return 0
        return max(0, best)


@dataclass
class SearchResult:
    """``largest``: the largest micro-batch measured to fit (0: not even one sample)."""

    largest: int
    usable: int
    trials: list[Trial] = field(default_factory=list)
    lines: PhaseLines | None = None


def search(measure: Callable[[int], Trial], usable: int, upper: int, max_trials: int = MAX_TRIALS,
           on_trial: Callable[[Trial], None] | None = None) -> SearchResult:
    """Find the largest ``m`` in ``1..upper`` with ``measure(m).fits(usable)``; at most ``max_trials`` calls.

    Assumes memory grows with ``m``. Stops when the largest size known to fit is within 5% of
    the smallest known not to (so the answer is at least 95% of the true largest), or exact.
    """
    res = SearchResult(0, usable)
    lo, hi = 0, upper + 1  # lo fits; hi does not (upper + 1: not needed)

    def run(m: int) -> bool:
        nonlocal lo, hi
        t = measure(m)
        res.trials.append(t)
        if on_trial:
            on_trial(t)
        if t.fits(usable):
            lo = max(lo, m)
        else:
            hi = min(hi, m)
        return t.fits(usable)

    if not run(1):
        return res
    while len(res.trials) < max_trials and hi - lo > 1 and lo < 0.95 * (hi - 1):
        lines = PhaseLines.fit(res.trials)
        res.lines = lines
        if len(res.trials) == 1:
            guess = min(upper, 2)  # a second point for the lines
        else:
            guess = lines.largest(usable, upper) if lines else lo + 1
            if guess <= lo:  # the lines say nothing larger fits: prove it just above
                guess = lo + max(1, int(lo * 0.05))
            elif res.trials[-1].oom and guess >= hi - 1:  # an OOM gives no figures: do not aim as far
                guess = lo + max(1, int((hi - lo) * 0.85)) if hi < 2 * lo else int((lo * hi) ** 0.5)
        guess = max(lo + 1, min(hi - 1, guess))
        run(guess)
    res.largest = lo
    res.lines = PhaseLines.fit(res.trials)
    return res


def fewest_micro_batches(share: int, m: int) -> int:
    """The micro-batch size that splits ``share`` samples into the fewest micro-batches of at most
    ``m``: the largest of :func:`trainguard.engine.batch.micro_sizes`, the split the loop makes
    (256 at most 86: 86, 85, 85)."""
    return micro_sizes(share, m)[0] if share > 0 else max(1, m)
