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
"""

from __future__ import annotations

import _random
import contextlib
import ctypes
import functools
import multiprocessing
import os
import pickle
import random
import signal
import struct
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from trainguard.engine.collate import MixedItems, StreamSample, UserCollate, collate_samples
from trainguard.engine.stream import StreamCollate, StreamPart, StreamPosition, for_rank, is_hf_stream
from trainguard.engine.watchdog import PROGRESS, Stalled, StallStop
from trainguard.engine import watchdog
from trainguard.errors import ConfigError, RunFailed, first_line


@dataclass
class BadSample:
    """A sample that could not be loaded: its id and why."""

    sample_id: int
    reason: str


@dataclass
class Batch:
    """A collated batch and the ids of the samples in it."""

    ids: list[int]
    data: Any
    bad: list[BadSample] = field(default_factory=list)
    error: tuple[str, str | None] | None = None   # a collate error, raised in the training process

    def __len__(self) -> int:
        return len(self.ids)

    def without(self, sample_ids: set[int]) -> "Batch":
        """This batch less the given samples."""
        from trainguard.engine.batch import select_rows

        rows = [r for r, i in enumerate(self.ids) if i not in sample_ids]
        data = select_rows(self.data, rows) if rows else None
        return Batch(ids=[self.ids[r] for r in rows], data=data, bad=self.bad)


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


class RngWatch:
    """Tells whether anything drew from the python, numpy or torch-CPU global RNG between two
    :meth:`mark` s, in about 5 us a mark (reading the three states the usual way takes 45 us:
    numpy's ``get_state`` copies its 624 words one by one in Python, python's ``getstate`` makes
    625 int objects).

    Both Mersenne Twisters are read as raw bytes instead, 1 us each, with their cached second
    gaussian (using it changes nothing else): numpy's words at its bit generator's
    ``ctypes.state_address``; python's words, and numpy's ``has_gauss``/``gauss``, inside the
    generator objects, at the place where known values were found once (searched only within the
    object's size; numpy's on a private ``RandomState`` with a cached gaussian, drawn to check the
    flag clears). Where a search fails, that generator is read the usual way.
    """

    _py_offset: int | None = None  # python: where `int index; uint32 state[624]` sits in its generator (-1: not found)
    _np_offset: int | None = None  # numpy: where `int has_gauss; double gauss` sits in a RandomState (-1: not found)

    @classmethod
    def _python(cls) -> tuple:
        gen = random.random.__self__  # the generator behind the module's functions
        if cls._py_offset is None:
            words = random.getstate()[1]
            raw = struct.pack("=i624I", words[624], *words[:624])
            ok = type(gen) in (random.Random, _random.Random)
            cls._py_offset = ctypes.string_at(id(gen), type(gen).__basicsize__).find(raw) if ok else -1
        if cls._py_offset < 0:
            return "state", random.getstate()
        return "mt", ctypes.string_at(id(gen) + cls._py_offset, 4 + 624 * 4), gen.gauss_next

    @classmethod
    def _find_gauss(cls) -> int:
        rs = np.random.RandomState(12345)
        rs.standard_normal()  # draws two gaussians and keeps the second
        gauss = rs.get_state()[4]
        at = ctypes.string_at(id(rs), type(rs).__basicsize__).find(struct.pack("=d", gauss))
        if at < 8 or ctypes.c_int.from_address(id(rs) + at - 8).value != 1:  # aug_bitgen_t: {bitgen_t *; int has_gauss; double gauss}
            return -1
        rs.standard_normal()  # uses the kept one
        return at if ctypes.c_int.from_address(id(rs) + at - 8).value == 0 else -1

    @classmethod
    def _numpy(cls) -> tuple:
        rs = np.random.mtrand._rand
        if cls._np_offset is None:
            cls._np_offset = cls._find_gauss()
        bg = rs._bit_generator
        if type(bg) is not np.random.MT19937 or cls._np_offset < 0:  # another bit generator set globally, or not found
            return "state", pickle.dumps(np.random.get_state(legacy=False))
        words = ctypes.string_at(bg.ctypes.state_address, 624 * 4 + 4)  # uint32 key[624]; int pos
        has_gauss = ctypes.c_int.from_address(id(rs) + cls._np_offset - 8).value
        return "mt", words, ctypes.c_double.from_address(id(rs) + cls._np_offset).value if has_gauss else None

    @classmethod
    def mark(cls) -> tuple:
        """The three streams' states, to compare with a later mark or to go back to."""
        return cls._python(), cls._numpy(), torch.default_generator.get_state()

    @staticmethod
    def same(a: tuple, b: tuple) -> bool:
        """Whether nothing drew from the RNGs between marks ``a`` and ``b``."""
        return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])

    @staticmethod
    def restore(mark: tuple) -> None:
        """Put the three streams back as they were at ``mark``."""
        py, nps, tg = mark
        if nps[0] == "state":
            np.random.set_state(pickle.loads(nps[1]))
        else:
            _, raw, gauss = nps
            key = np.frombuffer(raw[:-4], dtype=np.uint32).copy()
            pos = int.from_bytes(raw[-4:], sys.byteorder, signed=True)
            np.random.set_state(("MT19937", key, pos, int(gauss is not None), gauss or 0.0))
        if py[0] == "state":
            random.setstate(py[1])
        else:
            _, raw, gauss_next = py
            index, *words = struct.unpack("=i624I", raw)
            random.setstate((3, (*words, index), gauss_next))
        torch.default_generator.set_state(tg)


