"""`trainguard report` on real runs: finished with guard events, failed, running, killed."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, read_jsonl, toy_config
from tests.test_guards import BUDGET, DIVERGE

FAULTS = dict(model={"_target_": "tests.toys:Hog", "rows": 4, "mb": 64},
              data={"train": {"_target_": "tests.toys:MarkedBlobs", "n": 256, "nan_ids": [26], "heavy_ids": [36]},
                    "shuffle": False, "num_workers": 0},
              train={"max_steps": 30, "batch_size": 16, "log_every": 1, "eval_every": 10})


def _train(cli, tmp_path, name, *extra, **sections):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(toy_config(**sections), sort_keys=False))
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / name, *extra)
    return code, out


def _report(cli, *run_dirs, extra=()):
    code, out = cli("report", *map(str, run_dirs), "--json", *extra)
    assert code == 0, out
    return json.loads(out)


def test_report_of_runs_with_skips_oom_splits_and_a_rollback(cli, tmp_path):
    pytest.importorskip("matplotlib")
    code, out = _train(cli, tmp_path, "faults", "--memory-budget", "32MB", checkpoint={"best_metric": "loss"}, **FAULTS)
    assert code == 0, out
    code, out = _train(cli, tmp_path, "rollback", guard={"on_nonfinite": "rollback", **BUDGET}, **DIVERGE)
    assert code == 0, out

    faults = _report(cli, tmp_path / "faults")
    row = faults["runs"][0]
    assert row["status"] == "completed" and row["steps"] == 30 and row["max_steps"] == 30
    # sample 26 is NaN: found and dropped at step 2, left out up front at step 18 (16 steps an epoch)
    assert row["skips"] == {"non-finite loss": {"samples": 1, "steps": 1},
                            "non-finite loss, sample known from an earlier step": {"samples": 1, "steps": 1}}
    assert row["skipped_samples"] == 2
    assert row["oom_splits"] == [{"step": 3, "from": 16, "to": 8}, {"step": 3, "from": 8, "to": 4}]
    assert row["micro_batch_size"] == 4 and row["peak_memory_bytes"] > 0 and row["val"]["loss"] > 0
    val = [m for m in read_jsonl(tmp_path / "faults" / "metrics.jsonl") if m["split"] == "val"]
    assert row["best"]["metric"] == "loss" and row["best"]["value"] == min(m["loss"] for m in val)
    png = tmp_path / "faults" / "report.png"
    assert faults["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    both = _report(cli, tmp_path / "faults", tmp_path / "rollback", extra=("--out", str(tmp_path / "cmp.png")))
    back = both["runs"][1]
    assert [r["to_step"] for r in back["rollbacks"]] == [25] and back["status"] == "completed"
    assert (tmp_path / "cmp.png").stat().st_size > 20_000

    code, table = cli("report", str(tmp_path / "faults"), str(tmp_path / "rollback"), "--out", str(tmp_path / "cmp.png"))
    assert code == 0 and "step 3: micro 16->8" in table and "rollbacks" in table and "curves:" in table
    assert f"loss {row['best']['value']:.4g} at step {row['best']['step']}" in table


def test_report_of_a_failed_run_names_the_error(cli, tmp_path):
    code, _ = _train(cli, tmp_path, "failed", guard={"on_nonfinite": "stop", **BUDGET}, **DIVERGE)
    assert code == 1
    row = _report(cli, tmp_path / "failed")["runs"][0]
    assert row["status"] == "failed" and "encoder.1" in row["error"] and row["steps"] == 29


def test_without_matplotlib_the_curve_is_drawn_in_the_terminal(cli, tmp_path, monkeypatch):
    code, out = _train(cli, tmp_path, "faults", "--memory-budget", "32MB", checkpoint={"best_metric": "loss"}, **FAULTS)
    assert code == 0, out
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the optional extra were not installed
    code, out = cli("report", str(tmp_path / "faults"))
    assert code == 0 and "curves:" not in out and "pip install matplotlib" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("loss |"))
    assert any(b in line for b in "▁▂▃▄▅▆▇█")
    marks = out.splitlines()[out.splitlines().index(line) + 1]
    assert "x" in marks and "M" in marks  # the skipped sample and the OOM split, under the curve
    assert not (tmp_path / "faults" / "report.png").exists()


def test_report_of_a_running_run_then_of_one_killed_with_kill_9(cli, tmp_path):
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(toy_config(train={"max_steps": 400, "batch_size": 16, "log_every": 1},
                                              hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.05}])))
    run_dir = tmp_path / "slow"
    proc = subprocess.Popen([sys.executable, "-m", "trainguard", "train", "--config", str(path), "--run-dir", str(run_dir)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run_dir / "metrics.jsonl").exists() or \
                len(read_jsonl(run_dir / "metrics.jsonl")) < 5:
            time.sleep(0.05)
        row = _report(cli, run_dir)["runs"][0]
        assert row["status"] == "running" and row["running"]["pid"] == proc.pid and row["steps"] >= 5
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    row = _report(cli, run_dir)["runs"][0]
    assert row["status"] == "died" and row["running"] is None and row["steps"] >= 5


def test_report_of_a_directory_that_is_not_a_run(cli, tmp_path):
    code, out = cli("report", str(tmp_path))
    assert code == 2 and "is not a run directory" in out and "hint:" in out


def test_tensorboard_gets_the_guard_events(cli, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out = _train(cli, tmp_path, "tb", "--memory-budget", "32MB", log={"tensorboard": True}, **FAULTS)
    assert code == 0, out
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalars, tensors = acc.Tags()["scalars"], acc.Tags()["tensors"]
    assert {"train/loss", "val/loss", "guard/skips", "guard/skipped_samples", "guard/ooms", "guard/micro_batch_size"} <= set(scalars)
    assert [(e.step, e.value) for e in acc.Scalars("guard/micro_batch_size")] == [(3, 8), (3, 4)]
    assert [e.step for e in acc.Scalars("guard/skipped_samples")] == [2, 18]
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("guard/skip/text_summary")]
    assert "guard/skip/text_summary" in tensors and any("samples [26]" in t for t in texts)


def test_a_skipped_step_of_a_large_batch_counts_all_its_samples(cli, tmp_path):
    """A batch of 1200 where every sample is NaN: a skipped step of 1200 samples (not a retry without the 256
    examined one by one, which left 944 counted), its count whole though events.jsonl keeps 1000 of its ids."""
    code, out = _train(cli, tmp_path, "large", model={"_target_": "tests.toys:BreaksAt", "at": 3},
                       data={"train": {"_target_": "tests.toys:Blobs", "n": 2400}, "val": None, "num_workers": 0},
                       train={"max_steps": 3, "batch_size": 1200, "micro_batch_size": 1200}, guard={"max_skip_fraction": 0.5})
    skips = [e for e in read_jsonl(tmp_path / "large" / "events.jsonl") if e["type"] == "skip"]
    assert skips and all(e["samples"] == 1200 and len(e["batch_ids"]) == 1000 for e in skips), out
    row = _report(cli, tmp_path / "large")["runs"][0]
    assert sum(k["samples"] for k in row["skips"].values()) == 1200 * len(skips) == row["skipped_samples"]
