"""`trainguard train`: a thin wrapper over :func:`trainguard.run.train`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from typing import Annotated

from trainguard.cli._errors import user_errors

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", metavar="PATH", help="Run config YAML.", show_default=False)]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", metavar="NAME|PATH|auto", show_default=False, help="Hardware profile: NAME, PATH to a profile YAML, or auto. Overrides `hardware:`.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", show_default=False, help="Override a config key: --set train.max_steps=50 (repeatable; values parse as YAML).")]
BudgetOpt = Annotated[Optional[str], typer.Option("--memory-budget", metavar="SIZE", show_default=False, help="Cap device memory, e.g. 512MB or 3.5GiB: enforced on CUDA, simulated on a CPU (an OOM is raised where a GPU of that size would).")]
DebugOpt = Annotated[bool, typer.Option("--debug", metavar="", help="Show tracebacks.")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON (for scripts).")]


def at_least_one(value: Optional[int]) -> Optional[int]:
    """--nproc-per-node's check, in words (typer's `min=1` shows `[x>=1]` in the help)."""
    if value is not None and value < 1:
        raise typer.BadParameter(f"{value} processes: give 1 or more (one per GPU)")
    return value


ProcsOpt = Annotated[Optional[int], typer.Option("--nproc-per-node", metavar="N", callback=at_least_one, show_default=False, help="Train in N processes on this node (one per GPU; gloo on CPU), started through torchrun. train.batch_size stays the global batch. For several nodes, run `torchrun ... -m trainguard train` on each.")]


def resume_value(value: str) -> str:
    """--resume: auto, never, or a directory that exists (checked before anything is built)."""
    if value in ("auto", "never") or Path(value).is_dir():
        return value
    raise typer.BadParameter(f"{value!r} is not auto, never, or an existing directory "
                             "(a run directory, or one of its checkpoints/step_NNNNNNN)")


def train_command(
    config: ConfigOpt,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", metavar="DIR", show_default=False, help="Run directory (default runs/NAME for a config NAME.yaml).")] = None,
    resume: Annotated[str, typer.Option("--resume", metavar="auto|never|PATH", callback=resume_value, help="auto: continue from the newest valid checkpoint in the run dir; never: start afresh; or a checkpoint (or run) directory PATH.")] = "auto",
    memory_budget: BudgetOpt = None,
    nproc_per_node: ProcsOpt = None,
    print_config: Annotated[bool, typer.Option("--print-config", metavar="", help="Print the resolved config (defaults, profile, extends, --set) as YAML and exit, without training or touching the run directory.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Train a model from a YAML config. Re-running the same command resumes the run."""
    if print_config:
        with user_errors(debug):
            print(resolved_yaml(config, set_ or [], profile), end="")
        return
    if nproc_per_node is not None and "RANK" not in os.environ:  # under torchrun already: its environment wins
        with user_errors(debug):
            from trainguard.launch import launch
            from trainguard.run import check_config
            from trainguard.run_dir import default_run_dir

            check_config(config, set_ or [], profile=profile, world=nproc_per_node)  # one error, before any process starts
            argv = ["train", "--config", str(config), "--resume", resume]
            for flag, value in (("--profile", profile), ("--run-dir", run_dir), ("--memory-budget", memory_budget)):
                if value is not None:
                    argv += [flag, str(value)]
            for s in set_ or []:
                argv += ["--set", s]
            code = launch(nproc_per_node, argv + (["--debug"] if debug else []), debug,
                          run_dir=run_dir if run_dir is not None else default_run_dir(config))
        if code:
            raise typer.Exit(code)
        return
    with user_errors(debug):
        from trainguard.cli import _entry
        from trainguard.memory.sizes import fmt_bytes, parse_size
        from trainguard.callbacks.signals import hold_after_completion
        from trainguard.run import train

        if _entry.STARTED is not None:  # the process's own entry (main()): it ends with the run, so a signal
            hold_after_completion()  # after its end exits 0 (an in-process test runner keeps its handlers)
        budget = parse_size(memory_budget) if memory_budget is not None else None
        summary = train(config, set_ or [], profile=profile, run_dir=run_dir, resume=resume, memory_budget=budget,
                        started=_entry.STARTED)
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


def resolved_yaml(config: Path, overrides: list[str], profile: Optional[str]) -> str:
    """The config as train resolves it (defaults < profile < YAML with extends < --set), as YAML that
    `trainguard train --config` takes back unchanged; nothing is built and no file is written."""
    import yaml

    from trainguard.config.load import resolve_config

    cfg, prof, why = resolve_config(config, profile=profile, overrides=overrides)
    data = cfg.model_dump(mode="json")
    hw = Path(data["hardware"])
    if hw.suffix in (".yaml", ".yml") and not hw.is_absolute() and not hw.exists():  # relative to the config's folder
        data["hardware"] = str((config.parent / hw).resolve())
    command = " ".join(["trainguard train --config", str(config)] + [f"--set {s}" for s in overrides]
                       + ([f"--profile {profile}"] if profile else []))
    return (f"# resolved by: {command}\n"
            f"# hardware profile {prof.name}: {why}\n"
            "# resolved config: auto values are chosen at start from the device (the run directory's config.yaml has them)\n"
            + yaml.safe_dump(data, sort_keys=False))
