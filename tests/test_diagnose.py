"""`trainguard diagnose` (issue 8), through the real CLI with --json: every fault is real (a real
dataset, model or config), except the disk and /dev/shm sizes, which are simulated."""

import json
import shutil
from collections import namedtuple

import pytest
import yaml

from tests.conftest import read_jsonl, toy_config

TOKENS = dict(model={"_target_": "tests.toys:BagOfTokens"}, data={"train": {"_target_": "tests.toys:TokenRows"}, "val": None})


def diagnose(tmp_path, *args, **sections):
    """Run `trainguard diagnose --json` on a toy config with ``sections``; returns (exit code, {name: check}, report)."""
    from typer.testing import CliRunner

    from trainguard.cli import app

    argv = ["diagnose", "--json", *map(str, args)]
    if sections is not None and "--config" not in argv and not sections.pop("no_config", False):
        path = tmp_path / "diag.yaml"
        path.write_text(yaml.safe_dump(toy_config(**sections), sort_keys=False))
        argv += ["--config", str(path), "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, argv)
    assert result.stdout.strip(), result.output
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] == (not any(c["status"] == "fail" for c in report["checks"]))
    for c in report["checks"]:
        assert set(c) == {"name", "status", "message", "hint"} and c["status"] in ("pass", "warn", "fail", "skip")
    return result.exit_code, checks, report


def failed(checks):
    return {n: c for n, c in checks.items() if c["status"] == "fail"}


def test_a_healthy_config_passes_every_section(tmp_path):
    code, checks, report = diagnose(tmp_path)
    assert code == 0 and report["ok"], failed(checks)
    for section in ("env.", "hardware.", "config.", "data.", "model.", "memory."):
        assert any(n.startswith(section) for n in checks), section
    assert checks["model.forward"]["status"] == "pass" and "loss" in checks["model.forward"]["message"]
    assert checks["data.fields"]["status"] == "pass" and "left out: idx" in checks["data.fields"]["message"]
    assert checks["memory.fit"]["status"] == "pass" and "measured" in checks["memory.fit"]["message"]


def test_without_a_config_only_the_environment_and_hardware(tmp_path):
    code, checks, report = diagnose(tmp_path, no_config=True)
    assert code == 0 and report["ok"]
    assert {n.split(".")[0] for n in checks} == {"env", "hardware"}
    assert checks["env.numpy"]["status"] == "pass"


@pytest.mark.parametrize("case, sections, check, words", [
    ("empty dataset", dict(data={"train": {"_target_": "tests.toys:Blobs", "n": 0}}), "data.build", ["empty", "split name"]),
    ("mismatched model", dict(model={"_target_": "tests.toys:WrongWidth"}), "model.forward", ["encoder.0", "(*, 10)", "(16, 8)"]),
    ("missing forward argument", dict(model={"_target_": "tests.toys:NeedsMask"}), "data.fields", ["mask", "data.fields"]),
    ("float embedding indices", dict(TOKENS, data={"train": {"_target_": "tests.toys:FloatTokens"}, "val": None}), "data.indices",
     ["Embedding `embed`", "float32", "int"]),
    ("ids past the vocabulary", dict(model={"_target_": "tests.toys:BagOfTokens", "vocab": 20}, data=TOKENS["data"]), "data.indices",
     ["outside [0, 20)", "vocab"]),
    ("NaN in the data", dict(data={"train": {"_target_": "tests.toys:NanBlobs", "every": 5}}), "data.values", ["NaN/Inf", "`x`", "max_skip_fraction"]),
    ("a precision the profile cannot do", dict(hardware="gtx1650", train={"precision": "bf16"}), "hardware.precision", ["bf16", "gtx1650"]),
    ("a dataset that raises", dict(data={"train": {"_target_": "tests.toys:MissingFiles"}}), "data.build",
     ["FileNotFoundError", "/nonexistent/data", "data.train"]),
    ("a field mapped to no argument", dict(data={"fields": {"idx": "index"}}), "data.fields", ["index", "no such argument"]),
])
def test_each_failure_is_found_with_its_fix(tmp_path, case, sections, check, words):
    code, checks, report = diagnose(tmp_path, **sections)
    assert code == 1 and not report["ok"], case
    assert checks[check]["status"] == "fail", (case, failed(checks) or checks[check])
    assert checks[check]["hint"], case
    for w in words:
        assert w in checks[check]["message"] + checks[check]["hint"], (case, w, checks[check])


