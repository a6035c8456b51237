"""Data order owned by the engine, so that resume is exact.

* Map-style datasets: :class:`EpochBatchSampler` shuffles each epoch from ``(seed, epoch)`` and
  starts at a batch position, so resume continues without replaying batches.
* Every item is fetched by ``(epoch, index)`` through :class:`SampleFetcher`, as if the
  python/numpy/torch RNGs were seeded from ``(seed, epoch, index)`` around the user's
  ``__getitem__`` (they are, once an item is seen to draw from them): random augmentation is the
  same with 0 or N workers, and after resume.
* An item that raises or returns ``None`` becomes a :class:`BadSample` (recorded, not fatal); so
  does one whose fetch hangs past ``guard.stall_timeout`` (:meth:`DataStream.watch_stalls`), which
  later epochs then leave out without fetching it.
* Iterable datasets (streams): split over ranks and loader workers, numbered, and resumed from
  their ``state_dict()`` or by replay (:mod:`trainguard.engine.stream`).

The parts live in :mod:`~trainguard.engine.sampler`, :mod:`~trainguard.engine.fetch`,
:mod:`~trainguard.engine.rng` and :mod:`~trainguard.engine.assemble` (fetched samples made into a
:class:`Batch`); their names are re-exported here, where callers import them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from trainguard.engine.assemble import Batch, collate_pairs, loader_collate
from trainguard.engine.collate import StreamSample, UserCollate
from trainguard.engine.fetch import IDLE, LEFT_OUT, STALLED, BadSample, SampleFetcher
from trainguard.engine.rng import RngWatch, host_rng_kept  # noqa: F401 - importable from here
from trainguard.engine.sampler import EpochBatchSampler
from trainguard.engine.stream import StreamCollate, StreamPart, StreamPosition, for_rank, is_hf_stream
from trainguard.errors import RunFailed

__all__ = ["IDLE", "LEFT_OUT", "STALLED", "BadSample", "Batch", "DataStream", "EpochBatchSampler", "RngWatch",
           "SampleFetcher", "Scan", "item_size"]


def item_size(item: Any) -> int:
    """Elements in a sample: tensor/array elements and list lengths, summed over its fields."""
    if isinstance(item, torch.Tensor):
        return item.numel()
    if isinstance(item, np.ndarray):
        return int(item.size)
    if isinstance(item, Mapping):
        return sum(item_size(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(item_size(v) for v in item) if item and isinstance(item[0], (list, tuple, Mapping, torch.Tensor, np.ndarray)) else len(item)
    return 1


@dataclass
class Scan:
    """A cheap look at some samples: their sizes, and the largest one (the worst case for memory)."""

    ids: list[int]
    sizes: list[int]
    items: list                 # the samples that loaded, in the order of ``ids``
    bad: list[BadSample] = field(default_factory=list)
    collate: Any = None         # the stream's collate function, when it is the user's (data.collate_fn)

    @property
    def _worst(self) -> int:
        return max(range(len(self.sizes)), key=self.sizes.__getitem__)

    @property
    def worst_id(self) -> int:
        return self.ids[self._worst]

    @property
    def worst_item(self) -> Any:
        """The largest sample; with a user's collator, a :class:`StreamSample` that carries it."""
        item = self.items[self._worst]
        return StreamSample(item, self.collate) if self.collate is not None else item


def _seed_worker(worker_id: int) -> None:
    # Ctrl-C reaches every process in the terminal's foreground group: the trainer stops at a step
    # boundary, saves, and shuts its workers down itself. (SIGTERM keeps its default: the DataLoader
    # ends a stuck worker with it; the loop handles a worker that a job scheduler's SIGTERM ended.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = torch.initial_seed() % 2**31
    random.seed(s)
    np.random.seed(s)


