"""Crash safety through the real CLI: kill -9 and rerun, corrupt checkpoints, SIGTERM, config changes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, toy_config

# LR schedule (warmup + cosine), workers, accumulation and dropout: everything exact resume must carry.
HARD = dict(
    model={"_target_": "tests.toys:DropoutMLP"},
    schedule={"name": "cosine", "warmup_steps": 5},
    data={"num_workers": 2},
    train={"max_steps": 40, "batch_size": 16, "micro_batch_size": 4, "log_every": 5, "eval_every": 10},
    checkpoint={"every_steps": 5, "keep_last": 3},
    log={"progress": False},
)


def write(tmp_path: Path, name: str, hooks=(), **sections) -> Path:
    cfg = toy_config(**{**HARD, **sections})
    cfg["hooks"] = list(hooks)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def start(config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainguard", "train", "--config", str(config), "--run-dir", str(run_dir), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(config: Path, run_dir: Path, *extra: str) -> tuple[int, str]:
    p = start(config, run_dir, *extra)
    out, _ = p.communicate(timeout=300)
    return p.returncode, out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name}: {proc.stdout.read()}"
        assert time.time() - t0 < timeout, f"timed out waiting for {path}"
        time.sleep(0.01)


def kill9_at(cfg: Path, run_dir: Path, step: int = 15) -> None:
    """Start ``cfg`` (a run slowed down by a Sleep hook) and kill -9 it once the checkpoint of ``step`` is committed."""
    proc = start(cfg, run_dir)
    wait_for(run_dir / "checkpoints" / f"step_{step:07d}", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def kill9_after_step_15(tmp_path: Path) -> tuple[Path, Path]:
    """Start the HARD run (slowed down), kill -9 it once its 3rd checkpoint (step 15) is committed."""
    cfg = write(tmp_path, "hard", hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.05}])
    run_dir = tmp_path / "run"
    kill9_at(cfg, run_dir)
    return cfg, run_dir


def final_weights(run_dir: Path) -> dict:
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return torch.load(last / "model.pt", weights_only=True)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the HARD config (no sleeping hook: hooks do not change the math)."""
    tmp = tmp_path_factory.mktemp("ref")
    code, out = run(write(tmp, "hard"), tmp / "run")
    assert code == 0, out
    return final_weights(tmp / "run")


