"""Reading YAML files (run configs and hardware profiles alike): the text, with a byte that is not
UTF-8 named by line and column, and mappings without duplicate keys. Below config/ and hardware/:
imports nothing of trainguard's but its errors. Loading stays ``yaml.safe_load``, by the callers."""

from __future__ import annotations

from pathlib import Path

import yaml

from trainguard.errors import ConfigError


def read_text(p: Path) -> str:
    """The file's text; a byte that is not UTF-8 (even in a comment) is named by line and column."""
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror or e}", "check the file's permissions") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = len(raw[raw.rfind(b"\n", 0, e.start) + 1:e.start].decode("utf-8", errors="replace")) + 1  # in characters
        raise ConfigError(f"{p}:{line}:{column}: byte 0x{raw[e.start]:02x} is not valid UTF-8 (byte {e.start} of the file)",
                          "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 old.yaml > new.yaml`, or your "
                          "editor's 'save with encoding'); a character pasted from another program is a common cause") from None


def no_duplicate_keys(text: str, p: Path) -> None:
    """A key written twice in one mapping (YAML would keep the last, silently) is an error naming both
    lines. Checked on the composed node tree (``yaml.compose`` with the SafeLoader): nothing is constructed."""
    _walk(yaml.compose(text, Loader=yaml.SafeLoader), p)


def _walk(node: yaml.Node | None, p: Path, path: str = "", seen: set | None = None) -> None:
    """Every mapping below ``node``, its keys named by their dotted path (``train.batch_size``)."""
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias repeats a node already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                key = f"{path}.{k.value}" if path else k.value
                line = k.start_mark.line + 1
                if (k.tag, k.value) in first:
                    raise ConfigError(f"{p}: duplicate key `{key}` at lines {first[k.tag, k.value]} and {line}",
                                      "keep one of the two (YAML would silently use the last one)")
                first[k.tag, k.value] = line
                _walk(v, p, key, seen)
            else:
                _walk(v, p, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _walk(v, p, f"{path}[{i}]", seen)
