"""GPU-only checks (marked `gpu`, skipped without CUDA): the AMP paths and exact resume on a real device."""

import json

import pytest
import torch
import yaml

from tests.conftest import toy_config

pytestmark = pytest.mark.gpu


def _run(cli, tmp_path, name, **sections):
    cfg = toy_config(hardware="auto", **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / name)
    return code, out, json.loads((tmp_path / name / "summary.json").read_text())


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_amp_precisions_train_on_cuda(cli, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    code, out, summary = _run(cli, tmp_path, precision, train={"max_steps": 40, "batch_size": 16, "precision": precision})
    assert code == 0, out
    assert summary["precision"] == precision and summary["device"] != "cpu" and summary["profile"] != "cpu"
    assert summary["skipped_steps"] == 0


def test_auto_profile_matches_this_gpu(tmp_path):
    from trainguard.hardware.probe import probe
    from trainguard.hardware.profiles import match_profile

    info = probe()
    prof, why = match_profile(info)
    assert info.type == "cuda" and prof.device == "cuda" and why


def test_resume_is_bitwise_exact_on_cuda(cli, tmp_path):
    import shutil

    sections = dict(train={"max_steps": 20, "batch_size": 16, "precision": "bf16" if torch.cuda.is_bf16_supported() else "fp16"},
                    checkpoint={"every_steps": 5, "keep_last": 5})
    code, out, _ = _run(cli, tmp_path, "full", **sections)
    assert code == 0, out
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000010", tmp_path / "part" / "checkpoints" / "step_0000010")
    code, out, _ = _run(cli, tmp_path, "part", **sections)
    assert code == 0 and "resumed from" in out
    a = torch.load(tmp_path / "full" / "checkpoints" / "step_0000020" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "step_0000020" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diagnose_on_the_gpu_measures_memory_and_agrees_with_train(cli, tmp_path):
    """On the card itself: every check runs on CUDA, memory is measured (not predicted), and the
    micro-batch diagnose finds is the one train then starts with (the shared autoconfig cache)."""
    cfg = toy_config(hardware="auto", model={"_target_": "tests.toys:MLP", "hidden": 256}, data={"val": None},
                     train={"max_steps": 5, "batch_size": 64, "micro_batch_size": "auto"})
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, out = cli("diagnose", "--config", path, "--json", "--memory-budget", "600MB")
    report = json.loads(out[out.index("{"):])
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 0 and report["ok"], out
    assert checks["hardware.device"]["status"] in ("pass", "warn") and "compute" in checks["hardware.device"]["message"]
    assert "measured" in checks["memory.fit"]["message"]
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / "gpu", "--memory-budget", "600MB")
    assert code == 0 and "from the cache" in out, out


def test_healthy_steps_sync_the_host_once_at_most(tmp_path):
    """Host syncs on healthy fp16 steps between log lines, counted with torch.cuda.set_sync_debug_mode:
    one per optimizer step at most (under fp16 the guards' verdict is read at once: the GradScaler
    decides its own skips; the fused optimizer takes them on the device). bf16 and fp32 steps make
    none: test_a_healthy_step_makes_no_cuda_sync."""
    import warnings

    import trainguard
    from trainguard import Hook

    class SyncCounter(Hook):
        def __init__(self, first: int, last: int):
            self.first, self.last, self.syncs, self.cm = first, last, [], None

        def on_step_start(self, trainer):
            if trainer.state.step + 1 == self.first:
                self.cm = warnings.catch_warnings(record=True)
                self.syncs = self.cm.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, trainer):
            if trainer.state.step == self.last:
                torch.cuda.set_sync_debug_mode("default")
                self.cm.__exit__(None, None, None)

    counter = SyncCounter(11, 20)
    cfg = toy_config(hardware="auto", data={"val": None, "num_workers": 0},
                     train={"max_steps": 30, "batch_size": 16, "log_every": 50, "precision": "fp16"},
                     checkpoint={"every_steps": 0}, log={"progress": False})
    summary = trainguard.train(cfg, run_dir=tmp_path / "run", resume="never", hooks=[counter])
    assert summary["status"] == "completed"
    syncs = [w for w in counter.syncs if "called a synchronizing" in str(w.message)]  # not the mode's own notice
    print(f"{len(syncs)} host syncs in 10 healthy steps:", *sorted({str(w.filename) + ':' + str(w.lineno) for w in syncs}), sep="\n  ")
    assert len(syncs) <= 10, [str(w.message) for w in syncs]


