"""Multi-process pieces, run as real process groups (gloo on CPU, spawned, each with a timeout so a
hang fails instead of stalling the suite). See docs/distributed.md for what exists."""

import os

import pytest
import torch
import torch.multiprocessing as mp


def _in_group(rank: int, world: int, store: str, fn, out) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out.put((rank, fn(rank)))
    finally:
        if torch.distributed.is_initialized():  # diagnose leaves the group itself
            torch.distributed.destroy_process_group()


def run_ranks(tmp_path, fn, world: int = 2, timeout: float = 60) -> dict:
    """``fn(rank)`` in ``world`` spawned processes of one gloo group; their results by rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_in_group, args=(r, world, str(tmp_path / "store"), fn, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def _signals(rank: int):
    from trainguard import distributed
    from trainguard.guards.consensus import step_signals

    healthy = step_signals(torch.tensor(1.0 + rank), torch.tensor(0.5))
    nan_on_rank_1 = step_signals(torch.tensor(float("nan") if rank == 1 else 2.0), torch.tensor(0.5))
    inf_norm_on_rank_0 = step_signals(torch.tensor(2.0), torch.tensor(float("inf") if rank == 0 else 0.5))
    return distributed.current(), healthy, nan_on_rank_1, inf_norm_on_rank_0


def test_every_rank_reaches_the_same_guard_verdict(tmp_path):
    """One rank's NaN loss or inf gradient norm makes every rank see a bad step; a healthy step's
    loss is the mean over ranks, the same on all."""
    results = run_ranks(tmp_path, _signals)
    for rank, (world, healthy, nan1, inf0) in results.items():
        assert world.rank == rank and world.size == 2 and world.is_main == (rank == 0)
        assert healthy == (False, 1.5)
        assert nan1[0] is True and inf0[0] is True


def test_a_single_process_is_a_world_of_one(monkeypatch):
    from trainguard import distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.current() == distributed.World() and distributed.size() == 1
    assert distributed.init("cpu").size == 1 and not torch.distributed.is_initialized()


def _rank_checks(rank: int):
    from tests.conftest import toy_config
    from trainguard.config.load import resolve_config
    from trainguard.diagnose import rank_checks

    same = resolve_config(None, raw=toy_config())[0]
    differs = resolve_config(None, raw=toy_config(seed=rank))[0]
    return ({c.name: c.status for c in rank_checks(same, "cpu")},
            {c.name: (c.status, c.message) for c in rank_checks(differs, "cpu")})


def test_diagnose_under_torchrun_checks_that_every_rank_resolved_the_same_config(tmp_path):
    results = run_ranks(tmp_path, _rank_checks)
    for rank, (same, differs) in results.items():
        assert same == {"env.distributed": "pass", "config.ranks": "pass"}
        assert differs["env.distributed"][0] == "pass"
        status, message = differs["config.ranks"]
        assert status == "fail" and message.startswith("ranks [1] resolved a different config than rank 0")


def _diagnose_memory(rank: int, config: str):
    from trainguard.diagnose import diagnose

    report = diagnose(config, memory_budget=64 * 2**20, overrides=["train.micro_batch_size=auto"])
    return {c.name: c.message for c in report.checks}


def test_diagnose_under_torchrun_sizes_memory_for_each_rank_share_of_the_batch(tmp_path):
    """Each of 2 ranks steps on half of train.batch_size: the memory check and the micro-batch search are per rank."""
    import functools

    import yaml

    from tests.conftest import toy_config

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(toy_config(train={"max_steps": 5, "batch_size": 32}, data={"num_workers": 0})))
    results = run_ranks(tmp_path, functools.partial(_diagnose_memory, config=str(config)), timeout=120)
    for checks in results.values():
        fit = " ".join(checks["memory.fit"].split())
        assert "micro-batch 16 x 1 accumulation" in fit and "picks micro-batch 16" in fit, fit
