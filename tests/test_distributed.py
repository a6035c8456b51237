"""Multi-process pieces, run as real process groups (gloo on CPU, spawned, each with a timeout so a
hang fails instead of stalling the suite). See docs/distributed.md for what exists."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.timeouts import slow

pytestmark = pytest.mark.timeout(slow(600))  # pyproject's 600 s, scaled like the timeouts below


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
        results = dict(out.get(timeout=slow(timeout)) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=slow(10))
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def _signals(rank: int):
    from trainguard import distributed
    from trainguard.distributed.agree import step_signals

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


def check_step_collectives(tmp_path, backend: str, device: str) -> None:
    """A multi-process step's collectives in a group of one (the most one GPU allows for NCCL): the
    exchange's flags, and the bucket reduce with gradients as views (a layer the backward never
    reached keeps no gradient). tests/test_gpu.py runs it on NCCL."""
    from trainguard import distributed
    from trainguard.distributed.agree import exchange
    from trainguard.engine.grads import total_norm

    kwargs = {"device_id": torch.device(device, 0)} if device == "cuda" else {}
    torch.distributed.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, **kwargs)
    try:
        used, spare = torch.nn.Linear(4, 3).to(device), torch.nn.Linear(2, 2).to(device)
        params = [*used.parameters(), *spare.parameters()]
        views = distributed.GradViews(params)
        views.prepare()
        used(torch.randn(5, 4, device=device)).sum().backward()
        expected = [p.grad.clone() for p in used.parameters()]
        assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(used.parameters(), views.buckets[0][2]))  # in place
        present = views.present(params)
        assert present == [True, True, False, False]
        agreed = exchange(torch.tensor(1.5, device=device), total_norm(params), 5, 0, False, None, present)
        assert not agreed.bad and agreed.samples == 5 and abs(agreed.loss - 1.5) < 1e-6 and agreed.present == present
        views.reduce(1.0, agreed.present, params)
        assert all(torch.equal(p.grad, e) for p, e in zip(used.parameters(), expected))
        assert spare.weight.grad is None and spare.bias.grad is None
        bad = exchange(torch.tensor(float("nan"), device=device), total_norm(params), 5, 0, False, None, present)
        assert bad.bad and bad.bad_ranks == [0]
    finally:
        torch.distributed.destroy_process_group()


def test_the_step_collectives_in_a_group_of_one(tmp_path):
    check_step_collectives(tmp_path, "gloo", "cpu")


def test_sharded_optimizer_state_loads_weights_only_and_refuses_foreign_metadata(tmp_path):
    """An optimizer saved as DCP shards (here one process, no group) loads back equal through the
    weights-only reader; a .metadata that names anything but DCP's own classes is refused with a
    one-line error before anything in it runs."""
    import pickle

    from trainguard.checkpoint import sharded
    from trainguard.engine.strategy import Sharded
    from trainguard.errors import RunFailed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.9))
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    fsdp = Sharded()  # the fsdp strategy's optimizer state, in one process
    sharded.save_optimizer(fsdp.optimizer_shards(model, opt), tmp_path / "optimizer")
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    state = fsdp.optimizer_shards(model, fresh)  # the layout to fill
    sharded.load_optimizer(state, tmp_path / "optimizer")
    fsdp.load_optimizer_shards(model, fresh, state)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "optimizer" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(RunFailed, match=r"names (posix|os|nt)\.system") as e:
        sharded.load_optimizer(fsdp.optimizer_shards(model, fresh), tmp_path / "optimizer")
    assert "not a checkpoint trainguard wrote" in e.value.hint and not marker.exists()
