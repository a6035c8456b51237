"""The stall watchdog (guard.stall_timeout) through the real CLI, with hangs injected for real
(tests/stall_toys.py): a sample's fetch that blocks forever is skipped and never fetched again; a
forward that blocks stops the run naming where, and the same command resumes; in a 2-process job,
a rank that stops arriving is named by the other, both leave, and the same command resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, read_jsonl, toy_config
from tests.timeouts import slow
from trainguard.checkpoint import store

pytestmark = pytest.mark.timeout(slow(240))  # a guard against a hang of the watchdog itself, not a timed assertion


def write(tmp_path: Path, name: str, **sections) -> Path:
    cfg = toy_config(**sections)
    cfg["log"] = {"progress": False}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(config: Path, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainguard", "train", "--config", str(config), "--run-dir", str(run_dir), *extra]
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "TRAINGUARD_DIST_TIMEOUT"}  # the group's
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=slow(120))  # timeout follows the setting


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("workers", [0, 2])
def test_a_fetch_that_blocks_forever_is_skipped_recorded_and_not_fetched_again(tmp_path, workers):
    """Sample 20 (in the second batch: the preflight's first micro-batch does not reach it) blocks
    forever in __getitem__, in the training process (0 workers) or a loader worker (2). The fetch is
    abandoned after 2 s, the sample is a `skip` event with its id, the run completes its 3 epochs, and
    the two later epochs leave it out without fetching it (reported, and counted, each time)."""
    record = tmp_path / "fetched.txt"
    cfg = write(tmp_path, "hang", data={"train": {"_target_": "tests.stall_toys:HangsOn", "n": 64, "index": 20,
                                                  "record": str(record)},
                                        "shuffle": False, "num_workers": workers},
                train={"max_steps": 12, "batch_size": 16, "log_every": 4}, checkpoint={"every_steps": 100},
                guard={"stall_timeout": 2})
    run_dir = tmp_path / "run"
    done = train(cfg, run_dir)
    assert done.returncode == 0, done.stderr
    assert len(record.read_text().split()) == 1  # fetched once, in epoch 0 only
    skips = [e for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "skip"]
    assert [(e["step"], e["sample_ids"]) for e in skips] == [(2, [20]), (6, [20]), (10, [20])]
    assert "fetch stalled for more than 2 s" in skips[0]["reason"]
    assert "left out, not fetched again" in skips[1]["reason"]
    s = summary(run_dir)
    assert s["status"] == "completed" and s["steps"] == 12 and s["skipped_samples"] == 3


def test_a_forward_that_blocks_stops_the_run_naming_where_and_the_same_command_resumes(tmp_path):
    """The model's forward blocks forever in step 5 (its 6th call: the preflight is the first). The run
    stops with exit 1 and one `error:` naming the stall, the step, the module and the line, with a hint;
    every thread's stack is in stall_stacks.txt; summary.json says failed; the checkpoint of step 4 is
    intact; the same command, the hang gone, resumes from it and completes."""
    cfg = write(tmp_path, "fwd", model={"_target_": "tests.stall_toys:HangsAtCall", "at": 6},
                data={"num_workers": 0}, train={"max_steps": 8, "batch_size": 16, "log_every": 1},
                checkpoint={"every_steps": 2}, guard={"stall_timeout": 2})
    run_dir = tmp_path / "run"
    stopped = train(cfg, run_dir)
    assert stopped.returncode == 1, stopped.stderr
    error = next(line for line in stopped.stderr.splitlines() if line.startswith("error:"))
    assert "stall: step 5 made no progress" in error and "module `HangsAtCall`" in error and "stall_toys.py" in error
    assert "hint:" in stopped.stderr and "Traceback" not in stopped.stderr
    stacks = (run_dir / "stall_stacks.txt").read_text()
    assert "stall_toys.py" in stacks and "in forward" in stacks
    s = summary(run_dir)
    assert s["status"] == "failed" and s["error"].startswith("stall: step 5") and s["steps"] == 4
    newest = store.latest_valid(run_dir / "checkpoints")[0]
    assert newest is not None and newest.name == "step_0000004" and store.verify(newest) is None

    again = train(cfg, run_dir, env={"STALL_TOY_OFF": "1"})
    assert again.returncode == 0, again.stderr
    assert [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "resume"] == [4]
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["steps"] == 8


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_a_rank_that_stops_arriving_is_named_both_ranks_leave_and_the_same_command_resumes(tmp_path):
    """2 processes (gloo): rank 1's forward blocks in step 5 where no Python handler runs (as in C),
    so rank 0 waits in the step's collective. Rank 0's watchdog reads rank 1's progress from the job's
    store and names it; both processes leave (exit non-zero) well within the group's own timeout;
    the same command, the hang gone, resumes from step 4 and completes. On the way, sample 90 (rank
    1's share of step 6) blocks in its fetch: rank 0 waits while rank 1 abandons it, not giving up."""
    cfg = write(tmp_path, "dist", model={"_target_": "tests.stall_toys:HangsAtCall", "at": 6, "rank": 1, "in_c": True},
                data={"train": {"_target_": "tests.stall_toys:HangsOn", "n": 256, "index": 90},
                      "shuffle": False, "num_workers": 0},
                train={"max_steps": 8, "batch_size": 16, "log_every": 1},
                checkpoint={"every_steps": 2}, guard={"stall_timeout": 3})
    run_dir = tmp_path / "run"
    stopped = train(cfg, run_dir, "--nproc-per-node", "2")
    assert stopped.returncode != 0
    out = stopped.stdout + stopped.stderr
    assert "error:" in out and "rank 1" in out, out
    s = summary(run_dir)
    assert s["status"] == "failed" and "rank 1" in s["error"] and "stall" in s["error"]
    assert (run_dir / "stall_stacks.rank0.txt").exists() and (run_dir / "stall_stacks.rank1.txt").exists()

    again = train(cfg, run_dir, "--nproc-per-node", "2", env={"STALL_TOY_OFF": "1"})
    assert again.returncode == 0, again.stderr
    events = read_jsonl(run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["type"] == "resume"] == [4]
    assert [(e["step"], e["sample_ids"]) for e in events if e["type"] == "skip"] == [(6, [90])]
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["skipped_samples"] == 1


def test_stall_timeout_must_be_positive_seconds_or_auto(cli, write_config):
    code, out = cli("train", "--config", write_config(guard={"stall_timeout": 0}))
    assert code == 2 and "guard.stall_timeout" in out and "hint:" in out