class DataStream:
    """An endless stream of :class:`Batch` es over epochs, with a resumable position.

    ``batch_size`` is the global batch; with ``world`` ranks each yields its ``rank``-th share
    (``self.batch_size``, the samples this process sees per step). ``collate_fn``: the user's
    collator (``data.collate_fn``) instead of the built-in rules. A stream (``IterableDataset``) is
    read in parts over ranks and workers (:mod:`trainguard.engine.stream`); ``stream_split``:
    ``dataset`` when it splits itself (by ``get_worker_info`` and its rank)."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool,
                 num_workers: int, pin_memory: bool, name: str = "train", per_item: bool = False,
                 rank: int = 0, world: int = 1, collate_fn: UserCollate | None = None, stream_split: str = "auto",
                 fetch_timeout: float | None = None):
        self.iterable = isinstance(dataset, IterableDataset)
        try:
            n = None if self.iterable else len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise RunFailed(f"data.{name} has no __len__ and is not an IterableDataset",
                            "implement __len__ and __getitem__, or subclass torch.utils.data.IterableDataset") from None
        if n == 0:
            raise RunFailed(f"data.{name} is empty (0 samples)",
                            "check the dataset's path and split name (e.g. `train` vs `Train`) and its filters")
        if world > 1 and batch_size % world:
            raise RunFailed(f"data.{name}: batch {batch_size} does not split evenly over {world} ranks",
                            f"a batch size that is a multiple of {world}")
        self.dataset, self.seed, self.batch_size = dataset, seed, batch_size // world
        self.fetch_timeout = fetch_timeout  # a sample's fetch that hangs this long is abandoned (guard.stall_timeout)
        self.epoch, self.position = 0, 0
        self.collate_fn = collate_fn
        common: dict[str, Any] = dict(collate_fn=loader_collate(collate_fn, num_workers, name), pin_memory=pin_memory)
        self.name = name
        if self.iterable:  # batched in its parts (workers), each batch with its part's position and state
            self.dataset = dataset = for_rank(dataset, rank, world)  # a `datasets` stream: split_dataset_by_node
            self._source = StreamPart(dataset, self.batch_size, rank=rank, world=world, workers=num_workers, bad=BadSample,
                                      splits_itself=is_hf_stream(dataset) or stream_split == "dataset")
            self._pos = StreamPosition(num_workers, rank, world, self._source.stateful)
            self._gen = torch.Generator()  # worker seeds from (seed, epoch), not from the training process's RNG
            self.loader = DataLoader(self._source, batch_size=None, num_workers=num_workers, worker_init_fn=_seed_worker,
                                     generator=self._gen, collate_fn=StreamCollate(common["collate_fn"]), pin_memory=pin_memory)
        else:
            self.sampler = EpochBatchSampler(n, batch_size, seed, shuffle, rank, world)  # type: ignore[arg-type]
            g = torch.Generator().manual_seed(seed)
            self.loader = DataLoader(SampleFetcher(dataset, seed, per_item, fetch_timeout), batch_sampler=self.sampler,
                                     num_workers=num_workers, worker_init_fn=_seed_worker, generator=g,
                                     persistent_workers=num_workers > 0, **common)
        self._it: Iterator | None = None
        self._remember = False
        self._stalled_before: set[int] = set()  # stalled in the preflight or the scan: not fetched again

    def _early_stalls(self, pairs: list) -> None:
        self._stalled_before.update(x.sample_id for _, x in pairs if type(x) is BadSample and x.reason.startswith(STALLED))

    def watch_stalls(self, left_out: set[int] | None = None) -> None:
        """For the stall watchdog, before the first batch (loader workers get this when they start):
        each worker's progress (:meth:`fetch_beats`); ``left_out``: samples whose fetch stalled
        before (None: do not remember them), left out of later batches without being fetched, and
        reported as bad samples each time. Map-style datasets only (a stream's next() that hangs
        cannot be skipped: the watchdog stops the run)."""
        if self.iterable:
            return
        fetcher = self.loader.dataset
        if fetcher.fetch_timeout and self.loader.num_workers and fetcher.beats is None:
            fetcher.beats = multiprocessing.RawArray("q", [IDLE] * self.loader.num_workers + [0] * self.loader.num_workers)
        self._remember = left_out is not None
        if left_out is not None:
            left_out.update(self._stalled_before)
        self.sampler.leave_out = left_out if left_out is not None else set()

    def fetch_beats(self) -> list[int] | None:
        """Each loader worker's ``(items begun << 32) | item`` (``IDLE`` between batches); None without workers."""
        beats = None if self.iterable else self.loader.dataset.beats
        return list(beats[:len(beats) // 2]) if beats is not None else None

    def worker_pid(self, worker: int) -> int | None:
        """The process id of loader worker ``worker`` (once it has fetched a sample)."""
        beats = None if self.iterable else self.loader.dataset.beats
        return (beats[len(beats) // 2 + worker] or None) if beats is not None else None

    def end_workers(self) -> None:
        """Shut the loader's current pass down now (after a stall): its workers end, one still in a
        fetch (blocked in C) by SIGKILL once the loader has let go of it; the next batch starts a new
        pass. Dropping the iterator is not enough while a traceback still holds it, and torch has no
        public call for this: its own shutdown (private) is called, once, here."""
        it, self._it = self._it, None
        stuck = [self.worker_pid(w) for w, b in enumerate(self.fetch_beats() or []) if b & IDLE != IDLE]
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # waits a few seconds for each worker, then lets them go
        for pid in stuck:
            if pid:
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.kill(pid, signal.SIGKILL)

    def pending_ids(self) -> list[int]:
        """The ids of the batch this rank waits for now (map-style; [] for a stream)."""
        if self.iterable or self._it is None:
            return []
        return self.sampler.batch_ids(self.epoch, self.position)

    def _stalls(self, batch: Batch) -> None:
        """Remember samples whose fetch stalled; report those left out of this batch for it."""
        out = self.sampler.leave_out
        if out:
            here = set(batch.ids).union(b.sample_id for b in batch.bad)
            batch.bad = batch.bad + [BadSample(i, LEFT_OUT) for i in self.sampler.batch_ids(self.epoch, self.position)
                                     if i in out and i not in here]
        out.update(b.sample_id for b in batch.bad if b.reason.startswith(STALLED))

    def seek(self, epoch: int, position: int) -> None:
        """Continue from ``position`` (batches, or items for iterables) of ``epoch``. A stream is
        replayed to there; :meth:`load_stream_state` puts it back exactly."""
        self.epoch, self.position, self._it = epoch, position, None
        if self.iterable:
            self._pos.reset()
            if position:  # a checkpoint without the stream's parts: one part, replayed
                self._pos.load_state_dict({"parts": {0: {"items": position, "read": position, "state": None}},
                                           "turn": 0, "workers": 1}, self.name)

    def stream_state(self, epoch: int, position: int) -> dict | None:
        """A stream's parts at ``(epoch, position)`` (the last committed step: now, or just before
        the latest batch), for the checkpoint; None for a map-style dataset (its position says all)."""
        return self._pos.state_dict(epoch, position, (self.epoch, self.position)) if self.iterable else None

    def load_stream_state(self, d: dict | None) -> None:
        """Continue a stream from :meth:`stream_state` (each part from its dataset state, or replayed)."""
        if self.iterable and d is not None:
            self._pos.load_state_dict(d, self.name)
            self.epoch, self.position, self._it = d["epoch"], d["position"], None

    def replayed_items(self) -> int:
        """Items a resumed stream replays and skips (0 from its saved state, or for map-style data)."""
        return self._pos.replayed() if self.iterable else 0

    def split_note(self) -> str | None:
        """Said at start when trainguard splits a stream over several parts by position: each part
        reads the whole stream and keeps every N-th item, so a dataset that already splits itself
        (get_worker_info) would lose the rest without a word. None otherwise."""
        parts = self._source.world * self._source.workers if self.iterable else 1
        if parts < 2 or self._source.splits_itself:
            return None
        return (f"data.{self.name} is split over {parts} parts (ranks x loader workers) by position: each "
                f"reads the whole stream and keeps every {parts}th item; if the dataset splits itself "
                "over workers (torch.utils.data.get_worker_info), set data.stream_split: dataset")

    def resume_note(self) -> str | None:
        """How a resumed stream continues, for the resume event; None for map-style data."""
        if not self.iterable or not self.position:
            return None
        n = self._pos.replayed()
        return ("the stream continues from its saved state (nothing replayed)" if not n else
                f"the stream has no state_dict()/load_state_dict(): replaying and skipping the {n:,} items it consumed")

    def _start_epoch(self) -> None:
        if self.iterable:
            self._source.epoch, self._source.resume, self._pos.resumed = self.epoch, self._pos.resumed, None
            self._gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        else:
            self.sampler.epoch, self.sampler.start = self.epoch, self.position
        self._it = iter(self.loader)

    def peek(self, n: int) -> Batch:
        """The first ``n`` samples of epoch 0, fetched in this process (for preflight); the stream is untouched."""
        if self.iterable:
            pairs = self._source.first(n)
        else:
            pairs = SampleFetcher(self.dataset, self.seed, fetch_timeout=self.fetch_timeout).__getitems__(
                [(0, i) for i in self.sampler.order(0)[:n]])
            self._early_stalls(pairs)
        return collate_pairs(pairs, self.collate_fn)

    def collate(self, items: list) -> Any:
        """Samples (e.g. copies of the scan's worst one) collated as the stream collates them."""
        batch = collate_pairs(list(enumerate(items)), self.collate_fn)
        if batch.error is not None:
            raise RunFailed(*batch.error)
        if batch.bad:
            raise RunFailed(f"the samples could not be collated: {batch.bad[0].reason}",
                            "fix the sample or the collator (data.collate_fn)")
        return batch.data

    def scan(self, limit: int = 256) -> Scan:
        """Up to ``limit`` samples spread over the dataset (the first ones of a stream), fetched in
        this process with the RNG streams untouched; the stream's position is not moved."""
        if self.iterable:
            with host_rng_kept():
                pairs = self._source.first(limit)
        else:
            n = self.sampler.n
            idx = sorted({round(i * (n - 1) / max(1, limit - 1)) for i in range(min(n, limit))})
            pairs = SampleFetcher(self.dataset, self.seed, fetch_timeout=self.fetch_timeout).__getitems__([(0, i) for i in idx])
            self._early_stalls(pairs)
        good = [(i, x) for i, x in pairs if not isinstance(x, BadSample)]
        bad = [x for _, x in pairs if isinstance(x, BadSample)]
        if not good:
            first = bad[0] if bad else None
            raise RunFailed(f"none of the {len(pairs)} samples scanned could be loaded" + (f", e.g. sample {first.sample_id}: {first.reason}" if first else ""),
                            "fix the dataset's __getitem__ (run it on one index by hand to see the error)")
        return Scan(ids=[i for i, _ in good], sizes=[item_size(x) for _, x in good], items=[x for _, x in good], bad=bad,
                    collate=self.collate if self.collate_fn is not None else None)

    def one_pass(self) -> Iterator[Batch]:
        """One epoch from its start, in order (for an evaluation stream)."""
        if self.iterable:
            self._source.epoch, self._source.resume = 0, None
            self._gen.manual_seed(self.seed * 1_000_003)
        else:
            self.sampler.epoch, self.sampler.start = 0, 0
        self._it = None
        for batch in self.loader:
            if self.iterable:
                batch = batch[0]  # (batch, its part's position)
            if batch.error is not None:
                raise RunFailed(*batch.error)
            yield batch

    def __next__(self) -> Batch:
        for _ in range(2):
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
                if self.iterable:
                    batch, where = batch
                    while batch is None:  # resumed: a worker whose turn had passed
                        batch, where = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                self.epoch, self.position, self._it = self.epoch + 1, 0, None
                if self.iterable:  # each rank's stream is endless: its next pass starts alone, at once
                    self._pos.reset()
                continue
            if batch.error is not None:
                raise RunFailed(*batch.error)
            if self.iterable:
                self._pos.advance((self.epoch, self.position), where)
                self.position += len(batch.ids) + len(batch.bad)
            else:
                if self._remember and (batch.bad or self.sampler.leave_out):
                    self._stalls(batch)
                self.position += 1
            return batch
        raise RunFailed("the training data yielded no batch in a whole epoch",
                        "check that the dataset is not empty and that its iterator yields items")

    def __iter__(self):
        return self
