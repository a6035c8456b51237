"""The command-line interface: this module only registers commands; each lives in its own file
and is a thin wrapper over a library function. Nothing here imports torch at import time."""

from __future__ import annotations

import typer

from trainguard.cli import autoconfig, diagnose, profiles, report, train

app = typer.Typer(
    name="trainguard",
    help="Train PyTorch models from YAML configs, with runs that survive bad data, NaNs and crashes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train.train_command)
app.command("diagnose")(diagnose.diagnose_command)
app.command("autoconfig")(autoconfig.autoconfig_command)
app.command("profiles")(profiles.profiles_command)
app.command("report")(report.report_command)


STARTED: float | None = None  # when this command's process started (summary.json's startup_s counts from it)


def main() -> None:
    """Console-script entry point."""
    global STARTED
    import psutil

    STARTED = psutil.Process().create_time()
    app()
