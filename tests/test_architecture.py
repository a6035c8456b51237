"""The shape of the code, read from the source: no import cycles between trainguard's modules
(function-level imports included), arrows pointing down the layers, no module over 400 lines, and
no strategy branch in the loop (docs/architecture.md)."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

from torch import nn

import trainguard
from trainguard import build
from trainguard.engine.strategy import SingleProcess

ROOT = Path(trainguard.__file__).parent
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports() -> dict[str, set[str]]:
    """Per module, the trainguard modules it imports anywhere in its source. ``from pkg import name``
    is an import of ``pkg.name`` when that is a module, else of ``pkg`` (its ``__init__``)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in found:
                while target and target not in mods:  # an attribute of a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    graph = imports()
    assert "trainguard.engine.loop" in graph and graph["trainguard.engine.loop"]  # the parse found imports
    assert cycles(graph) == []


# what each lower layer may not import (each package named includes its modules)
FORBIDDEN = {
    "trainguard.engine": ("guards", "callbacks", "checkpoint", "memory", "diagnose", "run", "run_dir", "build",
                          "cli", "launch", "report"),
    "trainguard.distributed": ("engine", "guards", "callbacks", "checkpoint", "memory", "diagnose", "run", "run_dir",
                               "build", "cli", "launch", "report"),
    "trainguard.config": ("engine", "distributed", "guards", "callbacks", "checkpoint", "memory", "diagnose", "run",
                          "run_dir", "build", "cli", "launch", "report"),
    "trainguard.hardware": ("config", "engine", "distributed", "guards", "callbacks", "checkpoint", "memory", "diagnose",
                            "run", "run_dir", "build", "cli", "launch", "report"),
}


def test_arrows_point_down_the_layers():
    upward = []
    for name, targets in imports().items():
        for layer, above in FORBIDDEN.items():
            if name == layer or name.startswith(layer + "."):
                upward += [f"{name} -> {t}" for t in targets
                           if any(t == f"trainguard.{a}" or t.startswith(f"trainguard.{a}.") for a in above)]
    assert upward == []


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_loop_has_no_strategy_branch():
    """How the step runs over processes is the strategy's (engine/strategy/): the loop does not ask."""
    src = (ROOT / "engine" / "loop.py").read_text()
    for word in ("world.size", "sharded", "grad_views", "torch.distributed", "from trainguard import distributed"):
        assert word not in src, word


class Wrapped(SingleProcess):
    """A fourth strategy as one would be added: its forwards through a wrapper module (as torch's
    DistributedDataParallel wraps), a context around each micro-batch (where DDP's ``no_sync`` goes)."""

    name = "wrapped"

    def __init__(self, world):
        super().__init__(world)
        self.lasts: list[bool] = []

    def forward_module(self, model, compile):
        return nn.DataParallel(model)  # without a GPU it calls the module; its forward takes (*inputs, **kwargs)

    def micro_context(self, trainer, last):
        self.lasts.append(last)
        return contextlib.nullcontext()


def test_a_fourth_strategy_is_one_class(cli, write_config, tmp_path, monkeypatch):
    """The seams a new strategy needs exist: the field filter sees the user's forward() through a
    wrapper (``idx``, which MLP.forward does not take, is still dropped), and the accumulation calls the
    strategy around each micro-batch, telling it which is the last."""
    made: list[Wrapped] = []
    monkeypatch.setattr(build, "select", lambda name, world: made.append(Wrapped(world)) or made[-1])
    cfg = write_config(train={"max_steps": 3, "batch_size": 8, "micro_batch_size": 4, "log_every": 1},
                       checkpoint={"every_steps": 0})
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 0, out
    assert made and made[0].lasts == [False, True] * 3
