"""The engine-owned order of a map-style dataset: :class:`EpochBatchSampler`, shuffled per epoch
from ``(seed, epoch)`` and started at a batch position, so resume continues without replaying batches.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler):
    """Yields lists of ``(epoch, index)``: a permutation per epoch from ``(seed, epoch)``, from
    batch ``start``. With ``world`` > 1 ranks, batch ``b`` is the same global batch of
    ``batch_size`` items on every rank, and rank ``r`` takes its ``r``-th equal slice: the data
    order, and a position, mean the same whatever the number of ranks."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0
        self.leave_out: set[int] = set()  # samples whose fetch stalled before: not fetched again
        self._order: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        return max(1, self.n // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, bs = self.order(self.epoch), min(self.batch_size, self.n)
        share = bs // self.world
        self._order, out = (self.epoch, order), self.leave_out
        for b in range(self.start, len(self)):
            first = b * bs + self.rank * share
            yield [(self.epoch, i) for i in order[first:first + share] if not out or i not in out]

    def batch_ids(self, epoch: int, b: int) -> list[int]:
        """The ids of batch ``b`` of ``epoch`` on this rank (the epoch being iterated, or any: recomputed)."""
        order = self._order[1] if self._order[0] == epoch else self.order(epoch)
        bs = min(self.batch_size, self.n)
        share = bs // self.world
        first = b * bs + self.rank * share
        return order[first:first + share]