@contextlib.contextmanager
def _host_rng_kept():
    """Leave this process's python/numpy/torch-CPU RNG streams as they were (dropout, ...)."""
    saved = RngWatch.mark()
    try:
        yield
    finally:
        RngWatch.restore(saved)


IDLE = 2**32 - 1  # a loader worker's beat between batches
STALLED = "fetch stalled"  # how the reason of a sample abandoned by the fetch alarm begins
LEFT_OUT = "fetch stalled before: left out, not fetched again (guard.remember_bad_samples)"


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**31 - 1)


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
        s = _sample_seed(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s)
        torch.default_generator.manual_seed(s)  # not torch.manual_seed: that also seeds every accelerator (~250 us)
        return self._get(index)

    def _seeded(self, keys: list[tuple[int, int]]) -> list:
        if get_worker_info() is not None:  # a worker's RNG streams are its own
            return [self._fetch(*k) for k in keys]
        with _host_rng_kept():  # keep the training process's RNG streams (dropout, ...) untouched
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


def _collate(pairs: list, user: UserCollate | None = None) -> Batch:
    ids, items = (list(c) for c in zip(*pairs)) if pairs else ([], [])
    bad = [x for x in items if type(x) is BadSample]
    if bad:
        ids = [i for i, x in zip(ids, items) if type(x) is not BadSample]
        items = [x for x in items if type(x) is not BadSample]
    if user is not None:
        return _user_collate(user, ids, items, bad)
    try:
        try:
            data = collate_samples(items) if items else None
        except MixedItems as e:  # the odd ones out (a 3-tuple among pairs) are bad samples, skipped and recorded
            bad = bad + [BadSample(ids[r], f"an item of another form than its batch's ({e.kinds[r]} among {e.usual})") for r in e.rows]
            ids, items = [i for r, i in enumerate(ids) if r not in e.rows], [x for r, x in enumerate(items) if r not in e.rows]
            data = collate_samples(items)
    except RunFailed as e:  # carried to the main process whole (a worker would re-raise it with its traceback)
        return Batch(ids=ids, data=None, bad=bad, error=(e.message, e.hint))
    return Batch(ids=ids, data=data, bad=bad)


