"""Generate docs/config.md from the config schema's field descriptions.

    python scripts/gen_config_reference.py          # rewrite docs/config.md
A test fails when docs/config.md is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainguard.config.schema import Config  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`"
    return f"`{field.default!r}`" if field.default is not None else "`null`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows, sections = [], []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sections.append((f"{prefix}{name}", ann, f.description))
            continue
        rows.append(f"| `{prefix}{name}` | {_default(f)} | {f.description} |")
    out = []
    if rows:
        out += ["| key | default | meaning |", "| --- | --- | --- |", *rows, ""]
    for path, sub, desc in sections:
        out += [f"## `{path}`", "", (sub.__doc__ or desc or "").strip(), ""]
        out += _rows(sub, f"{path}.")
    return out


def render() -> str:
    head = [
        "# Config reference",
        "",
        "Generated from `trainguard/config/schema.py` by `python scripts/gen_config_reference.py`; do not edit by hand.",
        "",
        "Precedence: built-in defaults < hardware profile < run YAML (with `extends:`) < `--set key=value`.",
        "`--profile` overrides `hardware:`. Unknown keys are errors. Anything with `_target_` is built by",
        "importing and calling it (`pkg.mod:attr` or `pkg.mod.attr`): that runs user code, so only run configs you trust.",
        "",
        "## top level",
        "",
    ]
    return "\n".join(head + _rows(Config)).rstrip() + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
