"""Memory sizes as people write them (``512MB``, ``3.5GiB``) and as they read them. No torch import."""

from __future__ import annotations

import re

from trainguard.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``512MB`` (decimal), ``3.5GiB`` (binary), ``1e9`` is not accepted (say the unit)."""
    m = _SIZE.fullmatch(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"cannot read the memory size {text!r}",
                          "write a number and a unit, e.g. 512MB, 3.5GiB or 4GB (MB/GB are powers of 1000, MiB/GiB of 1024)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"the memory size {text!r} is not positive", "give a size such as 512MB or 3.5GiB")
    return n


def one_sample_does_not_fit(need: int | None, available: str) -> tuple[str, str]:
    """The error (message, hint) when a step on one sample needs more memory than there is."""
    return (f"one sample does not fit in device memory: a step at micro-batch 1 needs about "
            f"{fmt_bytes(need) if need else 'more than there is'}, {available}",
            "a smaller model or shorter samples, precision fp16/bf16 on a GPU, or a device with more memory; "
            "`trainguard autoconfig --profile NAME` predicts what fits where")


def fmt_bytes(n: float | int | None) -> str:
    """``1536 MiB`` -> ``1.50 GiB``; binary units, three significant digits."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{int(n)} B"
