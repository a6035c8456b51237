"""The command's own process: when it started, set by :func:`trainguard.cli.main` (None when the
CLI's functions are called in-process, as the tests do)."""

from __future__ import annotations

STARTED: float | None = None  # summary.json's startup_s counts from it