def test_nan_in_a_few_samples_is_a_warning_within_the_skip_budget(tmp_path):
    code, checks, _ = diagnose(tmp_path, data={"train": {"_target_": "tests.toys:NanBlobs", "every": 50}}, guard={"max_skip_fraction": 0.1})
    assert code == 0 and checks["data.values"]["status"] == "warn" and "skip" in checks["data.values"]["hint"]


def test_a_model_that_breaks_compile_falls_back_to_eager_in_diagnose_and_in_train(tmp_path, cli, write_config):
    code, checks, _ = diagnose(tmp_path, model={"_target_": "tests.toys:CustomOpMLP"}, train={"compile": True})
    c = checks["model.compile"]
    assert code == 0 and c["status"] == "warn" and "torch.compile failed" in c["message"] and "eager" in c["message"], c
    cfg = write_config("compiled", model={"_target_": "tests.toys:CustomOpMLP"}, train={"compile": True, "max_steps": 5})
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "compiled")
    assert code == 0, out
    assert "torch.compile failed" in out and "eager" in out
    events = read_jsonl(tmp_path / "compiled" / "events.jsonl")
    assert any(e["type"] == "preflight" and e.get("check") == "model.compile" for e in events)


def test_a_profile_for_another_device_is_a_warning_and_memory_is_forecast_for_its_card(tmp_path):
    code, checks, _ = diagnose(tmp_path, hardware="gtx1650")
    assert code == 0, failed(checks)
    assert checks["config.profile"]["status"] == "warn" and "hardware: auto" in checks["config.profile"]["hint"]
    mem = checks["memory.fit"]
    assert mem["status"] == "pass" and "predicted" in mem["message"] and "gtx1650" in mem["message"] and "autoconfig picks" in mem["message"]


def test_memory_that_does_not_fit_warns_with_split_and_fails_with_stop(tmp_path):
    big = dict(model={"_target_": "tests.toys:MLP", "hidden": 256}, train={"batch_size": 64, "micro_batch_size": 64})
    code, checks, _ = diagnose(tmp_path, "--memory-budget", "120KB", **big)
    mem = checks["memory.fit"]
    assert code == 0 and mem["status"] == "warn" and "split" in mem["message"] and "autoconfig picks 6 micro-batches of 11 or 10" in mem["message"], mem
    assert "train.micro_batch_size: 11" in mem["hint"]  # the fewest that fit: 6 (a divisor of 64 needed 8 of 8)
    assert checks["memory.first_step"]["status"] == "warn"  # the shared preflight ran out too, as train's would
    code, checks, _ = diagnose(tmp_path, "--memory-budget", "120KB", **big, guard={"on_oom": "stop"})
    assert code == 1 and checks["memory.fit"]["status"] == "fail"
    code, checks, _ = diagnose(tmp_path, "--memory-budget", "20KB", **big)
    assert code == 1 and ("memory.fit" in failed(checks) or "memory.first_step" in failed(checks)), failed(checks)


Usage = namedtuple("Usage", "total used free")


def _small(where: str, free: int):
    real = shutil.disk_usage

    def fake(path):
        return Usage(free, 0, free) if str(path).startswith(where) else real(path)
    return fake


