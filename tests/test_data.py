"""The engine-owned data order: deterministic, resumable, and the same with or without workers."""
import pytest

import torch

from tests.toys import NoisyBlobs
from trainguard.engine.data import DataStream


def _batches(workers: int, n: int = 5, seek=None):
    stream = DataStream(NoisyBlobs(n=64), 8, seed=3, shuffle=True, num_workers=workers, pin_memory=False)
    if seek:
        stream.seek(*seek)
    return [next(stream) for _ in range(n)]


def test_random_augmentation_is_the_same_with_and_without_workers():
    a, b = _batches(0), _batches(2)
    for x, y in zip(a, b):
        assert x.ids == y.ids and torch.equal(x.data["x"], y.data["x"])


def test_seek_continues_without_replaying():
    full = _batches(0, n=12)           # 8 batches per epoch: crosses into epoch 1
    resumed = _batches(0, n=3, seek=(1, 1))
    for x, y in zip(full[9:], resumed):
        assert x.ids == y.ids and torch.equal(x.data["x"], y.data["x"])
    assert full[0].ids != full[8].ids  # each epoch has its own order


def test_fetching_leaves_the_training_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _batches(0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("dataset", ["Blobs", "NoisyBlobs", "LateNoise", "Flaky"])
def test_unseeded_fetch_gives_exactly_the_per_item_seeded_batches(dataset):
    """The fast path (no seeding unless an item draws from the RNGs) yields the same batches as
    seeding every item, for datasets without randomness, with it, and with it only late in the epoch;
    and it leaves the training process's RNG streams as they were."""
    import random

    import numpy as np
    import torch

    import tests.toys as toys
    from trainguard.engine.data import EpochBatchSampler, SampleFetcher

    kw = {"broken_every": 37} if dataset == "Flaky" else {}
    ds = getattr(toys, dataset)(n=320, **kw)
    sampler = EpochBatchSampler(len(ds), 16, seed=3, shuffle=True)
    fast, seeded = SampleFetcher(ds, 3), SampleFetcher(ds, 3, per_item=True)

    def draw():
        return float(torch.rand(())), random.random(), float(np.random.rand())

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    expected = draw()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    for epoch in range(2):
        sampler.epoch = epoch
        for keys in sampler:
            a, b = fast.__getitems__(keys), seeded.__getitems__(keys)
            assert [i for i, _ in a] == [i for i, _ in b]
            assert repr(a) == repr(b), keys
    assert draw() == expected  # the training process's RNG streams: untouched by either path
    assert fast.per_item == (dataset in ("NoisyBlobs", "LateNoise"))


def test_rng_watch_sees_every_draw_and_puts_the_streams_back():
    """The cheap RNG check behind the fast path: any draw from python's, numpy's or torch's global
    RNG shows, including a cached second gaussian being used (which leaves the generator's words
    as they were), and ``restore`` puts all three streams back."""
    import random

    import numpy as np

    from trainguard.engine.data import RngWatch

    w = RngWatch()
    draws = {"python": random.random, "numpy": np.random.rand, "torch": lambda: torch.rand(()),
             "numpy cached gaussian": np.random.randn, "python cached gaussian": lambda: random.gauss(0, 1)}
    for name, draw in draws.items():
        np.random.seed(1)
        np.random.randn()  # draws two gaussians and keeps the second: the next randn() uses it
        random.seed(1)
        random.gauss(0, 1)  # the same in python
        before, full = w.mark(), np.random.get_state()
        assert w.same(before, w.mark()), "nothing drew"
        expected = draw()
        assert not w.same(before, w.mark()), f"a {name} draw was missed"
        w.restore(before)
        assert w._py_offset >= 0 and w._np_offset >= 0, "a generator state was not found (read the slow way instead)"
        after = np.random.get_state()
        assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(full, after))
        assert draw() == expected, f"{name}: the stream was not put back"


@pytest.mark.parametrize("dataset,workers", [("Blobs", 0), ("ItemsAtOnce", 0), ("NoisyBlobs", 0), ("LateNoise", 0), ("LateNoise", 2)])
def test_the_fast_data_path_trains_to_the_same_weights_as_seeding_every_item(tmp_path, dataset, workers):
    """A whole run (dropout on, so the training process's RNG matters) with `data.item_seeding:
    auto` (no seeding until an item draws from the RNGs; a dataset's own `__getitems__`) ends
    bitwise equal to the same run seeding every item."""
    import tests.toys as toys
    import trainguard
    from tests.conftest import toy_config

    weights, toys.ItemsAtOnce.calls = {}, 0
    for mode in ("auto", "always"):
        cfg = toy_config(model={"_target_": "tests.toys:DropoutMLP"},
                         data={"train": {"_target_": f"tests.toys:{dataset}", "n": 256}, "val": None,
                               "num_workers": workers, "item_seeding": mode},
                         train={"max_steps": 24, "batch_size": 16, "log_every": 8}, log={"progress": False})
        trainguard.train(cfg, run_dir=tmp_path / mode, resume="never")
        weights[mode] = torch.load(tmp_path / mode / "checkpoints" / "step_0000024" / "model.pt", weights_only=True)
        if dataset == "ItemsAtOnce" and mode == "auto":
            assert toys.ItemsAtOnce.calls >= 24, "the dataset's __getitems__ was not used"
    assert weights["auto"].keys() == weights["always"].keys()
    for k, v in weights["auto"].items():
        assert torch.equal(v, weights["always"][k]), k


def test_resume_is_exact_across_the_fetchers_switch_to_seeding(tmp_path):
    """LateNoise draws from the RNGs only from index 200 on (in order, epoch 0's step 13): a run
    stopped at step 20 and resumed starts its fetcher unseeded again, sees the draw again in
    epoch 1, and still ends bitwise equal to the run that never stopped."""
    import trainguard
    from tests.conftest import toy_config

    def run(name: str, steps: int):
        cfg = toy_config(model={"_target_": "tests.toys:DropoutMLP"},
                         data={"train": {"_target_": "tests.toys:LateNoise", "n": 256}, "val": None, "shuffle": False,
                               "num_workers": 0},
                         schedule={"name": "constant", "warmup_steps": 0},
                         train={"max_steps": steps, "batch_size": 16, "log_every": 8}, log={"progress": False})
        return trainguard.train(cfg, run_dir=tmp_path / name)

    run("straight", 40)
    run("resumed", 20)
    summary = run("resumed", 40)
    assert summary["status"] == "completed" and summary["steps"] == 40
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step_0000040" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "step_0000040" / "model.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ranks_split_each_global_batch_in_order():
    """Under N ranks, batch b on rank r is the r-th slice of the one-process batch b, in every
    epoch and after a seek: the data order and a resume position mean the same for any N."""
    from trainguard.engine.data import EpochBatchSampler

    def batches(rank: int, world: int, start: int = 0, epochs=(0, 1)):
        out = []
        for epoch in epochs:
            s = EpochBatchSampler(100, 16, seed=3, shuffle=True, rank=rank, world=world)
            s.epoch, s.start = epoch, start
            out += list(s)
        return out

    for world in (2, 4):
        for start in (0, 3):
            one = batches(0, 1, start)
            ranks = [batches(r, world, start) for r in range(world)]
            assert len(one) == 2 * (6 - start)  # 100 // 16 = 6 full batches an epoch; the rest is dropped
            for b, whole in enumerate(one):
                assert [k for r in range(world) for k in ranks[r][b]] == whole
