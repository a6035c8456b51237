"""Loading a config: YAML files with ``extends:``, the hardware-profile overlay, ``--set``.

The one precedence rule lives in :func:`resolve_config`:
defaults < hardware profile < run YAML (with ``extends:``) < ``--set``.
No torch import here, except through ``hardware: auto`` (which must probe the device).
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from trainguard.config.schema import Config
from trainguard.errors import ConfigError
from trainguard.yamlfile import no_duplicate_keys, read_text

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_UNION_BRANCH = re.compile(r"(int|float|bool|str|none|literal\[.*\]|function-\w+\[.*\]|\w+Config)")  # pydantic's loc of a union member


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping with ``yaml.safe_load``; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}", "check the path; configs are resolved relative to the current directory")
    text = read_text(p)
    try:
        data = yaml.safe_load(text)
        no_duplicate_keys(text, p)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error at {where}: {problem}",
                          "fix the YAML at that line (indentation, a missing ':' or an unclosed quote/bracket)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must contain a YAML mapping at the top level, got {type(data).__name__}",
                          "start the file with keys such as `model:`, `data:`, `train:`")
    return data


def deep_merge(base: dict, top: dict) -> dict:
    """Merge ``top`` over ``base``: mappings merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "_target_" not in v:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_with_extends(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a config file, first merging the file(s) it ``extends:`` (paths relative to it)."""
    p = Path(path).resolve()
    if p in _seen:
        raise ConfigError(f"`extends:` cycle: {' -> '.join(str(s) for s in (*_seen, p))}", "remove one of the extends entries")
    data = read_yaml(path)
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise ConfigError(f"{path}: `extends` must be a path or a list of paths", "e.g. `extends: base.yaml`")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, load_yaml_with_extends(p.parent / parent, (*_seen, p)))
    return deep_merge(merged, data)


def parse_override(item: str) -> dict[str, Any]:
    """Turn ``a.b.c=VALUE`` into ``{"a": {"b": {"c": VALUE}}}``; VALUE parses as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} is not KEY=VALUE", "write e.g. --set train.max_steps=50")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r} has an empty key", "write e.g. --set optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads `1e-4` as a string; everyone means a number
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (for did-you-mean suggestions)."""
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        inner = [a for a in get_args(ann) if a is not type(None)]
        ann = inner[0] if len(inner) == 1 else ann  # an optional section: `MlflowConfig | None`
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def format_validation_error(err: ValidationError, source: str) -> ConfigError:
    """One ConfigError naming the file, the key path and the fix for the first problem."""
    lines, hint = [], None
    branches: dict[str, int] = {}  # a key's line, where a union's other members add to it
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(x) for x in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            known = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            lines.append(f"unknown key `{path}`")
            if close:
                parent = ".".join(str(x) for x in loc[:-1])
                hint = hint or f"did you mean `{(parent + '.') if parent else ''}{close[0]}`?"
            else:
                hint = hint or f"known keys here: {', '.join(known)}"
        else:
            loc = tuple(x for x in loc if not (isinstance(x, str) and _UNION_BRANCH.fullmatch(x)))
            path = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            if path in branches:  # another member of the same union (`int | "auto"`): one line, "... or 'auto'"
                lines[branches[path]] = lines[branches[path]].replace(" (got ", f" or {msg.removeprefix('Input should be ')} (got ", 1)
                continue
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) and "input" in e else ""
            branches[path] = len(lines)
            lines.append(f"`{path}`: {msg}{shown}")
            key = ".".join(str(x) for x in loc[:next((i for i, x in enumerate(loc) if isinstance(x, int)), len(loc))])
            hint = hint or f"fix `{path}` in {source} or with --set {key}=..."
    return ConfigError(f"invalid config {source}: " + "; ".join(lines), hint or "see docs/config.md for every key")


def validate(raw: dict[str, Any], source: str) -> Config:
    """Validate a merged mapping into a :class:`Config`, turning pydantic errors into ConfigError."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    if train.get("epochs") is not None and "max_steps" in train:  # as written: a run sets max_steps from epochs later
        raise ConfigError(f"invalid config {source}: both train.max_steps ({train['max_steps']}) and train.epochs "
                          f"({train['epochs']}) are set", "set one of them; to override epochs for one run: "
                          "--set train.epochs=null --set train.max_steps=N")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, source) from None


def resolve_config(path: str | Path | None = None, *, profile: str | None = None,
                   overrides: list[str] | None = None, raw: dict | None = None):
    """Resolve the run config with the one precedence rule.

    defaults < hardware profile < run YAML (with ``extends:``) < ``--set``.
    ``--profile`` (``profile=``) overrides ``hardware:`` from the YAML.

    Returns:
        ``(Config, Profile, why)`` where ``why`` says how the profile was chosen.
    """
    from trainguard.hardware.profiles import choose_profile

    source = str(path) if path is not None else "<python>"
    user = load_yaml_with_extends(path) if path is not None else {}
    if raw:
        user = deep_merge(user, raw)
    for item in overrides or []:
        user = deep_merge(user, parse_override(item))
    if profile is not None:
        user["hardware"] = profile
    hw = user.get("hardware", "auto")
    if not isinstance(hw, str):
        raise ConfigError(f"invalid config {source}: `hardware` must be a profile name, a path or `auto`",
                          "run `trainguard profiles` to list the profiles")
    prof, why = choose_profile(hw, base_dir=Path(path).parent if path is not None else Path.cwd())
    merged = deep_merge(prof.config_overlay(), user)
    return validate(merged, source), prof, why
