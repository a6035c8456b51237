"""End-to-end runs of the real CLI on CPU: the loss falls and the run directory has the contract's files."""

import json

import torch

from tests.conftest import read_jsonl

SUMMARY_FIELDS = {"status", "steps", "samples", "skipped_samples", "skipped_steps", "final_loss", "micro_batch_size",
                  "grad_accum", "precision", "device", "profile", "error", "wall_s"}



def test_tiny_run_through_cli(cli, write_config, tmp_path):
    cfg = write_config(train={"max_steps": 40, "batch_size": 16, "micro_batch_size": 8, "log_every": 5, "eval_every": 20})
    run = tmp_path / "run"
    code, out = cli("train", "--config", cfg, "--run-dir", run)
    assert code == 0, out
    for name in ("config.yaml", "metrics.jsonl", "events.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["status"] == "completed" and summary["steps"] == 40 and summary["samples"] == 640
    assert summary["micro_batch_size"] == 8 and summary["grad_accum"] == 2 and summary["precision"] == "fp32"
    assert summary["profile"] == "cpu" and summary["error"] is None

    metrics = read_jsonl(run / "metrics.jsonl")
    train = [m for m in metrics if m["split"] == "train"]
    assert all({"step", "split", "loss", "lr", "samples_per_s"} <= set(m) for m in train)
    assert train[-1]["loss"] < 0.6 * train[0]["loss"], (train[0], train[-1])
    val = [m for m in metrics if m["split"] == "val"]
    assert [m["step"] for m in val] == [20, 40] and "accuracy" in val[-1]

    events = read_jsonl(run / "events.jsonl")
    assert all({"step", "type", "reason"} <= set(e) for e in events)
    assert events[-1]["type"] == "end"

    ckpts = sorted((run / "checkpoints").iterdir())
    assert ckpts[-1].name == "step_0000040"  # a completed run ends with a checkpoint of its last step
    assert len(ckpts) == 2                   # keep_last: 2
    state = torch.load(ckpts[-1] / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    resolved = (run / "config.yaml").read_text()
    assert "micro_batch_size: 8" in resolved and "precision: fp32" in resolved and "hardware: cpu" in resolved


def test_quickstart_config_smoke(cli, tmp_path):
    """The shipped quickstart, shortened: it trains on the stdlib text and the loss falls."""
    run = tmp_path / "qs"
    code, out = cli("train", "--config", "configs/quickstart.yaml", "--run-dir", run,
                    "--set", "train.max_steps=40", "--set", "train.log_every=10", "--set", "train.eval_every=0")
    assert code == 0, out
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m["split"] == "train"]
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]


def test_python_api_and_yaml_hook(tmp_path):
    import trainguard
    from tests.conftest import toy_config

    cfg = toy_config(train={"max_steps": 6, "batch_size": 8, "log_every": 2})
    summary = trainguard.train(cfg, overrides=["train.max_steps=5"], run_dir=tmp_path / "api")
    assert summary["status"] == "completed" and summary["steps"] == 5


def test_waiting_for_data_is_measured_and_an_input_bound_run_says_so(cli, tmp_path, write_config):
    """A dataset that takes 25 ms per item, loaded in the training process: the steps mostly wait."""
    import json

    from tests.conftest import read_jsonl

    slow = write_config("slow", data={"train": {"_target_": "tests.toys:SlowBlobs", "delay": 0.025}, "val": None, "num_workers": 0},
                        train={"max_steps": 12, "batch_size": 8, "log_every": 4}, checkpoint={"every_steps": 0})
    code, out = cli("train", "--config", slow, "--run-dir", tmp_path / "slow")
    assert code == 0, out
    summary = json.loads((tmp_path / "slow" / "summary.json").read_text())
    lines = [m for m in read_jsonl(tmp_path / "slow" / "metrics.jsonl") if m["split"] == "train"]
    # 80 ms of loading per step against about 1 ms of compute (checkpoint writes, on a slow disk, are not waiting)
    assert summary["input_wait_fraction"] > 0.5 and all(m["input_wait_fraction"] > 0.5 for m in lines), (summary, lines)
    assert "input-bound" in out and "data.num_workers" in out and summary["input_bound"]
    assert 0 < summary["startup_s"] < summary["wall_s"] + 60
    fast = write_config("fast", model={"_target_": "tests.toys:MLP", "hidden": 512}, data={"val": None, "num_workers": 0},
                        train={"max_steps": 12, "batch_size": 8}, checkpoint={"every_steps": 0})
    code, out = cli("train", "--config", fast, "--run-dir", tmp_path / "fast")
    fast_summary = json.loads((tmp_path / "fast" / "summary.json").read_text())
    assert code == 0 and fast_summary["input_wait_fraction"] < summary["input_wait_fraction"]