def test_nccl_smoke_one_process(tmp_path):
    """`--nproc-per-node 1` on a GPU: torchrun starts one process, which initialises NCCL (a group
    of one) and trains to the end. The step's collectives on NCCL are test_the_step_collectives_on_nccl."""
    import subprocess
    import sys

    from tests.conftest import REPO

    path = tmp_path / "nccl.yaml"
    path.write_text(yaml.safe_dump(toy_config(hardware="auto", train={"max_steps": 20, "batch_size": 16}), sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "trainguard", "train", "--config", str(path), "--run-dir",
                           str(tmp_path / "run"), "--nproc-per-node", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20 and summary["device"] != "cpu"


def test_the_step_collectives_on_nccl(tmp_path):
    """The exchange and the in-place bucket reduce on CUDA tensors through NCCL (a group of one)."""
    from tests.test_distributed import check_step_collectives

    check_step_collectives(tmp_path, "nccl", "cuda")


def test_a_real_cuda_oom_splits_the_micro_batch_and_matches_the_smaller_one(cli, tmp_path):
    """--memory-budget on a card caps the caching allocator (set_per_process_memory_fraction): the
    OOM is CUDA's own. Micro-batch 4096 of a 65536-wide MLP needs about 3 GiB and does not fit
    1.5 GB; the step splits, the run completes under the cap, and its losses are those of a run
    started at the micro-batch it ended with."""
    from tests.conftest import read_jsonl

    sections = dict(model={"_target_": "tests.toys:MLP", "hidden": 65536},
                    data={"train": {"_target_": "tests.toys:Blobs", "n": 8192}, "val": None, "num_workers": 0},
                    train={"max_steps": 6, "batch_size": 4096, "micro_batch_size": 4096, "precision": "fp32",
                           "log_every": 1},
                    checkpoint={"every_steps": 0}, log={"progress": False})

    def run(name, *flags, **over):
        cfg = toy_config(hardware="auto", **{**sections, **over})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        code, out = cli("train", "--config", path, "--run-dir", tmp_path / name, *flags)
        run_dir = tmp_path / name
        return code, out, json.loads((run_dir / "summary.json").read_text()), read_jsonl(run_dir / "events.jsonl"), \
            [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]

    code, out, summary, events, metrics = run("split", "--memory-budget", "1.5GB")
    assert code == 0, out
    ooms = [e for e in events if e["type"] == "oom"]
    m = summary["micro_batch_size"]
    assert ooms and m < 4096 and m * summary["grad_accum"] == 4096, out
    assert summary["peak_memory_bytes"] <= 1.5e9
    code, out, ref, _, ref_metrics = run("ref", train={**sections["train"], "micro_batch_size": m})
    assert code == 0, out
    assert [r["step"] for r in metrics] == [r["step"] for r in ref_metrics]
    for a, b in zip(metrics, ref_metrics):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(b["loss"])), (a, b)
    print(f"split 4096 -> {m} after {len(ooms)} CUDA OOM(s); peak {summary['peak_memory_bytes'] / 2**30:.2f} GiB under 1.5 GB")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_healthy_step_makes_no_cuda_sync(cli, tmp_path, workers):
    """Under torch.cuda.set_sync_debug_mode("warn"), counted by a user hook from each step's start to its
    end: no synchronizing operation on a step between log lines (the verdict is read one step later,
    engine/defer.py); the log lines (steps 1, 10, 20, 30) read the loss."""
    path = tmp_path / f"syncs{workers}.json"
    code, out, summary = _run(cli, tmp_path, f"syncs{workers}", data={"val": None, "num_workers": workers},
                              train={"max_steps": 30, "batch_size": 64, "log_every": 10, "precision": "bf16"},
                              checkpoint={"every_steps": 0}, hooks=[{"_target_": "tests.toys:CudaSyncs", "path": str(path)}])
    assert code == 0, out
    syncs = {int(k): v for k, v in json.loads(path.read_text()).items()}
    assert {s: n for s, n in syncs.items() if s not in (1, 10, 20, 30)} == {}, syncs
