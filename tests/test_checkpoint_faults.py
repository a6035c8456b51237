"""Checkpoints that verify but do not load, saves on time, where a run starts, and filesystem faults
(a run directory that is a file or read-only, a disk that fills up during a save), through the CLI."""

import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import read_jsonl, toy_config

ADVICE = ("weights_only=False", "weights_only` set to `False", "trusted source", "add_safe_globals")


def write(path: Path, hooks=(), **sections) -> Path:
    cfg = toy_config(**{"data": {"num_workers": 0}, "log": {"progress": False}, **sections})
    cfg["hooks"] = list(hooks)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt / "model.pt", weights_only=True)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tamper(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and rewrite its manifest's checksum to match: it verifies."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def everything_written(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.suffix in (".json", ".jsonl"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 30-step run with checkpoints at 5, 10, ..., 30."""
    from typer.testing import CliRunner

    from trainguard.cli import app

    tmp = tmp_path_factory.mktemp("base")
    cfg = write(tmp / "s30.yaml", train={"max_steps": 30, "batch_size": 16, "log_every": 5},
                checkpoint={"every_steps": 5, "keep_last": 10, "every_minutes": 0})
    r = CliRunner().invoke(app, ["train", "--config", str(cfg), "--run-dir", str(tmp / "run")])
    assert r.exit_code == 0, r.output
    assert "no checkpoint yet: starting at step 0" in r.output  # a fresh run says where it starts, too
    start = read_jsonl(tmp / "run" / "events.jsonl")[0]
    assert start["type"] == "start" and start["reason"].startswith("no checkpoint yet: starting at step 0")
    return tmp


def test_a_checkpoint_that_verifies_but_does_not_load_is_skipped_kept_and_never_run(cli, base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    ckpts = run / "checkpoints"
    marker = tmp_path / "the_pickle_ran"
    from tests.ckpt_toys import Evil

    state = torch.load(ckpts / "step_0000030" / "trainer.pt", weights_only=True)
    buf = io.BytesIO()
    torch.save({**state, "extra": Evil(str(marker))}, buf)
    evil = buf.getvalue()
    tamper(ckpts / "step_0000030", "trainer.pt", evil)
    model_pt = (ckpts / "step_0000025" / "model.pt").read_bytes()
    tamper(ckpts / "step_0000025", "model.pt", model_pt[: len(model_pt) // 2])

    # given explicitly: refused (exit 2) with the reason, and nothing of torch's advice
    code, out = cli("train", "--config", base / "s30.yaml", "--run-dir", run, "--resume", ckpts / "step_0000030")
    assert code == 2 and "does not load" in out and "trainer.pt: not loadable with weights_only" in out, out
    assert "unsupported global: tests.ckpt_toys.plant" in out and "hint:" in out and "Traceback" not in out
    assert not any(a in out for a in ADVICE), out

    # the same command: both are skipped, named with their file and reason, kept on disk; step 20 resumes exactly
    code, out = cli("train", "--config", base / "s30.yaml", "--run-dir", run)
    assert code == 0, out
    assert "skipping checkpoint" in out and "step_0000030: trainer.pt: not loadable with weights_only " \
        "(unsupported global: tests.ckpt_toys.plant)" in out, out
    assert "step_0000025: model.pt: not loadable (RuntimeError: PytorchStreamReader failed" in out, out
    assert f"resumed from {ckpts / 'step_0000020'} at step 20" in out
    assert not any(a in out for a in ADVICE), out
    assert not marker.exists(), "the malicious pickle ran"
    corrupt = {e["step"]: e for e in read_jsonl(run / "events.jsonl") if e["type"] == "checkpoint_corrupt"}
    assert sorted(corrupt) == [25, 30] and "unsupported global" in corrupt[30]["reason"]
    assert (ckpts / "rejected-step_0000030" / "trainer.pt").read_bytes() == evil  # kept as it was, not overwritten
    assert (ckpts / "rejected-step_0000025" / "model.pt").is_file()
    assert not any(a in everything_written(run) for a in ADVICE)
    assert json.loads((run / "summary.json").read_text())["steps"] == 30
    assert_same(weights(ckpts / "step_0000030"), weights(base / "run" / "checkpoints" / "step_0000030"))


def test_no_loadable_checkpoint_starts_at_step_0_and_says_so(cli, base, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    only = run / "checkpoints" / "step_0000005"
    shutil.copytree(base / "run" / "checkpoints" / "step_0000005", only)
    shutil.copy(base / "run" / "metrics.jsonl", run / "metrics.jsonl")
    tamper(only, "trainer.pt", b"not a checkpoint")
    code, out = cli("train", "--config", base / "s30.yaml", "--run-dir", run, "--set", "train.max_steps=3")
    assert code == 0, out
    assert "step_0000005: trainer.pt: not loadable (not a file torch.save wrote); there is no older one" in out, out
    assert "no valid checkpoint (1 rejected, left on disk): starting at step 0" in out, out
    start = [e for e in read_jsonl(run / "events.jsonl") if e["type"] == "start"]
    assert len(start) == 1 and "1 rejected" in start[0]["reason"]
    assert list(run.glob("previous-*/checkpoints/step_0000005/trainer.pt"))  # moved aside with the old files, not deleted


def test_every_minutes_saves_on_time_and_resumes_bitwise(cli, tmp_path):
    """every_steps never comes due in 12 steps; 0.1 s per step against every_minutes 0.004 (0.24 s)
    saves every few steps, however slow the machine (a slower one saves more often, never less)."""
    cfg = write(tmp_path / "timed.yaml", hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.1}],
                train={"max_steps": 12, "batch_size": 16, "log_every": 5},
                checkpoint={"every_steps": 100, "keep_last": 20, "every_minutes": 0.004})
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "full")
    assert code == 0, out
    saved = {e["step"]: e.get("trigger") for e in read_jsonl(tmp_path / "full" / "events.jsonl") if e["type"] == "checkpoint"}
    on_time = [s for s in saved if s < 12]
    assert on_time and all(saved[s] == "time" for s in on_time) and 12 in saved, saved
    first = tmp_path / "full" / "checkpoints" / f"step_{on_time[0]:07d}"
    part = tmp_path / "part"
    shutil.copytree(first, part / "checkpoints" / first.name)
    code, out = cli("train", "--config", cfg, "--run-dir", part, "--set", "checkpoint.every_minutes=0")
    assert code == 0 and f"resumed from {part / 'checkpoints' / first.name} at step {on_time[0]}" in out, out
    assert_same(weights(part / "checkpoints" / "step_0000012"), weights(tmp_path / "full" / "checkpoints" / "step_0000012"))


def test_a_run_directory_that_is_a_file_exits_2_before_anything_is_built(cli, tmp_path):
    cfg = write(tmp_path / "toy.yaml", model={"_target_": "tests.toys:FailsAtStep", "at": 1})  # building it would fail
    f = tmp_path / "taken"
    f.write_text("someone's file")
    for run_dir, what in ((f, "is a file"), (f / "sub", f"is inside {f}, which is a file")):
        code, out = cli("train", "--config", cfg, "--run-dir", run_dir)
        assert code == 2 and f"error: run directory {run_dir} {what}" in out and "hint:" in out, out
        assert "Traceback" not in out
    assert f.read_text() == "someone's file"


@pytest.fixture
def mount(tmp_path):
    """A tmpfs of its own (root only; skipped where mounting is not allowed), unmounted at the end."""
    mounted = []

    def _mount(options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield _mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_run_directory_exits_2(cli, tmp_path, mount):
    ro = mount("ro,size=1m")
    cfg = write(tmp_path / "toy.yaml")
    code, out = cli("train", "--config", cfg, "--run-dir", ro / "run")
    assert code == 2 and f"error: run directory {ro / 'run'} is not writable: read-only file system" in out, out
    assert "hint:" in out and "Traceback" not in out


def test_a_full_disk_while_checkpointing_stops_cleanly_and_the_same_command_resumes(cli, tmp_path, mount):
    disk = mount("size=1m")
    run = disk / "run"
    balloon = disk / "balloon"
    # after the step-5 checkpoint, the disk is filled to 16 KB free: room for summary.json, not a checkpoint (~32 KB)
    cfg = write(tmp_path / "full.yaml",
                hooks=[{"_target_": "tests.ckpt_toys:Balloon", "path": str(balloon), "at": 7, "leave": 16384,
                        "done": str(tmp_path / "balloon_done")}],
                train={"max_steps": 20, "batch_size": 16, "log_every": 5},
                checkpoint={"every_steps": 5, "keep_last": 3, "every_minutes": 0})
    code, out = cli("train", "--config", cfg, "--run-dir", run)
    assert code == 1, out
    assert (f"error: cannot write checkpoint {run / 'checkpoints' / 'step_0000010'}: no space left on device" in out
            and f"the newest checkpoint, {run / 'checkpoints' / 'step_0000005'}, is intact" in out), out
    assert "hint: free space" in out and "resumes from step_0000005" in out and "Traceback" not in out
    assert not list((run / "checkpoints").glob(".tmp_*")), "a partial checkpoint was left behind"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000005"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "no space left on device" in summary["error"] and summary["steps"] == 10
    balloon.unlink()  # space again: the same command continues from step 5 and completes
    code, out = cli("train", "--config", cfg, "--run-dir", run)
    assert code == 0 and f"resumed from {run / 'checkpoints' / 'step_0000005'} at step 5" in out, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
