"""The one place that turns ``{_target_: "pkg.mod:attr", **kwargs}`` into an object.

Security note: ``_target_`` imports and calls user code by design, exactly like running a
Python script. Only run configs you trust. YAML itself is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any

from trainguard.errors import ConfigError, RunFailed, TrainguardError, first_line


def _split(target: str) -> tuple[str, str]:
    if ":" in target:
        mod, _, attr = target.partition(":")
    else:
        mod, _, attr = target.rpartition(".")
    if not mod or not attr:
        raise ConfigError(f"`_target_: {target}` is not of the form package.module:attr",
                          "write e.g. `_target_: mypkg.models:build_model`")
    return mod, attr


def _module_prefix(mod_name: str, attr: str) -> tuple[str, str]:
    """For a dotted target, the longest importable module prefix and the attribute path after it;
    unchanged when none imports (``locate`` then reports the full module name)."""
    parts = mod_name.split(".")
    for k in range(len(parts), 0, -1):
        name = ".".join(parts[:k])
        try:
            if importlib.util.find_spec(name) is not None:
                return name, ".".join(parts[k:] + [attr])
        except ModuleNotFoundError as e:  # a parent that is no module (a class): a shorter prefix may be
            if not (e.name and mod_name.startswith(e.name)):
                break  # a module that exists but fails to import: `locate` reports it
        except (ImportError, ValueError):
            break
    return mod_name, attr


def locate(target: str, where: str = "_target_") -> Any:
    """Import ``pkg.mod:attr`` (or ``pkg.mod.attr``); errors tell a missing module from a missing attribute."""
    mod_name, attr = _split(target)
    cwd = os.getcwd()
    if cwd not in sys.path:  # like `python -m`: modules beside the user's config are importable
        sys.path.insert(0, cwd)
    if ":" not in target and "." in mod_name:  # `pkg.Class.method` (AutoTokenizer.from_pretrained): the module may be shorter
        mod_name, attr = _module_prefix(mod_name, attr)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if mod_name == missing or mod_name.startswith(missing + "."):
            raise ConfigError(f"{where}: cannot import module `{mod_name}` (no module named `{missing}`)",
                              "check the spelling, install the package, or run from the directory that contains it") from None
        raise ConfigError(f"{where}: module `{mod_name}` was found but its import failed: no module named `{missing}`",
                          f"install `{missing}` (needed by `{mod_name}`)") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            import difflib

            close = difflib.get_close_matches(attr, public, n=1)
            raise ConfigError(f"{where}: module `{mod_name}` has no attribute `{attr}`",
                              f"did you mean `{mod_name}:{close[0]}`?" if close else f"`{mod_name}` defines: {', '.join(public[:12])}")
        obj = getattr(obj, part)
    return obj


def instantiate(spec: Any, where: str = "config", **extra: Any) -> Any:
    """Build an object from a spec; nested specs in its arguments are built first.

    Args:
        spec: ``{_target_: ..., **kwargs}``; anything else is returned as is (lists and dicts recursed).
        where: the config path, for error messages.
        extra: keyword arguments added by the engine.
    """
    if isinstance(spec, list):
        return [instantiate(x, f"{where}[{i}]") for i, x in enumerate(spec)]
    if not isinstance(spec, dict):
        return spec
    if "_target_" not in spec:
        return {k: instantiate(v, f"{where}.{k}") for k, v in spec.items()}
    fn = locate(str(spec["_target_"]), f"{where}._target_")
    kwargs = {k: instantiate(v, f"{where}.{k}") for k, v in spec.items() if k != "_target_"}
    kwargs.update(extra)
    sig = _signature(fn)
    if sig is not None:  # builtins without a signature: the call itself speaks
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}: cannot call `{spec['_target_']}` with {sorted(kwargs)}: {e}",
                              f"its signature is {getattr(fn, '__name__', 'target')}{sig}; fix the keys under `{where}`") from None
    try:
        return fn(**kwargs)
    except TrainguardError:
        raise
    except Exception as e:  # the user's constructor: say which one, keep the cause for --debug
        raise RunFailed(f"{where}: `{spec['_target_']}` raised {type(e).__name__}: {first_line(e)}",
                        "the error is in that code or in what it reads (a path, a split name, a download); "
                        "re-run with --debug for the traceback") from e


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None
