"""Mapping exceptions to `error:` + `hint:` lines and exit codes, in one place."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import typer

from trainguard.errors import TrainguardError


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


def _on_rank(message: str) -> str:
    """In a multi-process job, which rank an error came from (rank 0's is the job's own voice)."""
    rank = os.environ.get("RANK", "0")  # torchrun's; read here, not through distributed, which imports torch
    return message if rank == "0" else f"[rank {rank}] {message}"
