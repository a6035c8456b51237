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