def test_kill9_after_third_checkpoint_then_rerun_is_bitwise_exact(tmp_path, reference):
    cfg, run_dir = kill9_after_step_15(tmp_path)
    code, out = run(cfg, run_dir)  # the same command again
    assert code == 0, out
    assert "resumed from" in out
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e["type"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 15
    assert_bitwise_equal(final_weights(run_dir), reference)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert steps == sorted(set(steps)), "metrics after the resumed checkpoint are not duplicated"


def test_truncated_newest_checkpoint_falls_back_and_stays_exact(tmp_path, reference):
    cfg, run_dir = kill9_after_step_15(tmp_path)
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    model_pt = newest / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[: model_pt.stat().st_size // 2])
    code, out = run(cfg, run_dir)
    assert code == 0, out
    assert "warning" in out and newest.name in out and "checksum" in out
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["type"] == "checkpoint_corrupt" for e in events)
    resume = [e for e in events if e["type"] == "resume"][0]
    assert resume["step"] < int(newest.name.split("_")[1])
    assert_bitwise_equal(final_weights(run_dir), reference)


def test_sigterm_saves_and_exits_143_then_resumes(tmp_path):
    cfg = write(tmp_path, "long", hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.02}],
                train={"max_steps": 200, "batch_size": 16, "log_every": 10}, checkpoint={"every_steps": 50, "keep_last": 2})
    run_dir = tmp_path / "run"
    proc = start(cfg, run_dir)
    wait_for(run_dir / "metrics.jsonl", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 200
    step = summary["steps"]
    assert (run_dir / "checkpoints" / f"step_{step:07d}" / "manifest.json").is_file()
    assert f"interrupted at step {step}" in out
    code, out = run(cfg, run_dir)
    assert code == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 200
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "resume"] == [step]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_still_checkpoints(tmp_path, sig):
    """Ctrl-C in a terminal, and SLURM's scancel, signal every process of the job, the DataLoader
    workers included: the workers leave the stop to the trainer, which saves and exits 128+N."""
    # each step ends in a long C call, as a heavy backward does: the workers' SIGCHLD and the stop signal arrive together
    cfg = write(tmp_path, "long", hooks=[{"_target_": "tests.toys:BusyC", "seconds": 0.2}], data={"num_workers": 2},
                train={"max_steps": 400, "batch_size": 16, "log_every": 10}, checkpoint={"every_steps": 50, "keep_last": 2})
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "trainguard", "train", "--config", str(cfg), "--run-dir", str(run_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(run_dir / "metrics.jsonl", proc)
    time.sleep(1.0)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, out
    assert "Traceback" not in out and "race condition" not in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary["error"]
    assert (run_dir / "checkpoints" / f"step_{summary['steps']:07d}" / "manifest.json").is_file()


def test_changed_lr_on_resume_is_refused(cli, tmp_path):
    cfg = write(tmp_path, "small", train={"max_steps": 10, "batch_size": 16}, data={"num_workers": 0})
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 0, out
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run", "--set", "optim.lr=0.5")
    assert code == 2 and "optim.lr" in out and "hint:" in out and "Traceback" not in out
    # allowed changes: more steps, other logging and checkpoint cadence
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run", "--set", "train.max_steps=14",
                    "--set", "train.log_every=2", "--set", "checkpoint.every_steps=3")
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 14


def test_resume_never_starts_afresh_and_keeps_old_checkpoints(cli, tmp_path):
    cfg = write(tmp_path, "small", train={"max_steps": 6, "batch_size": 16}, data={"num_workers": 0})
    assert cli("train", "--config", cfg, "--run-dir", tmp_path / "run")[0] == 0
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run", "--resume", "never")
    assert code == 0, out
    assert list(tmp_path.joinpath("run").glob("previous-*/checkpoints/step_0000006"))
    assert len(list(tmp_path.joinpath("run").glob("previous-*/metrics.jsonl"))) == 1
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[0]["type"] == "start"  # a fresh log, not the earlier run's


def test_failure_writes_summary(cli, tmp_path):
    # forward 6 is in step 1: the preflight's is 1, its batch-coupling check's (4 micro-batches per step) 2-4
    cfg = write(tmp_path, "bug", model={"_target_": "tests.toys:FailsAtStep", "at": 6}, data={"num_workers": 0})
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 1 and "error:" in out and "a bug in the user's model" in out and "Traceback" not in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "a bug in the user's model" in summary["error"]


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_best_checkpoint_is_kept_beside_the_last_n(cli, tmp_path, metric):
    """The best is the lowest loss but the highest accuracy (`best_mode: auto`), kept and named in summary.json."""
    cfg = write(tmp_path, "best", train={"max_steps": 30, "batch_size": 16, "eval_every": 5}, data={"num_workers": 0},
                checkpoint={"every_steps": 5, "keep_last": 1, "best_metric": metric},
                optim={"lr": 0.5 if metric == "loss" else 0.01})  # loss: a bumpy curve; accuracy: one that climbs
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 0, out
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in val if m["split"] == "val"]
    sign = -1 if metric == "accuracy" else 1
    best = min(val, key=lambda m: (sign * m[metric], m["step"]))  # the first step at the best value
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert f"step_{best['step']:07d}" in kept and "step_0000030" in kept and len(kept) <= 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best"]["step"] == best["step"] and summary["best"]["value"] == pytest.approx(best[metric])
    assert summary["best"]["checkpoint"].endswith(f"step_{best['step']:07d}")
    if metric == "accuracy":
        assert max(m["accuracy"] for m in val) > min(m["accuracy"] for m in val)  # the order mattered


