"""User-facing errors: every failure a user can fix carries a message and a hint.

The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits with ``exit_code``;
tracebacks only appear with ``--debug`` or ``TRAINGUARD_DEBUG=1``.
"""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 240) -> str:
    """An exception's message, first line only, at most ``limit`` characters (for one-line reports)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:limit]


class TrainguardError(Exception):
    """Base class for errors that are reported to the user without a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, check: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.check = check  # the `trainguard diagnose` check it belongs to (e.g. "data.fields"), if not obvious

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ConfigError(TrainguardError):
    """Bad usage or bad configuration: nothing was trained (exit 2)."""

    exit_code = 2


class RunFailed(TrainguardError):
    """The run or a check failed: training gave up, preflight failed (exit 1)."""

    exit_code = 1


def require_package(package: str, key: str, extra: str, without: str | None = None) -> None:
    """A ConfigError (exit 2) naming the extra to install when ``key`` needs ``package`` and it is
    missing; ``without``: how to do without it (default: remove ``key``)."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key} needs the {package} package, which is not installed",
                          f"pip install 'trainguard[{extra}]', or {without or f'remove {key}'}")
