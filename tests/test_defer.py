"""The deferred verdict (engine/defer.py, issue 24), through the real CLI: a healthy step reads no
tensor value on the host; a bad step, found one step late, is redone as if it had never been deferred
(the same events, culprits, losses and final weights as with every verdict read at once,
``TRAINGUARD_VERDICT=sync``); a run killed with -9 after one resumes bitwise."""

import json
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO, read_jsonl, toy_config
from trainguard.engine import loop


def run(cli, tmp_path, name, **sections):
    cfg = toy_config(**sections)
    cfg.setdefault("log", {"progress": False})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / name)
    return code, out, tmp_path / name


def test_a_healthy_step_reads_no_tensor_value_on_the_host(cli, tmp_path, monkeypatch):
    """Counted by a user hook (dispatch-level ``_local_scalar_dense``, plus ``tolist``): 0 reads on every
    step between log lines; each step's verdict is read in the next step, once that step's backward is
    done, and is still unread at its own STEP_END. With every verdict read at once: one read a step."""
    hook = {"_target_": "tests.toys:HostReads", "path": str(tmp_path / "reads.json")}
    sections = dict(data={"val": None, "num_workers": 0}, train={"max_steps": 30, "batch_size": 16, "log_every": 10},
                    checkpoint={"every_steps": 10, "keep_last": 1}, hooks=[hook])
    code, out, _ = run(cli, tmp_path, "deferred", **sections)
    assert code == 0, out
    r = json.loads((tmp_path / "reads.json").read_text())
    reads = {int(k): v for k, v in r["reads"].items()}
    logged = {1, 10, 20, 30}
    assert {s: n for s, n in reads.items() if s not in logged} == {}, reads
    assert all(reads.get(s, 0) >= 1 for s in logged)  # the log line reads the window's loss and the norm
    lag = {s: (seen, unread) for s, seen, unread in r["lag"]}
    assert all(lag[s][0] == s - 1 for s in range(2, 31))  # step s-1's verdict, read before step s's AFTER_BACKWARD
    assert all(lag[s][1] == (s not in logged) for s in range(1, 31))  # a log step's own verdict is read at its end

    monkeypatch.setattr(loop, "DEFER", False)
    code, out, _ = run(cli, tmp_path, "sync", **sections)
    assert code == 0, out
    reads = {int(k): v for k, v in json.loads((tmp_path / "reads.json").read_text())["reads"].items()}
    assert all(reads.get(s, 0) == 1 for s in range(2, 30) if s not in logged), reads


SCENARIOS = {
    # a few samples NaN: found, dropped, the step redone without them
    "culprits": dict(data={"train": {"_target_": "tests.toys:NanBlobs", "n": 256, "every": 37}, "val": None},
                     train={"max_steps": 30, "batch_size": 16, "log_every": 7}, checkpoint={"every_steps": 10}),
    # one sample overflows before a BatchNorm: found alone, the running statistics those of healthy steps
    "batchnorm": dict(model={"_target_": "tests.toys:NormBlocks"},
                      data={"train": {"_target_": "tests.toys:MarkedBlobs", "n": 256, "heavy_ids": [26, 90]},
                            "val": None, "shuffle": False},
                      train={"max_steps": 12, "batch_size": 16, "micro_batch_size": 8, "log_every": 5}),
    # a loss spike skipped, its sample dropped (guard.on_spike: skip), and the window after it
    "spike": dict(data={"train": {"_target_": "tests.spike_toys:SpikyAt", "n": 1024, "ids": [977]}, "val": None,
                        "shuffle": False},
                  train={"max_steps": 70, "batch_size": 16, "log_every": 20}, checkpoint={"every_steps": 0},
                  guard={"on_spike": "skip"}),
    # a layer NaN from its 21st forward on: steps skipped until the budget stops the run
    "module": dict(model={"_target_": "tests.toys:BreaksAt", "at": 21}, data={"val": None},
                   train={"max_steps": 60, "batch_size": 16}, guard={"max_skip_fraction": 0.2,
                                                                    "max_consecutive_bad_steps": 50}),
}


def _outcome(run_dir):
    events = [(e["type"], e["step"], e.get("reason"), e.get("sample_ids"), e.get("module"), e.get("action"))
              for e in read_jsonl(run_dir / "events.jsonl") if e["type"] not in ("start", "end", "resume")]
    losses = [(m["step"], m["loss"]) for m in read_jsonl(run_dir / "metrics.jsonl") if m["split"] == "train"]
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = torch.load(f"{summary['last_checkpoint']}/model.pt", weights_only=True)
    return events, losses, summary, weights


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_bad_step_found_one_step_late_is_handled_as_if_read_at_once(cli, tmp_path, monkeypatch, name):
    code, out, deferred = run(cli, tmp_path, "deferred", **SCENARIOS[name])
    monkeypatch.setattr(loop, "DEFER", False)
    code_sync, out_sync, sync = run(cli, tmp_path, "sync", **SCENARIOS[name])
    assert code == code_sync, out + out_sync
    (ev, losses, summary, w), (ev_s, losses_s, summary_s, w_s) = _outcome(deferred), _outcome(sync)
    assert any(e[0] in ("skip", "spike") for e in ev), ev  # something bad did happen
    assert ev == ev_s
    assert losses == losses_s
    for key in ("step", "samples", "skipped_steps", "skipped_samples", "status", "error"):
        assert summary.get(key) == summary_s.get(key), key
    assert summary["last_checkpoint"].replace("deferred", "sync") == summary_s["last_checkpoint"]
    assert w.keys() == w_s.keys() and all(torch.equal(w[k], w_s[k]) for k in w)


def test_a_run_killed_after_a_bad_step_resumes_bitwise(tmp_path):
    """NaN samples at steps 3, 5 and 8 (and on), kill -9 once step 10's checkpoint is in: the same
    command resumes and ends with the weights of the uninterrupted run, bit for bit."""
    from tests.test_resume import wait_for

    sections = SCENARIOS["culprits"] | {"checkpoint": {"every_steps": 5, "keep_last": 5}}
    paths = {}
    for name, hooks in (("full", []), ("killed", [{"_target_": "tests.toys:SleepAtStart", "seconds": 0.1}])):
        cfg = toy_config(**sections, hooks=hooks, log={"progress": False})
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "trainguard", "train", "--config"]
    full = subprocess.run(cmd + [str(paths["full"]), "--run-dir", str(tmp_path / "full")], cwd=REPO,
                          capture_output=True, text=True)
    assert full.returncode == 0, full.stdout + full.stderr
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(paths["killed"]), "--run-dir", str(run_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(run_dir / "checkpoints" / "step_0000010" / "manifest.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    res = subprocess.run(cmd + [str(paths["killed"]), "--run-dir", str(run_dir)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    skips = [e for e in read_jsonl(tmp_path / "full" / "events.jsonl") if e["type"] == "skip"]
    assert skips and min(e["step"] for e in skips) < 10  # bad steps before the kill
    a = torch.load(tmp_path / "full" / "checkpoints" / "step_0000030" / "model.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "step_0000030" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
