"""A run's records across resumes and at its end, through the real CLI: the logged curve after a
kill -9 and resume, summary.json's segments, a re-run of a completed run (a no-op), a failed
re-run (the completed record stays), the report's segments, and a signal after the end."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, read_jsonl, toy_config
from tests.test_resume import kill9_at

# log lines at 1, 4, 8, 12, 16; checkpoints at 6, 12, 16: the kill after step 6 leaves a logging window open
CFG = dict(data={"num_workers": 0}, train={"max_steps": 16, "batch_size": 16, "log_every": 4, "eval_every": 8},
           checkpoint={"every_steps": 6, "keep_last": 3}, log={"progress": False})


def _write(path: Path, hooks=(), **sections) -> Path:
    cfg = toy_config(**{**CFG, **sections})
    cfg["hooks"] = list(hooks)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _files(run_dir: Path) -> dict:
    """Every file's bytes and mtime (the lock file, rewritten by every command that holds it, left out)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_jsonl(run_dir / "metrics.jsonl") if m["split"] == "train"]


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """One run's life: killed (-9) after its step-6 checkpoint, resumed to completion (16), re-run
    unchanged (a no-op), re-run with another lr (refused), continued to 20, and reported; beside it
    the same run uninterrupted."""
    from typer.testing import CliRunner

    from trainguard.cli import app

    def cli(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        return r.exit_code, r.output

    tmp = tmp_path_factory.mktemp("records")
    h: dict = {}
    ref, run = tmp / "ref", tmp / "run"
    code, out = cli("train", "--config", _write(tmp / "ref.yaml"), "--run-dir", ref)
    assert code == 0, out
    h["ref_losses"] = _train_losses(ref)
    cfg = _write(tmp / "slow.yaml", hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.1}])
    kill9_at(cfg, run, step=6)
    h["summary_after_kill"] = (run / "summary.json").exists()
    h["resumed"] = cli("train", "--config", cfg, "--run-dir", run)
    h["losses"] = _train_losses(run)
    h["summary"] = json.loads((run / "summary.json").read_text())
    before = _files(run)
    h["noop"] = cli("train", "--config", cfg, "--run-dir", run)
    h["noop_changed"] = sorted(k for k in before.keys() | _files(run).keys() if before.get(k) != _files(run).get(k))
    h["refused"] = cli("train", "--config", cfg, "--run-dir", run, "--set", "optim.lr=0.5")
    h["after_refusal"] = json.loads((run / "summary.json").read_text())
    h["continued"] = cli("train", "--config", cfg, "--run-dir", run, "--set", "train.max_steps=20")
    h["continued_summary"] = json.loads((run / "summary.json").read_text())
    h["report"] = cli("report", run, "--out", tmp / "report.png")
    h["report_json"] = cli("report", run, "--json", "--out", tmp / "report.png")
    h["run"], h["cli"], h["cfg"] = run, cli, cfg
    return h


def test_the_logged_loss_after_a_kill_9_and_resume_equals_the_uninterrupted_runs(history):
    assert not history["summary_after_kill"]  # killed before any summary: the checkpoint alone carries the record
    code, out = history["resumed"]
    assert code == 0 and "resumed from" in out, out
    assert [s for s, _ in history["losses"]] == [1, 4, 8, 12, 16]
    assert history["losses"] == history["ref_losses"]  # exact: the window 5-8 spans the resume at 6


