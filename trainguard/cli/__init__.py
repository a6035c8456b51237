"""The command-line interface: this module registers the commands (each lives in its own file and
is a thin wrapper over a library function) and holds the two typer classes that make usage errors
`error:` + `hint:` lines and help texts words. Nothing here imports torch at import time."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from trainguard.cli import _entry, autoconfig, diagnose, profiles, report, train
from trainguard.cli._errors import UsageError, usage_failure


class _Group(TyperGroup):
    """The root command: every usage error (bad option, missing option, extra argument, unknown or
    missing command) becomes `error:` + `hint:` and exit 2, here rather than in main(), so the
    in-process test runner sees the same as a user."""

    argv: list[str] = []

    def main(self, args=None, *rest, **kwargs):
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().main(args, *rest, **kwargs)

    def parse_args(self, ctx, args):
        if not args and not ctx.resilient_parsing:
            ctx.fail("no command given")
        return super().parse_args(ctx, args)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _in_words(option)
        return option

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as e:
            raise usage_failure(e, self.argv) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as e:  # the subcommand's own parsing happens in here
            raise usage_failure(e, self.argv) from None


class _Command(TyperCommand):
    """A subcommand whose help shows each value in words (its metavar: PATH, KEY=VALUE, SIZE, N),
    not typer's Python types (`<path>`, `<list[str]>`), and nothing after a flag or an argument's
    name. typer has no public switch for its type column: the one override lives here, and
    tests/test_cli_usage.py checks every command's help for `<`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            _in_words(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _in_words(option)
        return option


def _in_words(param) -> None:
    words = None if getattr(param, "param_type_name", "") == "argument" else param.metavar
    param.display_type_rich = lambda ctx: words  # typer >= 0.2x's type column; older ones show the metavar


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    import trainguard

    try:
        torch = f"torch {version('torch')}"  # the installed distribution's metadata: no torch import
    except PackageNotFoundError:
        torch = "torch not installed"
    print(f"trainguard {trainguard.__version__} ({torch}, python {sys.version.split()[0]})")
    raise typer.Exit()


app = typer.Typer(
    name="trainguard",
    cls=_Group,
    help="Train PyTorch models from YAML configs, with runs that survive bad data, NaNs and crashes.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the versions of trainguard, torch and python, and exit.",
                                          is_eager=True, callback=_version, metavar="")] = False,
) -> None:
    """Only the options that come before a command (--version); the work is in the commands."""


app.command("train", cls=_Command)(train.train_command)
app.command("diagnose", cls=_Command)(diagnose.diagnose_command)
app.command("autoconfig", cls=_Command)(autoconfig.autoconfig_command)
app.command("profiles", cls=_Command)(profiles.profiles_command)
app.command("report", cls=_Command)(report.report_command)


def main() -> None:
    """Console-script entry point."""
    import psutil

    _entry.STARTED = psutil.Process().create_time()  # when this command's process started
    app()
