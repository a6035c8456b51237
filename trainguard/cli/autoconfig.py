"""`trainguard autoconfig` (planned)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing import Annotated

from trainguard.cli._errors import fail


def autoconfig_command(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Run config YAML.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Pick micro-batch size, accumulation and precision for the hardware. (planned: not built yet)"""
    raise fail("`trainguard autoconfig` is planned but not built yet",
               "set train.micro_batch_size and train.precision by hand, or use a profile's defaults", 2)
