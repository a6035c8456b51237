"""`trainguard autoconfig`: a thin wrapper over :func:`trainguard.memory.autoconfig.autoconfigure`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from trainguard.cli._errors import user_errors
from trainguard.cli.train import BudgetOpt, ConfigOpt, DebugOpt, JsonOpt, ProfileOpt, SetOpt, at_least_one


def autoconfig_command(
    config: ConfigOpt,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    memory_budget: BudgetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", metavar="PATH", show_default=False, help="Write the tuned config here, ready for `trainguard train --config`.")] = None,
    nproc_per_node: Annotated[int, typer.Option("--nproc-per-node", metavar="N", callback=at_least_one, help="Tune for a job of N processes: each steps on train.batch_size / N samples; with train.strategy: fsdp, one rank's step with the model sharded over N (forecast).")] = 1,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Pick the micro-batch size, accumulation and precision for a config.

    Measured on this device (at most 12 trial steps; the effective batch is unchanged), or predicted
    for a --profile whose card is not here."""
    with user_errors(debug):
        import yaml
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from trainguard.memory.autoconfig import autoconfigure
        from trainguard.memory.search import MAX_TRIALS
        from trainguard.memory.sizes import fmt_bytes, parse_size

        budget = parse_size(memory_budget) if memory_budget is not None else None
        err = Console(stderr=True, highlight=False)
        with Progress(TextColumn("[bold]autoconfig[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("trial steps", total=MAX_TRIALS)

            def on_trial(t):
                what = "out of memory" if t.oom else f"peak {fmt_bytes(t.peak)}"
                bar.update(task, advance=1, description=f"micro-batch {t.m}: {what}")

            tuning, tuned = autoconfigure(config, profile=profile, overrides=set_ or [], memory_budget=budget, on_trial=on_trial,
                                          processes=nproc_per_node)
        if out is not None:
            header = (f"# trainguard train --config {out}\n# tuned by `trainguard autoconfig` for {tuning.profile} "
                      f"({tuning.method}): {tuning.split()}\n")
            out.write_text(header + yaml.safe_dump(tuned, sort_keys=False))
        if json_:
            print(json.dumps(tuning.as_json(), indent=2))
            return
        from rich.table import Table

        t = Table(title=f"autoconfig: {tuning.profile} ({tuning.method})", show_header=False, box=None, padding=(0, 2))
        rows = [("micro_batch_size", tuning.micro_batch_size),
                ("grad_accum", f"{tuning.grad_accum}  ({tuning.split()}" + (f" x {tuning.processes} processes" if tuning.processes > 1 else "")
                 + f" = batch_size {tuning.batch_size})"),
                ("precision", tuning.precision), ("num_workers", tuning.num_workers),
                ("peak memory", f"{fmt_bytes(tuning.predicted_peak_bytes)} of {fmt_bytes(tuning.usable_bytes)} usable"),
                ("memory limit", fmt_bytes(tuning.memory_limit_bytes)),
                ("largest that fits", tuning.max_micro_batch_size), ("trial steps", tuning.trials)]
        for k, v in rows:
            t.add_row(k, str(v))
        Console(highlight=False).print(t)
        for n in tuning.notes:
            Console(highlight=False).print(f"note: {n}")
        if out is not None:
            print(f"wrote {out}: trainguard train --config {out}")
