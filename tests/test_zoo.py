"""The zoo (issue 21): models nobody here wrote (tests/zoo.py: transformers architectures from tiny
configs and nanoGPT's model.py), each through the real CLI: `diagnose` (no `fail` on a healthy
model), 20 steps of `train` (the loss falls), `autoconfig --profile gtx1650`, and a
`--memory-budget` run that splits its too-large micro-batch. Part of the default suite (it is not
skipped in CI); it skips only where transformers is not installed.

Cost: the runs are shared (the 20-step run, at micro-batch 4 under a large simulated budget,
measures the peak that sets the split run's budget), models are a few ten thousand parameters.
"""

import json

import pytest
import yaml

from tests.conftest import read_jsonl

pytest.importorskip("transformers")

from tests.zoo import HEALTHY, ZOO, zoo_config  # noqa: E402

pytestmark = pytest.mark.slow
MODELS = list(ZOO)
MEASURE = "10GB"  # simulated, never reached: the run's peak is counted (and logged) all the same


def _write(tmp_path, name: str, **sections):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(zoo_config(name, **sections), sort_keys=False))
    return path


def _events(run_dir, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == kind]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is as fast, and spends no CPU spinning for a busy core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def peaks() -> dict:
    """The 20-step run's peak device memory at micro-batch 4, per model (filled by test_train)."""
    return {}


@pytest.mark.parametrize("name", MODELS)
def test_diagnose_refuses_no_healthy_model(cli, tmp_path, name):
    code, out = cli("diagnose", "--json", "--config", _write(tmp_path, name), "--run-dir", tmp_path / "run")
    checks = {c["name"]: c for c in json.loads(out[out.index("{"):])["checks"]}
    failed = {n: c["message"] for n, c in checks.items() if c["status"] == "fail"}
    assert code == 0 and not failed, failed
    assert checks["model.forward"]["status"] == "pass"
    coupling = checks["model.batch_coupling"]
    if name in HEALTHY:
        assert coupling["status"] == "pass", coupling
    else:  # CLIP: the contrastive loss couples the batch
        assert coupling["status"] == "warn" and "couples the samples" in coupling["message"], coupling
    if name in ("opt", "bart"):  # positional-embedding subclasses: judged by what they look up
        assert checks["data.indices"]["status"] == "pass", checks["data.indices"]


@pytest.mark.parametrize("name", MODELS)
def test_train_20_steps_and_the_loss_falls(cli, tmp_path, name, peaks):
    run = tmp_path / "run"
    code, out = cli("train", "--config", _write(tmp_path, name, train={"micro_batch_size": 4}), "--run-dir", run,
                    "--memory-budget", MEASURE)
    assert code == 0, out
    metrics = [m for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]
    assert metrics[-1]["step"] == 20 and metrics[-1]["loss"] < 0.9 * metrics[0]["loss"], metrics
    peaks[name] = json.loads((run / "summary.json").read_text())["peak_memory_bytes"]
    coupled = _events(run, "batch_coupled")  # 2 micro-batches per step
    assert len(coupled) == (0 if name in HEALTHY else 1), coupled


@pytest.mark.parametrize("name", MODELS)
def test_autoconfig_for_a_gtx1650(cli, tmp_path, name):
    code, out = cli("autoconfig", "--config", _write(tmp_path, name), "--profile", "gtx1650", "--json")
    assert code == 0, out
    tuning = json.loads(out[out.index("{"):])
    assert tuning["micro_batch_size"] >= 1 and tuning["profile"] == "gtx1650", tuning


@pytest.mark.parametrize("name", MODELS)
def test_a_memory_budget_too_small_for_the_micro_batch_splits_it(cli, tmp_path, name, peaks):
    if name not in peaks:
        pytest.skip("needs test_train's measured peak (run the zoo's tests together)")
    budget = int(peaks[name] * 1.02) + 8_000  # fits micro-batch 4 (measured), not 8
    run = tmp_path / "run"
    code, out = cli("train", "--config", _write(tmp_path, name, train={"max_steps": 3, "micro_batch_size": 8}),
                    "--run-dir", run, "--memory-budget", f"{budget // 1000}KB")
    assert code == 0, out
    splits = [e for e in _events(run, "oom") if e.get("new_micro_batch_size")]
    assert splits and splits[0]["micro_batch_size"] == 8 and splits[-1]["new_micro_batch_size"] <= 4, splits
    assert len(_events(run, "batch_coupled")) == (0 if name in HEALTHY else len(splits))