def test_too_little_shared_memory_for_loader_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", _small("/dev/shm", 512_000))  # a container's small /dev/shm, simulated
    images = dict(model={"_target_": "tests.toys:SmallCNN"}, train={"batch_size": 64})
    data = {"train": {"_target_": "tests.toys:TinyImages"}, "val": None}
    code, checks, _ = diagnose(tmp_path, **images, data={**data, "num_workers": 2})
    if checks["hardware.shm"]["status"] == "skip":
        pytest.skip("no /dev/shm on this system")
    assert code == 1 and checks["hardware.shm"]["status"] == "fail" and "--shm-size" in checks["hardware.shm"]["hint"]
    code, checks, _ = diagnose(tmp_path, **images, data={**data, "num_workers": 0})
    assert checks["hardware.shm"]["status"] == "pass"


def test_too_little_disk_for_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", _small(str(tmp_path), 10_000))  # simulated: a full disk
    code, checks, _ = diagnose(tmp_path)
    assert code == 1 and checks["hardware.disk"]["status"] == "fail" and "checkpoint" in checks["hardware.disk"]["message"]


def test_harmful_environment_and_parameters_without_gradient_are_warnings(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    code, checks, _ = diagnose(tmp_path, model={"_target_": "tests.toys:WithUnused"})
    assert code == 0
    assert checks["env.variables"]["status"] == "warn" and "CUDA_LAUNCH_BLOCKING" in checks["env.variables"]["message"]
    assert checks["model.gradients"]["status"] == "warn" and "spare.weight" in checks["model.gradients"]["message"]


def test_a_config_that_does_not_validate_exits_2_with_the_check(tmp_path):
    code, checks, report = diagnose(tmp_path, train={"max_stepz": 3})
    assert code == 2 and checks["config.valid"]["status"] == "fail" and "max_steps" in checks["config.valid"]["hint"]


@pytest.mark.parametrize("sections", [
    dict(model={"_target_": "tests.toys:WrongWidth"}),
    dict(model={"_target_": "tests.toys:NeedsMask"}),
    dict(TOKENS, data={"train": {"_target_": "tests.toys:FloatTokens"}, "val": None}),
    dict(data={"train": {"_target_": "tests.toys:Blobs", "n": 0}, "val": None}),
])
def test_diagnose_and_train_agree(tmp_path, cli, write_config, sections):
    """The same broken config: diagnose fails a check, train stops before step 1 with the same message."""
    code, checks, _ = diagnose(tmp_path, **sections)
    (name, check), = failed(checks).items()
    cfg = write_config("agree", **sections)
    tcode, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "agree")
    assert code == 1 and tcode == 1, out
    assert check["message"].split(":")[0] in out and "Traceback" not in out, (check, out)


def test_the_table_fits_80_columns(tmp_path, write_config):
    import subprocess
    import sys

    from tests.conftest import REPO

    cfg = write_config("table", model={"_target_": "tests.toys:NeedsMask"})
    p = subprocess.run([sys.executable, "-m", "trainguard", "diagnose", "--config", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, env={**__import__("os").environ, "COLUMNS": "80"})
    assert p.returncode == 1, p.stderr
    lines = p.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80, "\n".join(lines)
    assert any(line.lstrip().startswith("fail") and "data.fields" in line for line in lines)
    assert "FAILED" in lines[-1]


def test_the_micro_batch_diagnose_finds_is_the_one_train_starts_with(tmp_path, cli, write_config):
    sections = dict(model={"_target_": "tests.toys:MLP", "hidden": 256}, data={"val": None},
                    train={"max_steps": 4, "batch_size": 64, "micro_batch_size": "auto"})
    code, checks, _ = diagnose(tmp_path, "--memory-budget", "120KB", **sections)
    mem = checks["memory.fit"]
    assert code == 0 and mem["status"] == "pass" and "measured" in mem["message"], mem
    split = mem["message"].split(" peaks at")[0]  # "micro-batch 8 x 8 accumulation", or "10 micro-batches of 7 or 6"
    cfg = write_config("tuned", **sections)
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "tuned", "--memory-budget", "120KB")
    assert code == 0 and "from the cache" in out and f"autoconfig: {split} = batch 64" in out, (split, out)
