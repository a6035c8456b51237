"""Fetching a map-style dataset's samples by ``(epoch, index)``: :class:`SampleFetcher`.

Each item is fetched as if the python/numpy/torch RNGs were seeded from ``(seed, epoch, index)``
(:mod:`trainguard.engine.rng`). An item that raises or returns ``None`` becomes a :class:`BadSample`;
so does one whose fetch the fetch alarm abandons (:mod:`trainguard.engine.watchdog`). With loader
workers, each worker's beat (its progress) and pid sit in shared memory, for the stall watchdog
(:mod:`trainguard.guards.stall`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from trainguard.engine.rng import RngWatch, host_rng_kept, sample_seed
from trainguard.engine.watchdog import PROGRESS, Stalled, StallStop
from trainguard.engine import watchdog


@dataclass
class BadSample:
    """A sample that could not be loaded: its id and why."""

    sample_id: int
    reason: str


IDLE = 2**32 - 1  # a loader worker's beat between batches
STALLED = "fetch stalled"  # how the reason of a sample abandoned by the fetch alarm begins
LEFT_OUT = "fetch stalled before: left out, not fetched again (guard.remember_bad_samples)"


class SampleFetcher(Dataset):
    """Wraps a map-style dataset: fetches by ``(epoch, index)``, each item as if the python, numpy
    and torch RNGs were seeded from ``(seed, epoch, index)`` just before it.

    Seeding costs ~10 us per item (Python's ``random.seed`` most of it), which is most of a small
    step's data time; most datasets never draw from those RNGs. So a batch is first fetched
    without seeding, and the RNG states are compared before and after (~100 us per batch). If no
    item drew from them, seeding would have changed nothing: the batch is exactly what the seeded
    path gives. If one did, the batch is fetched again with per-item seeds (the RNGs first put
    back), and this fetcher (this process or worker) seeds every item from then on. Either way
    the items are those of the per-item-seeded path, so resume and 0-vs-N workers stay exact.
    ``per_item=True`` seeds from the start (what the tests compare against).
    """

    def __init__(self, dataset: Dataset, seed: int, per_item: bool = False, fetch_timeout: float | None = None):
        self.dataset, self.seed, self.per_item = dataset, seed, per_item
        self.fetch_timeout = fetch_timeout  # abandon an item's fetch after this many seconds (None: never)
        self.beats = None  # with loader workers: per worker, (items begun << 32) | the item (IDLE: between batches); then their pids
        self.slot: int | None = None  # this worker's place in `beats` (-1: not a worker)
        self.begun = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _get(self, index: int):
        PROGRESS.item = index  # what the fetch alarm (and, with 0 workers, the watchdog) watches
        if self.beats is not None:
            self._beat(index)
        try:
            item = self.dataset[index]
            PROGRESS.item = None  # inside the try: an alarm that comes as it returns still lands in it
        except Stalled as e:  # abandoned by the fetch alarm: a hung sample is data too
            return index, BadSample(index, e.reason)
        except StallStop:
            raise
        except Exception as e:  # a broken sample is data, not a crash: recorded and budgeted
            PROGRESS.item = None
            return index, BadSample(index, f"{type(e).__name__}: {e}")
        return index, (item if item is not None else BadSample(index, "the dataset returned None"))

    def _unseeded(self, indices: list[int]) -> list:
        """The items at ``indices``: in one call when the dataset has ``__getitems__`` (a Hugging
        Face dataset, a ``Subset``), else one by one; a call that raises is redone item by item,
        so that only the broken samples are dropped."""
        many = getattr(self.dataset, "__getitems__", None)
        if many is not None:
            PROGRESS.item = -1  # the batch's call: if it hangs, it is abandoned and the items fetched one by one
            try:
                items = many(indices)
                PROGRESS.item = None
            except StallStop:
                raise
            except (Exception, Stalled):  # redone item by item below, each with its own verdict
                items = None
            if items is not None and len(items) == len(indices):
                return [(i, x if x is not None else BadSample(i, "the dataset returned None")) for i, x in zip(indices, items)]
        return [self._get(i) for i in indices]

    def _fetch(self, epoch: int, index: int):
        s = sample_seed(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s)
        torch.default_generator.manual_seed(s)  # not torch.manual_seed: that also seeds every accelerator (~250 us)
        return self._get(index)

    def _seeded(self, keys: list[tuple[int, int]]) -> list:
        if get_worker_info() is not None:  # a worker's RNG streams are its own
            return [self._fetch(*k) for k in keys]
        with host_rng_kept():  # keep the training process's RNG streams (dropout, ...) untouched
            return [self._fetch(*k) for k in keys]

    def _beat(self, index: int) -> None:
        if self.slot is None:
            info = get_worker_info()
            self.slot = info.id if info is not None else -1
            if self.slot >= 0:
                self.beats[len(self.beats) // 2 + self.slot] = os.getpid()
        if self.slot >= 0:
            self.begun = (self.begun + 1) % 2**30
            self.beats[self.slot] = self.begun << 32 | index

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        if not self.fetch_timeout:
            return self._items(keys)
        PROGRESS.fetches += 1
        watchdog.arm(self.fetch_timeout)  # not in a thread other than the main one (then the watchdog stops the run)
        try:
            return self._items(keys)
        finally:
            PROGRESS.item = None
            if self.beats is not None and self.slot is not None and self.slot >= 0:
                self.beats[self.slot] = self.begun << 32 | IDLE

    def _items(self, keys: list[tuple[int, int]]) -> list:
        if self.per_item:
            return self._seeded(keys)
        before = RngWatch.mark()
        items = self._unseeded([i for _, i in keys])
        if RngWatch.same(before, RngWatch.mark()):
            return items  # nothing drew from the RNGs: exactly the seeded path's items
        RngWatch.restore(before)  # the training process's streams, as if nothing had been fetched
        self.per_item = True
        PROGRESS.fetches += 1  # the same items again: a fetch of its own for the fetch alarm
        return self._seeded(keys)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

