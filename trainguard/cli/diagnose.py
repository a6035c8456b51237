"""`trainguard diagnose`: a thin wrapper over :func:`trainguard.diagnose.diagnose`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from trainguard.cli._errors import user_errors
from trainguard.cli.train import BudgetOpt, DebugOpt, ProfileOpt, SetOpt

STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def diagnose_command(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", metavar="PATH", show_default=False, help="Run config YAML. Without it: environment and hardware only.")] = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    memory_budget: BudgetOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", metavar="DIR", show_default=False, help="Where train would write (for the disk check; default runs/NAME for a config NAME.yaml).")] = None,
    json_: Annotated[bool, typer.Option("--json", metavar="", help="Print {ok, checks: [{name, status, message, hint}]} as JSON (for CI).")] = False,
    debug: DebugOpt = False,
) -> None:
    """Check, in seconds, everything that would kill a run or waste the hardware.

    The environment, the hardware, the config, the data, the model (one real forward/backward, as
    train's preflight) and the memory. Exit 1 if a check fails, 2 if the config cannot be read."""
    with user_errors(debug):
        from rich.console import Console

        from trainguard.diagnose import diagnose
        from trainguard.memory.sizes import parse_size

        budget = parse_size(memory_budget) if memory_budget is not None else None
        err = Console(stderr=True, highlight=False)
        with err.status("[bold]diagnose[/bold]: environment") as status:
            say = (lambda what: status.update(f"[bold]diagnose[/bold]: {what} ...")) if err.is_terminal else (lambda _: None)
            report = diagnose(config, profile=profile, overrides=set_ or [], memory_budget=budget, run_dir=run_dir, say=say)
        from trainguard import distributed

        if not distributed.current().is_main:  # under torchrun: rank 0 reports (every rank's checks agree)
            pass
        elif json_:
            print(json.dumps(report.as_json(), indent=2))
        else:
            print_table(report)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def print_table(report) -> None:
    """One row per check; fits 80 columns (messages and hints wrap)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = Console(highlight=False)
    out.width = min(out.width, 100)
    t = Table(show_header=True, header_style="bold", box=None, padding=(0, 1), expand=False)
    t.add_column("", no_wrap=True, width=4)
    t.add_column("check", no_wrap=True, style="bold")
    t.add_column("result", overflow="fold", ratio=1)
    for c in report.checks:
        body = Text(c.message)
        if c.hint and c.status != "pass":
            body.append("\nfix: ", style="bold").append(c.hint, style="dim" if c.status == "skip" else "")
        t.add_row(Text(c.status, style=STYLE[c.status]), c.name, body)
    out.print(t)
    counts = {s: sum(c.status == s for c in report.checks) for s in STYLE}
    verdict = "[bold red]FAILED[/bold red]" if not report.ok else "[bold green]OK[/bold green]"
    out.print(f"{verdict}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
