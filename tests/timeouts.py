"""Timeouts that guard against a hang, scaled to the machine: a hang must still fail, a slow
machine must not. A base is what a test takes alone on a quiet 2-core machine, with room to spare;
``slow(base)`` multiplies it by ``TRAINGUARD_TEST_TIMEOUT_SCALE`` when that is set, else by 3 on a
machine with 2 CPUs or fewer or whose load is above its CPU count (the suite's other processes,
other jobs), else 1."""

from __future__ import annotations

import os


def scale() -> float:
    """The factor ``slow`` applies now (the load is read at each call: it changes during a suite)."""
    given = os.environ.get("TRAINGUARD_TEST_TIMEOUT_SCALE")
    if given:
        return float(given)
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # no load average on Windows
    return 3.0 if cpus <= 2 or load > cpus else 1.0


def slow(seconds: float) -> float:
    """``seconds`` scaled to this machine (see the module docstring)."""
    return seconds * scale()
