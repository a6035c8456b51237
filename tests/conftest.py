import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
os.chdir(REPO)  # `_target_: tests.toys:...` resolves from the repo root, as a user's module would
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def read_jsonl(path) -> list[dict]:
    """The rows of a metrics.jsonl / events.jsonl file."""
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def toy_config(**sections) -> dict:
    """A tiny, fast run config (an MLP on blobs); sections given here are merged over it."""
    cfg = {
        "hardware": "cpu",
        "seed": 0,
        "model": {"_target_": "tests.toys:MLP"},
        "data": {"train": {"_target_": "tests.toys:Blobs", "n": 256},
                 "val": {"_target_": "tests.toys:Blobs", "n": 64, "sample_seed": 1}},
        "optim": {"lr": 0.01},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 40, "batch_size": 16, "log_every": 5},
        "checkpoint": {"every_steps": 10, "keep_last": 2},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


@pytest.fixture(autouse=True)
def _autoconfig_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own autoconfig cache: nothing leaks between tests or from the user's."""
    monkeypatch.setenv("TRAINGUARD_CACHE_DIR", str(tmp_path_factory.mktemp("tgcache")))


@pytest.fixture
def write_config(tmp_path):
    """Write a config dict (toy defaults merged) to a YAML file and return its path."""
    def _write(name: str = "toy", **sections) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(toy_config(**sections), sort_keys=False))
        return path
    return _write


@pytest.fixture
def cli():
    """Run the real CLI in-process: returns (exit_code, output)."""
    from typer.testing import CliRunner

    from trainguard.cli import app

    def _run(*args: str):
        result = CliRunner().invoke(app, [str(a) for a in args])
        return result.exit_code, result.output
    return _run


def pytest_collection_modifyitems(config, items):
    """GPU tests (marked `gpu`) are skipped where no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