def _call(user: UserCollate, items: list, ids: list[int]) -> Any:
    """The user's collator, as if the python/numpy/torch RNGs were seeded from (seed, the batch's ids)
    just before it (~20 us): a collator that draws (DataCollatorForLanguageModeling's masks) gives
    the same batch with 0 or N workers and after a resume, and the caller's streams (dropout, a
    worker's) are left as they were."""
    s = _sample_seed(user.seed, len(ids), zlib.crc32(struct.pack(f"{len(ids)}q", *ids)))
    with _host_rng_kept():
        random.seed(s)
        np.random.seed(s)
        torch.default_generator.manual_seed(s)
        return user(items)


def _collates(user: UserCollate, items: list, ids: list[int]) -> bool:
    try:
        _call(user, items, ids)
        return True
    except Exception:  # only asking which samples it fails on; the failure itself is reported by the caller
        return False


def _user_collate(user: UserCollate, ids: list[int], items: list, bad: list[BadSample]) -> Batch:
    """The user's collator on the samples that loaded. If it raises, the samples it fails on alone
    (else the one whose absence lets it through) become bad samples and the rest is collated; if
    no such sample exists, the batch carries an error naming the collator."""
    if not items:
        return Batch(ids=ids, data=None, bad=bad)
    try:
        return Batch(ids=ids, data=_call(user, items, ids), bad=bad)
    except Exception as e:  # named below: a bad sample (skipped, recorded) or the collator's own error
        err = e
    n = len(items)
    culprits = [r for r in range(n) if not _collates(user, [items[r]], [ids[r]])]
    if n > 1 and len(culprits) == n:  # it fails on every sample alone: the collator, not the data
        culprits = []
    if not culprits:
        culprits = next(([r] for r in range(n) if n > 1 and _collates(user, items[:r] + items[r + 1:], ids[:r] + ids[r + 1:])), [])
    rest = [r for r in range(n) if r not in culprits]
    if culprits:
        try:
            data = _call(user, [items[r] for r in rest], [ids[r] for r in rest]) if rest else None
        except Exception:  # a second bad sample that only shows together with others: reported as the collator's error
            culprits = []
        else:
            why = f"data.collate_fn `{user.name}` raised {type(err).__name__}: {first_line(err, 160)}"
            return Batch(ids=[ids[r] for r in rest], data=data, bad=bad + [BadSample(ids[r], why) for r in culprits])
    return Batch(ids=ids, data=None, bad=bad, error=(
        f"data.collate_fn `{user.name}` raised {type(err).__name__} on a batch of {n} samples (ids {ids[:8]}"
        f"{'...' if n > 8 else ''}), and still does without any one of them: {first_line(err, 200)}",
        "the collator fails on this data as a whole: call it by hand on a few samples (`collate([ds[0], ds[1]])`) "
        "to see the error, and check its arguments (a tokenizer's padding side, pad token, max length)"))


def _loader_collate(user: UserCollate | None, num_workers: int, name: str):
    """The DataLoader's collate function: the built-in one, or the user's behind the same guards.
    Workers that are spawned (not forked) receive it pickled: an unpicklable one is refused here."""
    if user is None:
        return _collate
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_context().get_start_method()
    if num_workers > 0 and method != "fork":  # (allow_none: asking must not fix the process's start method)
        try:
            pickle.dumps(user)
        except Exception as e:  # a lambda, a local function, an open handle: said with the fix
            raise ConfigError(f"data.collate_fn `{user.name}` cannot be sent to the {num_workers} loader workers of "
                              f"data.{name}: it is not picklable ({type(e).__name__}: {first_line(e, 160)})",
                              "make it a module-level function or class instance (not a lambda or a local function), "
                              "or set data.num_workers: 0") from None
    return functools.partial(_collate, user=user)


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
        common: dict[str, Any] = dict(collate_fn=_loader_collate(collate_fn, num_workers, name), pin_memory=pin_memory)
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
        return _collate(pairs, self.collate_fn)

    def collate(self, items: list) -> Any:
        """Samples (e.g. copies of the scan's worst one) collated as the stream collates them."""
        batch = _collate(list(enumerate(items)), self.collate_fn)
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
            with _host_rng_kept():
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
