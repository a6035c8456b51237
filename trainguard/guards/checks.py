"""What a check reports: :class:`Check`, the shape the preflight, ``trainguard diagnose`` and
``diagnose --json`` share, and :func:`require`, which turns the first failure into an error."""

from __future__ import annotations

from dataclasses import dataclass

from trainguard.errors import RunFailed


@dataclass
class Check:
    """One preflight result, in the shape `diagnose --json` reports."""

    name: str
    status: str          # pass | warn | fail | skip
    message: str
    hint: str | None = None


def require(checks: list[Check]) -> None:
    """Raise the first failure as RunFailed (exit 1)."""
    for c in checks:
        if c.status == "fail":
            raise RunFailed(f"preflight: {c.message}", c.hint)