def test_summary_counts_every_segment_and_keeps_startup_eval_and_checkpoint(history):
    s = history["summary"]
    assert s["status"] == "completed" and s["steps"] == 16
    died, done = s["segments"]
    at = [e["step"] for e in read_jsonl(history["run"] / "events.jsonl") if e["type"] == "resume"][0]  # 6 (12 if slow to kill)
    assert (died["from_step"], died["to_step"], died["status"]) == (0, at, "died")  # from the checkpoint's record
    assert (done["from_step"], done["to_step"], done["status"]) == (at, 16, "completed")
    assert died["wall_s"] > 0 and done["wall_s"] > 0 and died["started"] < done["started"]
    assert s["wall_s"] == pytest.approx(died["wall_s"] + done["wall_s"], abs=2e-3)
    assert s["startup_s"] > 0 and s["eval"]["accuracy"] >= 0 and s["last_checkpoint"].endswith("step_0000016")

    c = history["continued"]
    assert c[0] == 0 and "resumed from" in c[1] and "step_0000016" in c[1], c[1]  # a raised max_steps continues
    cs = history["continued_summary"]
    assert cs["steps"] == 20 and cs["segments"][:2] == s["segments"] and len(cs["segments"]) == 3
    assert cs["segments"][2]["from_step"] == 16 and cs["segments"][2]["to_step"] == 20
    assert cs["wall_s"] == pytest.approx(sum(x["wall_s"] for x in cs["segments"]), abs=3e-3)
    assert "last_attempt" not in cs  # the failed attempt before it is history: this one trained


def test_rerunning_a_completed_run_changes_nothing(history):
    code, out = history["noop"]
    assert code == 0, out
    assert f"{history['run']} is complete (step 16 of 16," in out and "nothing to do" in out
    assert "raise train.max_steps" in out and "done: 16 steps" in out
    assert "resumed from" not in out
    assert history["noop_changed"] == []  # no file's bytes or mtime: summary, config, logs, checkpoints


def test_a_failed_rerun_keeps_the_completed_summary(history):
    code, out = history["refused"]
    assert code == 2 and "optim.lr" in out, out
    s, before = history["after_refusal"], history["summary"]
    assert {k: v for k, v in s.items() if k != "last_attempt"} == before
    assert s["last_attempt"]["status"] == "failed" and "optim.lr" in s["last_attempt"]["error"]
    assert s["last_attempt"]["exit_code"] == 2


def test_the_report_shows_the_segments(history):
    code, table = history["report"]
    assert code == 0, table
    line = next(ln for ln in table.splitlines() if "segments" in ln)
    died = history["summary"]["segments"][0]
    assert "3 segments" in line and "in all" in line and f"0-{died['to_step']} died" in line and "16-20 completed" in line
    assert "resumes" not in table
    code, out = history["report_json"]
    row = json.loads(out)["runs"][0]
    assert code == 0 and row["status"] == "completed" and len(row["segments"]) == 3
    assert row["wall_s"] == history["continued_summary"]["wall_s"]


def test_a_completed_run_whose_last_checkpoint_is_damaged_is_resumed_not_skipped(history):
    """'Completed' means summary.json says so and the newest valid checkpoint is at its last step."""
    run = history["run"]
    last = run / "checkpoints" / "step_0000020" / "model.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    code, out = history["cli"]("train", "--config", history["cfg"], "--run-dir", run, "--set", "train.max_steps=20")
    assert code == 0 and "resumed from" in out and "nothing to do" not in out, out
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 20 and len(s["segments"]) == 4


@pytest.mark.parametrize("sig,to", [("SIGTERM", "self"), ("SIGINT", "self"), ("SIGTERM", "launcher")])
def test_a_signal_during_teardown_after_the_end_exits_0(tmp_path, sig, to):
    """The signal comes from a timer the run's last hook starts: the process waits for it at exit.
    ``launcher``: a two-process job's launcher (--nproc-per-node) gets it, from rank 0, as the job closes."""
    cfg = _write(tmp_path / "late.yaml", hooks=[{"_target_": "tests.records_toys:SignalAfterEnd", "name": sig, "to": to}],
                 train={"max_steps": 2, "batch_size": 16}, checkpoint={"every_steps": 0})
    nproc = ["--nproc-per-node", "2"] if to == "launcher" else []
    proc = subprocess.run([sys.executable, "-m", "trainguard", "train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), *nproc],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    out = proc.stdout + proc.stderr
    assert f"{sig} after the run completed" in out and "Traceback" not in out, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
