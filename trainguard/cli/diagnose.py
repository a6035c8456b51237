"""`trainguard diagnose` (planned)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing import Annotated

from trainguard.cli._errors import fail


def diagnose_command(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Run config YAML.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Preflight checks before a run. (planned: not built yet)"""
    raise fail("`trainguard diagnose` is planned but not built yet",
               "`trainguard train` already validates the config before it trains", 2)