def test_setup_failure_still_writes_summary(cli, tmp_path):
    cfg = write(tmp_path, "nodata", data={"train": {"_target_": "tests.toys:Blobs", "n": 0}, "num_workers": 0})
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 1 and "empty" in out and "hint:" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "empty" in summary["error"]


def test_iterable_dataset_trains_and_resumes_exactly(cli, tmp_path):
    """Stream positions: a resumed run skips what was consumed and ends where an uninterrupted one does."""
    common = dict(data={"train": {"_target_": "tests.toys:BlobStream"}, "val": None, "num_workers": 0},
                  model={"_target_": "tests.toys:MLP"}, checkpoint={"every_steps": 5, "keep_last": 5})
    full = write(tmp_path, "full", train={"max_steps": 30, "batch_size": 16}, **common)
    code, out = cli("train", "--config", full, "--run-dir", tmp_path / "full")
    assert code == 0, out
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["skipped_samples"] > 0  # the None items, by stream position
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000015", part / "checkpoints" / "step_0000015")
    code, out = cli("train", "--config", full, "--run-dir", part)
    assert code == 0 and "resumed from" in out
    assert_bitwise_equal(final_weights(part), final_weights(tmp_path / "full"))


def test_ctrl_c_saves_and_a_second_ctrl_c_exits_at_once(tmp_path):
    cfg = write(tmp_path, "slow", hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.3}], data={"num_workers": 0},
                train={"max_steps": 200, "batch_size": 16}, checkpoint={"every_steps": 100, "keep_last": 2})
    proc = start(cfg, tmp_path / "one")
    wait_for(tmp_path / "one" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and (tmp_path / "one" / "checkpoints" / f"step_{summary['steps']:07d}").is_dir()

    cfg = write(tmp_path, "slower", hooks=[{"_target_": "tests.toys:Sleep", "seconds": 5}], data={"num_workers": 0},
                train={"max_steps": 200, "batch_size": 16}, checkpoint={"every_steps": 100, "keep_last": 2})
    proc = start(cfg, tmp_path / "two")
    wait_for(tmp_path / "two" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # during the same 5 s step
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    # had it waited for the step boundary, it would have saved a checkpoint and said "stopped by SIGINT"
    assert summary["status"] == "interrupted" and "second Ctrl-C" in summary["error"]
    assert not list((tmp_path / "two").glob("checkpoints/step_*"))


def test_rerunning_a_completed_run_is_a_no_op(cli, tmp_path):
    cfg = write(tmp_path, "small", train={"max_steps": 6, "batch_size": 16}, data={"num_workers": 0})
    assert cli("train", "--config", cfg, "--run-dir", tmp_path / "run")[0] == 0
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 0 and "done: 6 steps" in out, out
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["status"] == "completed" and again["final_loss"] == first["final_loss"]
    assert (tmp_path / "run" / "checkpoints" / "step_0000006").is_dir()


def test_a_run_directory_has_one_writer_and_the_lock_dies_with_it(tmp_path):
    """A second command on a run directory in use exits 2 naming the holder, and writes nothing
    there; kill -9 of the holder leaves no stale lock: the same command then resumes."""
    cfg = write(tmp_path, "hard", hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.05}])
    run_dir = tmp_path / "run"
    proc = start(cfg, run_dir)
    wait_for(run_dir / "checkpoints" / "step_0000005", proc)
    code, out = run(cfg, run_dir)
    assert code == 2 and f"in use by process {proc.pid}" in out and "hint:" in out, out
    assert not (run_dir / "summary.json").exists(), "the refused command wrote a summary into the other run's directory"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    code, out = run(cfg, run_dir)
    assert code == 0 and "resumed from" in out, out
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40
