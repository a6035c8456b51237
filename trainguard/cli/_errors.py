"""Mapping exceptions to `error:` + `hint:` lines and exit codes, in one place."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import typer

from trainguard.errors import TrainguardError


def console(stderr: bool = False):
    """A rich Console as wide as the terminal. Piped or redirected there is no width to fit: 200
    columns at least, so that no table cell is cut (rich's default there is 80)."""
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        out.width = max(out.width, 200)
    return out


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("TRAINGUARD_DEBUG", "") not in ("", "0")


def fail(message: str, hint: str | None, code: int, label: str = "error") -> typer.Exit:
    first, *rest = message.splitlines() or [""]
    print(f"{label}: {first}", file=sys.stderr)
    for line in rest:
        print(f"  {line.strip()}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Turn TrainguardError (and unexpected exceptions) into `error:`/`hint:` and an exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except TrainguardError as e:
        if debug_enabled(debug):
            traceback.print_exc()
        if getattr(e, "quiet", False):  # another rank of the job reports the same stop
            raise typer.Exit(e.exit_code) from None
        raise fail(_on_rank(e.message), e.hint, e.exit_code, getattr(e, "label", "error")) from None
    except KeyboardInterrupt:
        raise fail("interrupted", "re-run the same command to resume from the last checkpoint", 130) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback for users
        if debug_enabled(debug):
            traceback.print_exc()
        raise fail(_on_rank(f"{type(e).__name__}: {e}"), "re-run with --debug (or TRAINGUARD_DEBUG=1) for the traceback", 1) from None


# typer re-exports click's BadParameter but not its base, UsageError, which every parsing error is
# (unknown option or command, missing option, extra argument, bad value). Newer typer versions vendor
# click inside typer, so `import click` would name a different class: take it from typer's own.
UsageError: type[Exception] = typer.BadParameter.__mro__[1]


def usage_failure(e: Exception, argv: list[str]) -> typer.Exit:
    """A click usage error as `error:` + `hint:` (exit 2), instead of typer's boxed message."""
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "trainguard"
    message = e.format_message()
    hint = f"usage: {synopsis(ctx) if ctx is not None else 'trainguard COMMAND [OPTIONS]'}; `{path} -h` lists every option"
    option, possible = getattr(e, "option_name", None), getattr(e, "possibilities", None)
    commands = sorted(getattr(ctx.command, "commands", {})) if ctx is not None else []
    if option and hasattr(e, "possibilities"):  # click's NoSuchOption
        message = f"no such option: {option}"
        if possible:
            hint = f"did you mean {possible[0]}? `{path} -h` lists every option"  # difflib's closest first
    elif commands and ("command" in message.lower()):  # no command, or an unknown one
        hint = (f"the commands are {', '.join(commands)}, e.g. `trainguard train --config configs/quickstart.yaml`; "
                "`trainguard -h` says what each does")
    elif getattr(e, "param", None) is not None and not hasattr(e, "param_type"):  # a bad value (not a missing one)
        flag = max(e.param.opts, key=len)
        if e.param.metavar:
            hint = f"{flag} takes {e.param.metavar}; `{path} -h` says more"
    elif "extra argument" in message and _set_without_equals(argv):
        hint = f"--set takes KEY=VALUE as one word: --set {_set_without_equals(argv)}=VALUE (e.g. --set train.max_steps=50)"
    return fail(message[:1].lower() + message[1:] if message[1:2].islower() else message, hint, 2)


def _set_without_equals(argv: list[str]) -> str | None:
    """The first `--set KEY VALUE` (a space where the `=` belongs), if any."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--set" and "=" not in value:
            return value
    return None


def synopsis(ctx) -> str:
    """The command's usage in one line, from its parameters: `trainguard train --config PATH [OPTIONS]`."""
    cmd, parts = ctx.command, [ctx.command_path]
    if hasattr(cmd, "commands"):
        return f"{ctx.command_path} COMMAND [OPTIONS]"
    for p in cmd.params:
        name = p.metavar or (p.name or "").upper()
        if getattr(p, "param_type_name", "") == "argument":
            name += "..." if p.nargs != 1 else ""
            parts.append(name if p.required else f"[{name}]")
        elif p.required:
            parts.append(f"{max(p.opts, key=len)} {name}")  # the long spelling: --config
    return " ".join(parts + ["[OPTIONS]"])


def _on_rank(message: str) -> str:
    """In a multi-process job, which rank an error came from (rank 0's is the job's own voice)."""
    rank = os.environ.get("RANK", "0")  # torchrun's; read here, not through distributed, which imports torch
    return message if rank == "0" else f"[rank {rank}] {message}"
