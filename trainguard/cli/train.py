"""`trainguard train`: a thin wrapper over :func:`trainguard.run.train`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from typing import Annotated

from trainguard.cli._errors import user_errors

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.", show_default=False)]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="Hardware profile: NAME, PATH to a profile YAML, or auto. Overrides `hardware:`.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set train.max_steps=50 (repeatable; values parse as YAML).")]
BudgetOpt = Annotated[Optional[str], typer.Option("--memory-budget", help="Cap device memory, e.g. 512MB or 3.5GiB: enforced on CUDA, simulated on a CPU (an OOM is raised where a GPU of that size would).")]


def train_command(
    config: ConfigOpt,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run directory (default runs/<config stem>).")] = None,
    resume: Annotated[str, typer.Option("--resume", help="auto: continue from the newest valid checkpoint in the run dir; never; or a checkpoint PATH.")] = "auto",
    memory_budget: BudgetOpt = None,
    nproc_per_node: Annotated[Optional[int], typer.Option("--nproc-per-node", min=1, help="Train in N processes on this node (one per GPU; gloo on CPU), started through torchrun. train.batch_size stays the global batch. For several nodes, run `torchrun ... -m trainguard train` on each.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Train a model from a YAML config. Re-running the same command resumes the run."""
    if nproc_per_node is not None and "RANK" not in os.environ:  # under torchrun already: its environment wins
        with user_errors(debug):
            from trainguard.launch import launch
            from trainguard.run import check_config

            check_config(config, set_ or [], profile=profile, world=nproc_per_node)  # one error, before any process starts
            argv = ["train", "--config", str(config), "--resume", resume]
            for flag, value in (("--profile", profile), ("--run-dir", run_dir), ("--memory-budget", memory_budget)):
                if value is not None:
                    argv += [flag, str(value)]
            for s in set_ or []:
                argv += ["--set", s]
            code = launch(nproc_per_node, argv + (["--debug"] if debug else []), debug)
        if code:
            raise typer.Exit(code)
        return
    with user_errors(debug):
        from trainguard import cli
        from trainguard.memory.sizes import fmt_bytes, parse_size
        from trainguard.run import train

        budget = parse_size(memory_budget) if memory_budget is not None else None
        summary = train(config, set_ or [], profile=profile, run_dir=run_dir, resume=resume, memory_budget=budget,
                        started=cli.STARTED)
        code = int(summary.get("exit_code") or 0)
        from trainguard import distributed

        if not distributed.current().is_main:  # one process group, one report: rank 0's
            pass
        elif summary.get("status") == "interrupted":
            print(f"interrupted at step {summary['steps']}; checkpoint {summary.get('last_checkpoint')}; "
                  "re-run the same command to resume", flush=True)
        else:
            loss = f"{summary['final_loss']:.4f}" if summary.get("final_loss") is not None else "n/a"
            peak = f", peak memory {fmt_bytes(summary['peak_memory_bytes'])}" if summary.get("peak_memory_bytes") else ""
            print(f"done: {summary['steps']} steps, final loss {loss}{peak}, run directory {summary['run_dir']}", flush=True)
    if code:
        raise typer.Exit(code)
