"""Whole multi-process runs through the CLI (``--nproc-per-node 2``: torchrun, gloo on CPU), each
with a timeout so a hang fails. See docs/distributed.md."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tests.conftest import REPO, read_jsonl, toy_config
from tests.timeouts import slow

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed"),
              pytest.mark.timeout(slow(600))]  # pyproject's 600 s, scaled like the timeouts below


def command(config: Path, run_dir: Path, nproc: int | None, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "trainguard", "train", "--config", str(config), "--run-dir", str(run_dir), *extra]
    return cmd + (["--nproc-per-node", str(nproc)] if nproc else [])


def train(config: Path, run_dir: Path, nproc: int | None = 2, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINGUARD_DIST_TIMEOUT": str(round(slow(60)))}  # a hang inside a collective fails within a minute
    return subprocess.run(command(config, run_dir, nproc, *extra), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=slow(timeout))


def write(tmp_path: Path, name: str, **sections) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(toy_config(**sections), sort_keys=False))
    return path


def weights(run_dir: Path) -> dict:
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    return torch.load(ckpt / "model.pt", weights_only=True)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_two_processes_follow_the_loss_curve_of_one(tmp_path):
    """The same global batch over 2 ranks (each share of 8 in 3 micro-batches: 3, 3, 2) trains as one
    process does: the same losses and weights up to float rounding. Only rank 0 writes the run directory."""
    cfg = write(tmp_path, "toy", data={"shuffle": True, "num_workers": 0},
                train={"max_steps": 30, "batch_size": 16, "log_every": 1, "eval_every": 10})
    one, two = train(cfg, tmp_path / "one", None), train(cfg, tmp_path / "two", 2, "--set", "train.micro_batch_size=3")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) == 30
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    summary = yaml.safe_load((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["micro_batch_size"] == 3 and summary["grad_accum"] == 3
    assert summary["samples"] == 30 * 16
    assert two.stdout.count("done:") == 1  # one report
    events = read_jsonl(tmp_path / "two" / "events.jsonl")
    assert [e["type"] for e in events].count("start") == 1 and events[0]["world_size"] == 2


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + slow(timeout)
    while time.time() < deadline and not (metrics.exists() and any(r["step"] >= step for r in read_jsonl(metrics))):
        time.sleep(0.05)


def test_sigterm_and_kill_9_of_a_two_process_run_resume_to_the_same_weights(tmp_path):
    """SIGTERM to the launcher: both ranks stop at the same step, save, exit 143. kill -9 of every
    process: nothing is saved past the last checkpoint. Each time the same command resumes, and
    the run ends bitwise equal to an uninterrupted one (dropout on: per-rank RNG streams)."""
    cfg = write(tmp_path, "toy", model={"_target_": "tests.toys:DropoutMLP"}, data={"num_workers": 0},
                train={"max_steps": 60, "batch_size": 16, "log_every": 1},
                hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.05}])
    ref = train(cfg, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    run_dir = tmp_path / "run"

    proc = subprocess.Popen(command(cfg, run_dir, 2), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=slow(150))
    assert proc.returncode == 143, err
    summary = yaml.safe_load((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["last_checkpoint"].endswith(f"step_{summary['steps']:07d}")
    stopped = summary["steps"]

    proc = subprocess.Popen(command(cfg, run_dir, 2), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run_dir, 35)
    everyone = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(everyone) >= 3  # the launcher and the two ranks (torchrun gives each a session of its own)
    for pid in everyone:  # all at once, as a lost node would
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=slow(30))
    assert yaml.safe_load((run_dir / "summary.json").read_text())["status"] == "interrupted"  # the first stop's

    again = train(cfg, run_dir)
    assert again.returncode == 0, again.stderr
    resumed = [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "resume"]
    assert resumed[0] == stopped and 30 <= resumed[1] < 60
    wa, wb = weights(tmp_path / "ref"), weights(run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    one = train(cfg, run_dir, None, "--set", "train.max_steps=70")  # a different number of processes
    assert one.returncode == 2 and "saved by 2 processes, this run has 1" in one.stderr and "hint:" in one.stderr


def test_nan_on_rank_1_and_oom_on_rank_0_are_handled_by_both_ranks_together(tmp_path):
    """A NaN sample that only rank 1 sees, and an out-of-memory that only rank 0 hits (a simulated
    budget): both ranks drop the sample and split the micro-batch together, nothing hangs, the
    events name the rank, and the run ends where one process with the same faults ends."""
    # global batch 16 over 2 ranks, in order: step 2 holds samples 16..31 (rank 1: 24..31), step 3 32..47 (rank 0: 32..39)
    data = {"train": {"_target_": "tests.toys:MarkedBlobs", "n": 256, "nan_ids": [26], "heavy_ids": [36]},
            "shuffle": False, "num_workers": 0}
    cfg = write(tmp_path, "toy", model={"_target_": "tests.toys:Hog", "rows": 4, "mb": 64}, data=data,
                train={"max_steps": 20, "batch_size": 16, "log_every": 1})
    one = train(cfg, tmp_path / "one", None, "--memory-budget", "32MB")
    two = train(cfg, tmp_path / "two", 2, "--memory-budget", "32MB")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    events = read_jsonl(tmp_path / "two" / "events.jsonl")
    skip = [e for e in events if e["type"] == "skip"]
    assert [e["step"] for e in skip] == [2, 18]  # 16 steps an epoch: sample 26 comes again at step 18
    assert all(e["sample_ids"] == [26] for e in skip) and skip[0]["ranks"] == [1]
    assert "known from an earlier step" in skip[1]["reason"]  # left out up front on rank 1, named by rank 0
    oom = [e for e in events if e["type"] == "oom"]
    assert len(oom) == 1 and oom[0]["step"] == 3 and oom[0]["ranks"] == [0]
    assert oom[0]["micro_batch_size"] == 8 and oom[0]["new_micro_batch_size"] == 4
    summary = yaml.safe_load((tmp_path / "two" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_samples"] == 2 and summary["micro_batch_size"] == 4
    assert [e["type"] for e in read_jsonl(tmp_path / "one" / "events.jsonl")].count("skip") == 2
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_kill_9_of_the_launcher_alone_stops_the_ranks_with_a_checkpoint(tmp_path):
    """torchrun gives each rank a session of its own, so a kill -9 of the launcher alone does not reach
    them: each rank sees its launcher gone, and they stop together as on SIGTERM (checkpoint, lock
    released); the same command then resumes instead of finding the run directory in use."""
    cfg = write(tmp_path, "toy", data={"num_workers": 0}, train={"max_steps": 400, "batch_size": 16, "log_every": 1},
                hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.05}])
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(cfg, run_dir, 2), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run_dir, 5)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len(ranks) >= 2
    proc.kill()
    proc.wait(timeout=slow(30))
    gone, alive = psutil.wait_procs(ranks, timeout=slow(60))
    assert not alive, [p.pid for p in alive]
    summary = yaml.safe_load((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] < 400, summary
    assert (run_dir / "checkpoints" / f"step_{summary['steps']:07d}" / "manifest.json").is_file()
    stop = [e for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "stop"]
    assert stop and ("is gone" in stop[-1]["reason"] or "SIGTERM received" in stop[-1]["reason"])  # whichever rank saw it first

    again = train(cfg, run_dir, 2, "--set", "train.max_steps=" + str(summary["steps"] + 5))
    assert again.returncode == 0, again.stderr
    assert [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "resume"] == [summary["steps"]]


def test_a_layer_no_rank_uses_is_left_alone_as_in_one_process(tmp_path):
    """Gradients live in flat buckets under 2 processes, so every parameter has one; a layer the
    backward never reaches must still get none, or AdamW's weight decay would shrink it."""
    cfg = write(tmp_path, "unused", model={"_target_": "tests.toys:WithUnused"}, data={"num_workers": 0},
                optim={"weight_decay": 0.5, "lr": 0.01}, train={"max_steps": 10, "batch_size": 16})
    one, two = train(cfg, tmp_path / "one", None), train(cfg, tmp_path / "two", 2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert torch.equal(wa["spare.weight"], wb["spare.weight"])  # untouched on both: the initial weights
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


FSDP = dict(model={"_target_": "trainguard.examples.charlm:CharTransformer", "block_size": 32, "dim": 32, "layers": 2,
                   "heads": 2},
            data={"train": {"_target_": "trainguard.examples.charlm:StdlibChars", "block_size": 32, "max_bytes": 20000},
                  "val": None, "num_workers": 0},
            train={"max_steps": 10, "batch_size": 16, "micro_batch_size": 4, "log_every": 1, "strategy": "fsdp"},
            checkpoint={"every_steps": 5, "keep_last": 5})


def test_fsdp_follows_one_process_and_resumes_bitwise(tmp_path):
    """train.strategy: fsdp (FSDP2: each transformer block, then the root, sharded over 2 ranks, with
    accumulation): the loss curve and weights of one process; checkpoints hold the whole model as a
    plain state_dict (weights-only loadable) and the optimizer as one DCP shard file per rank, all
    under the manifest's checksums; a resume from step 5 (the shards read back) ends bitwise where
    the run did."""
    import json
    import shutil

    chars = {"_target_": "trainguard.examples.charlm:StdlibChars", "block_size": 32, "max_bytes": 40000}
    # with the rest a user turns on: evaluation, the best checkpoint, TensorBoard, a loader worker
    cfg = write(tmp_path, "fsdp", **{**FSDP, "data": {"train": chars, "val": {**chars, "split": "val", "val_fraction": 0.2},
                                                     "num_workers": 1},
                                     "train": {**FSDP["train"], "eval_every": 3},
                                     "checkpoint": {**FSDP["checkpoint"], "best_metric": "loss"}, "log": {"tensorboard": True}})
    one, two = train(cfg, tmp_path / "one", None), train(cfg, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 10 and max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5
    val = [[(r["step"], r["loss"], r["accuracy"]) for r in read_jsonl(tmp_path / run / "metrics.jsonl") if r["split"] == "val"]
           for run in ("one", "two")]
    assert [s for s, *_ in val[1]] == [3, 6, 9, 10] and all(  # every 3 steps, and at the end
        abs(x[1] - y[1]) < 1e-5 and x[2] == y[2] for x, y in zip(*val))
    best = [json.loads((tmp_path / run / "summary.json").read_text())["best"] for run in ("one", "two")]
    assert best[0]["step"] == best[1]["step"] and abs(best[0]["value"] - best[1]["value"]) < 1e-5
    assert list((tmp_path / "two" / "tb").iterdir())
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert wa.keys() == wb.keys() and all(type(v) is torch.Tensor for v in wb.values())
    # 1e-4: the attention's key bias gets no gradient in exact arithmetic, only rounding noise, which
    # AdamW scales up to full steps; everything else agrees to ~3e-7
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)

    ckpt = tmp_path / "two" / "checkpoints" / "step_0000005"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"optimizer/.metadata", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp", "model.pt"} <= files.keys()
    assert torch.load(ckpt / "trainer.pt", weights_only=True)["optimizer"] is None
    assert not list((tmp_path / "two" / "checkpoints").glob(".tmp_*"))

    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step_0000005", tmp_path / "part" / "checkpoints" / "step_0000005")
    part = train(cfg, tmp_path / "part", 2)
    assert part.returncode == 0, part.stderr
    assert [e["step"] for e in read_jsonl(tmp_path / "part" / "events.jsonl") if e["type"] == "resume"] == [5]
    wc = weights(tmp_path / "part")
    assert all(torch.equal(wb[k], wc[k]) for k in wb)


def test_fsdp_out_of_memory_restarts_the_job_with_half_the_micro_batch(tmp_path):
    """Sharded, a rank that runs out of memory (a real torch.OutOfMemoryError under --memory-budget)
    cannot undo the step with the others, who may be inside the forward's collectives: it records a
    halved micro-batch and leaves the job; --nproc-per-node restarts the job, which starts over (no
    checkpoint yet) with micro-batch 4 and then trains exactly as a job started at 4."""
    cfg = write(tmp_path, "fsdp", **FSDP)  # micro-batch 4 of 8 per rank: peaks at 1.43 MiB; at 8, 2.10 MiB
    big = train(cfg, tmp_path / "big", 2, "--memory-budget", "1.8MB", "--set", "train.micro_batch_size=8")
    small = train(cfg, tmp_path / "small", 2, "--memory-budget", "1.8MB")
    assert big.returncode == 0, big.stdout + big.stderr
    assert small.returncode == 0, small.stderr
    assert "restarting the job with a smaller micro-batch" in big.stdout
    assert "out of device memory on rank" in big.stderr and "error:" not in big.stderr
    ooms = [e for e in read_jsonl(tmp_path / "big" / "events.jsonl") if e["type"] == "oom"]
    assert len(ooms) == 1 and ooms[0]["action"] == "restart" and ooms[0]["ranks"]
    assert (ooms[0]["micro_batch_size"], ooms[0]["new_micro_batch_size"]) == (8, 4)
    summary = yaml.safe_load((tmp_path / "big" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 10 and summary["micro_batch_size"] == 4
    assert summary["oom"]["splits"] == 1 and summary["oom"]["configured_micro_batch_size"] == 8
    assert losses(tmp_path / "big") == losses(tmp_path / "small")
    assert not list((tmp_path / "big").glob("oom_restart*")) and not list((tmp_path / "big").glob("previous-*"))

    # the same under a bare torchrun, which restarts the workers itself (their group then needs a
    # store of its own: pytorch issue 167288)
    env = {**os.environ, "TRAINGUARD_DIST_TIMEOUT": str(round(slow(60)))}
    raw = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--max-restarts", "1", "-m", "trainguard", "train", "--config", str(cfg), "--run-dir",
                          str(tmp_path / "raw"), "--memory-budget", "1.8MB", "--set", "train.micro_batch_size=8"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=slow(180))
    assert raw.returncode == 0, raw.stderr
    assert losses(tmp_path / "raw") == losses(tmp_path / "small")


def peaks(run_dir: Path) -> int:
    return max(r["peak_memory_bytes"] for r in read_jsonl(run_dir / "metrics.jsonl") if "peak_memory_bytes" in r)


def test_fsdp_memory_per_rank_is_below_ddp_and_forecast_by_diagnose_and_auto(tmp_path):
    """Sharded, a rank holds half the parameters, gradients and AdamW state: its peak (the simulated
    budget's counter) is below ddp's. ``diagnose`` under torchrun builds and steps the model sharded,
    as train does, and forecasts one rank's peak with FSDP2 sharding over a fake process group: within
    5% of what the run then peaks at. ``micro_batch_size: auto`` under fsdp takes the forecast's answer
    (no trial step runs out of memory in the ranks' collectives), and the run peaks where it said;
    ``autoconfig --nproc-per-node 2`` gives the same answer from one process."""
    import json
    import re

    cfg = write(tmp_path, "fsdp", **{**FSDP, "model": {**FSDP["model"], "dim": 64},
                                     "train": {**FSDP["train"], "max_steps": 2, "micro_batch_size": 8}})
    fsdp = train(cfg, tmp_path / "fsdp", 2, "--memory-budget", "1GB")
    ddp = train(cfg, tmp_path / "ddp", 2, "--memory-budget", "1GB", "--set", "train.strategy=ddp")
    assert fsdp.returncode == 0, fsdp.stderr
    assert ddp.returncode == 0, ddp.stderr
    assert peaks(tmp_path / "fsdp") < 0.9 * peaks(tmp_path / "ddp")

    env = {**os.environ, "TRAINGUARD_DIST_TIMEOUT": str(round(slow(60)))}
    diag = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "trainguard", "diagnose", "--config", str(cfg), "--memory-budget", "1GB", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=slow(180))
    assert diag.returncode == 0, diag.stdout + diag.stderr
    checks = {c["name"]: c for c in json.loads(diag.stdout)["checks"]}
    assert checks["model.forward"]["status"] == "pass" and checks["data.fields"]["message"].find("FSDP") > 0
    fit = checks["memory.fit"]["message"]
    assert checks["memory.fit"]["status"] == "pass" and "predicted for one of 2 ranks, train.strategy: fsdp" in fit, fit
    forecast = float(re.search(r"peaks at ([0-9.]+) MiB", fit).group(1)) * 2**20
    assert abs(forecast / peaks(tmp_path / "fsdp") - 1) < 0.05, (forecast, peaks(tmp_path / "fsdp"))

    auto = train(cfg, tmp_path / "auto", 2, "--memory-budget", "4MB", "--set", "train.micro_batch_size=auto")
    assert auto.returncode == 0, auto.stderr
    said = re.search(r"autoconfig: micro-batch (\d+) .* peak ([0-9.]+) MiB .*forecast for one of 2 ranks", auto.stdout + auto.stderr)
    assert said, auto.stdout
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["micro_batch_size"] == int(said.group(1)) < 8
    assert abs(float(said.group(2)) * 2**20 / peaks(tmp_path / "auto") - 1) < 0.05
    assert not [e for e in read_jsonl(tmp_path / "auto" / "events.jsonl") if e["type"] == "oom"]

    # `autoconfig --nproc-per-node 2` (one process, the fake group of 2) answers what the job chose
    tuned = subprocess.run([sys.executable, "-m", "trainguard", "autoconfig", "--config", str(cfg), "--memory-budget", "4MB",
                            "--nproc-per-node", "2", "--json"], cwd=REPO, capture_output=True, text=True, timeout=slow(120))
    assert tuned.returncode == 0, tuned.stderr
    t = json.loads(tuned.stdout)
    assert (t["micro_batch_size"], t["grad_accum"], t["processes"], t["batch_size"]) == (summary["micro_batch_size"], 2, 2, 16)
    assert t["method"] == "predicted" and abs(t["predicted_peak_bytes"] / peaks(tmp_path / "auto") - 1) < 0.05


def test_fsdp_compiles_block_by_block_and_a_compile_failing_on_one_rank_makes_all_run_eagerly(tmp_path):
    """train.compile under fsdp compiles each block's forward, so FSDP's collectives (in the blocks'
    hooks) stay outside compiled code: the run follows the eager one. A block whose compile fails
    on rank 1 only runs eagerly there on that call (entering the same collectives as rank 0), and
    the ranks then agree to train the eager model, with a warning naming the rank."""
    def compiled_and_eager(name: str, **sections) -> tuple[str, list, list]:
        """2-rank runs with train.compile on and off: what the compiled one said, and both loss curves."""
        cfg = write(tmp_path, name, **{**sections, "train": {**sections["train"], "max_steps": 3, "compile": True}})
        tried = train(cfg, tmp_path / f"{name}-compiled", 2, timeout=300)
        eager = train(cfg, tmp_path / f"{name}-eager", 2, "--set", "train.compile=false")
        assert tried.returncode == 0, tried.stderr
        assert eager.returncode == 0, eager.stderr
        return " ".join((tried.stdout + tried.stderr).split()), losses(tmp_path / f"{name}-compiled"), losses(tmp_path / f"{name}-eager")

    said, a, b = compiled_and_eager("blocks", **FSDP)
    assert "torch.compile: the model compiled" in said and "block by block" in said, said
    assert len(a) == 3 and max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4

    said, a, b = compiled_and_eager("trap", model={"_target_": "tests.toys:CompileTrap"}, data={"num_workers": 0},
                                    train={"batch_size": 16, "micro_batch_size": 4, "log_every": 1, "strategy": "fsdp"})
    assert "torch.compile failed (rank 1:" in said and "training runs the eager model" in said, said
    assert a == b


def test_fsdp_samples_that_fail_to_load_on_one_rank_neither_hang_nor_bias_the_mean(tmp_path):
    """Sharded, every forward is a collective: 5 of rank 1's 8 samples failing to load at step 2
    leave it one micro-batch of 4 where rank 0 runs two, so it runs a stand-in (weighted 0) to take
    part (this hung until the process-group timeout before). The gradient is the mean over the
    samples present on all ranks (FSDP alone would average the ranks' means), so the run follows
    one process with the same failures. With evaluation every 2 steps and a checkpoint every 3: the
    evaluation's forwards have no backward, after which FSDP2 leaves the root's parameters gathered
    whole, and the next checkpoint failed (KeyError) until they were resharded."""
    data = {"train": {"_target_": "tests.toys:Flaky", "n": 256, "broken_ids": [24, 25, 26, 27, 28]},
            "val": {"_target_": "tests.toys:Blobs", "n": 64, "sample_seed": 1}, "shuffle": False, "num_workers": 0}
    cfg = write(tmp_path, "flaky", data=data, guard={"max_skip_fraction": 0.5}, checkpoint={"every_steps": 3},
                train={"max_steps": 6, "batch_size": 16, "micro_batch_size": 4, "log_every": 1, "strategy": "fsdp",
                       "eval_every": 2})
    one, two = train(cfg, tmp_path / "one", None), train(cfg, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    skipped = [i for e in read_jsonl(tmp_path / "two" / "events.jsonl") if e["type"] == "skip" for i in e["sample_ids"]]
    assert sorted(skipped) == [24, 25, 26, 27, 28]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6 and max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    ev = [[(r["step"], r["loss"]) for r in read_jsonl(d / "metrics.jsonl") if r["split"] == "val"] for d in
          (tmp_path / "one", tmp_path / "two")]
    assert [s for s, _ in ev[1]] == [2, 4, 6] and max(abs(x - y) for (_, x), (_, y) in zip(*ev)) < 1e-5
    assert [p.name for p in sorted((tmp_path / "two" / "checkpoints").iterdir())] == ["step_0000003", "step_0000006"]


@pytest.mark.parametrize("case", ["nan_input", "ctc_halving", "batchnorm_halving"])
def test_fsdp_drops_bad_samples_that_one_rank_sees_with_both_ranks_together(tmp_path, case):
    """Bad samples only rank 1 sees, sharded: rank 1 localizes them while rank 0 takes part in each
    of its forwards (a forward is a collective), both redo the step without them, and the run
    follows one process with the same samples: the same events, module and losses. ``nan_input``:
    a NaN feature, named at the input (no forward needed for that micro-batch); ``ctc_halving``:
    two infeasible CTC targets make the reduced loss inf, found by halving (a dozen forwards on
    rank 1 alone); ``batchnorm_halving``: BatchNorm spreads one sample's inf over its micro-batch,
    and the halving's parts of one sample run BatchNorm on its running statistics (in training
    mode it raises there, which on one rank only left the other waiting in a collective)."""
    if case == "nan_input":
        sections = dict(data={"train": {"_target_": "tests.toys:MarkedBlobs", "n": 256, "nan_ids": [26]},
                              "shuffle": False, "num_workers": 0})
        culprits = [26]
    elif case == "batchnorm_halving":
        sections = dict(model={"_target_": "tests.toys:NormBlocks"},
                        data={"train": {"_target_": "tests.toys:MarkedBlobs", "n": 256, "heavy_ids": [26]},
                              "val": None, "shuffle": False, "num_workers": 0})
        culprits = [26]
    else:
        sections = dict(model={"_target_": "tests.toys:CTCModel"},
                        data={"train": {"_target_": "tests.toys:Utterances", "n": 64, "infeasible": [25, 30]},
                              "val": None, "shuffle": False, "num_workers": 0})
        culprits = [25, 30]
    cfg = write(tmp_path, "bad", **sections, guard={"max_skip_fraction": 0.5},
                train={"max_steps": 6, "batch_size": 16, "micro_batch_size": 8, "log_every": 1, "strategy": "fsdp"})
    one, two = train(cfg, tmp_path / "one", None), train(cfg, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    skip = [e for e in read_jsonl(tmp_path / "two" / "events.jsonl") if e["type"] == "skip"]
    ref = [e for e in read_jsonl(tmp_path / "one" / "events.jsonl") if e["type"] == "skip"]
    assert [(e["step"], e["sample_ids"], e.get("module")) for e in skip] == [(e["step"], e["sample_ids"], e.get("module")) for e in ref]
    assert skip[0]["step"] == 2 and skip[0]["sample_ids"] == culprits and skip[0]["ranks"] == [1]
    assert "the step went on without these samples" in skip[0]["reason"]
    summary = yaml.safe_load((tmp_path / "two" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] == 0
    assert summary["skipped_samples"] == yaml.safe_load((tmp_path / "one" / "summary.json").read_text())["skipped_samples"]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6 and max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5


def test_fsdp_search_forward_that_raises_on_one_rank_stops_the_job_with_that_ranks_error(tmp_path):
    """Sharded, a forward of the search for bad samples that raises on rank 1 only (a model that
    cannot run one sample alone) cannot be undone: rank 0 is inside its collectives. Rank 1 stops the
    job with its diagnosis rather than leave rank 0 waiting until the group's timeout, and rank 0,
    which fails of it in its next collective, writes rank 1's error into summary.json."""
    cfg = write(tmp_path, "pairs", model={"_target_": "tests.toys:PairsOnly"},
                data={"train": {"_target_": "tests.toys:MarkedBlobs", "n": 256, "heavy_ids": [26]}, "val": None,
                      "shuffle": False, "num_workers": 0}, guard={"max_skip_fraction": 0.5},
                train={"max_steps": 4, "batch_size": 16, "micro_batch_size": 8, "log_every": 1, "strategy": "fsdp"})
    run = train(cfg, tmp_path / "run", 2)
    assert run.returncode == 1, run.stderr
    assert "error: [rank 1] train.strategy: fsdp: a forward of the search for bad samples raised on this rank only" in run.stderr
    summary = yaml.safe_load((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 1
    assert summary["error"].startswith("rank 1: train.strategy: fsdp: a forward of the search") and "in pairs" in summary["error"]
    assert not list((tmp_path / "run").glob("rank_error*"))


def test_fsdp_rolls_back_to_a_checkpoint_and_recovers(tmp_path):
    """Divergence under fsdp with guard.on_nonfinite: rollback: every rank loads the same checkpoint
    back into its shards (the resume path, mid-run), halves the LR and converges, as one process does."""
    from tests.test_guards import BUDGET, DIVERGE

    cfg = write(tmp_path, "diverge", guard={"on_nonfinite": "rollback", **BUDGET},
                **{**DIVERGE, "model": {"_target_": "tests.toys:Diverging", "shape": [1]},
                   "train": {**DIVERGE["train"], "strategy": "fsdp"}})
    one, two = train(cfg, tmp_path / "one", None), train(cfg, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    back = [e for e in read_jsonl(tmp_path / "two" / "events.jsonl") if e["type"] == "rollback"]
    assert [e["to_step"] for e in back] == [e["to_step"] for e in read_jsonl(tmp_path / "one" / "events.jsonl")
                                              if e["type"] == "rollback"] == [25]
    summary = yaml.safe_load((tmp_path / "two" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a[-1][1] < 1.0 and abs(a[-1][1] - b[-1][1]) < 1e-5


def test_ddp_defers_the_verdict_and_both_ranks_redo_a_bad_step_together(tmp_path):
    """Under ddp the step's exchange sums the losses and norms on the device: a healthy step between log
    lines reads no tensor value on the host on either rank (a user hook counts them), and the steps with
    NaN samples, found one step late, are redone by both ranks together: the same events, losses and
    weights, bit for bit, as with every verdict read at once (``TRAINGUARD_VERDICT=sync``)."""
    from tests.test_defer import SCENARIOS, _outcome

    hook = {"_target_": "tests.toys:HostReads", "path": str(tmp_path / "reads.json")}
    sections = SCENARIOS["culprits"]
    # checkpoints by steps only: the time-based one asks rank 0's clock (a broadcast, which reads a size) at
    # steps spaced by at most 15 s, which a slow, busy machine reaches within these 30 steps
    cfg = write(tmp_path, "toy", **sections | {"data": sections["data"] | {"num_workers": 0},
                                               "checkpoint": sections["checkpoint"] | {"every_minutes": 0}},
                hooks=[hook], log={"progress": False})
    deferred = train(cfg, tmp_path / "deferred")
    assert deferred.returncode == 0, deferred.stderr
    outcome = _outcome(tmp_path / "deferred")
    bad = {e[1] for e in outcome[0] if e[0] == "skip"}
    assert len(bad) >= 3, outcome[0]
    logged = {1, *range(7, 31, 7), 10, 20, 30}  # a log line or a checkpoint
    for path in (tmp_path / "reads.json", tmp_path / "reads.json.rank1"):  # each rank's count
        reads = {int(k): v for k, v in yaml.safe_load(path.read_text())["reads"].items()}
        # reads only where a line is logged, at a skip (samples named across ranks), and in the step after
        # a bad one (which redoes it)
        assert {s: n for s, n in reads.items() if s not in logged | bad and s - 1 not in bad} == {}, (path, reads, bad)
        assert len(reads) < 20  # of 30 steps
        found = {e[1] for e in outcome[0] if e[0] == "skip" and "first non-finite" in e[2]}
        # found and redone in the next step, or at once where the step's own values are read at its end
        assert all(reads.get(s if s in logged else s + 1, 0) >= 1 for s in found)

    old = os.environ.get("TRAINGUARD_VERDICT")
    os.environ["TRAINGUARD_VERDICT"] = "sync"
    try:
        sync = train(cfg, tmp_path / "sync")
    finally:
        os.environ.pop("TRAINGUARD_VERDICT") if old is None else os.environ.update(TRAINGUARD_VERDICT=old)
    assert sync.returncode == 0, sync.stderr
    (ev, loss, summary, w), (ev_s, loss_s, summary_s, w_s) = outcome, _outcome(tmp_path / "sync")
    assert ev == ev_s and loss == loss_s
    assert all(summary.get(k) == summary_s.get(k) for k in ("steps", "samples", "skipped_steps", "skipped_samples", "status"))
    assert w.keys() == w_s.keys() and all(torch.equal(w[k], w_s[k]) for k in w)
