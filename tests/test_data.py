"""The engine-owned data order: deterministic, resumable, and the same with or without workers."""

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
