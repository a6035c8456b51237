"""Streams (``IterableDataset``): split over ranks and loader workers, numbered, and resumable.

A stream is read in parts, one per (rank, loader worker): with ``W`` ranks and ``N`` workers
(``N`` counts as 1 with ``num_workers: 0``) there are ``P = W * N`` parts, and part
``s = rank * N + worker`` keeps the stream's items at positions ``s, s + P, s + 2P, ...``
(unless the dataset splits itself: a ``datasets`` stream by its shards, or ``data.stream_split:
dataset``). Sample ids are ``k * P + s`` for the part's ``k``-th item: unique over workers and
ranks (a stream position when the stream is split by trainguard).

Each part batches its own items in its worker and sends, with every batch, the dataset's
``state_dict()`` just after that batch (the design of torchdata's ``StatefulDataLoader``, built
on a plain DataLoader here). The DataLoader takes one batch from each worker in turn; the main
process keeps each part's latest state and whose turn is next (:class:`StreamPosition`), which is
what a checkpoint stores. Resuming, each part loads its state and continues; a dataset without
``state_dict``/``load_state_dict`` replays its part and skips what was consumed.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from torch.utils.data import IterableDataset, get_worker_info

from trainguard.errors import ConfigError, first_line


def is_stateful(dataset: Any) -> bool:
    """torchdata's Stateful protocol (a ``datasets`` IterableDataset has it)."""
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


def is_hf_stream(dataset: Any) -> bool:
    """A Hugging Face ``datasets.IterableDataset`` (it splits itself over loader workers by its shards)."""
    return type(dataset).__module__.startswith("datasets.") and hasattr(dataset, "n_shards")


def for_rank(dataset: Any, rank: int, world: int) -> Any:
    """This rank's part of a ``datasets`` stream (``split_dataset_by_node``); any other dataset as is."""
    if world > 1 and is_hf_stream(dataset):
        from datasets.distributed import split_dataset_by_node  # only reached with a `datasets` object

        return split_dataset_by_node(dataset, rank=rank, world_size=world)
    return dataset


class _Turn:
    """A worker's first output on resume when its turn has passed: dropped by the main process, it
    puts the DataLoader's round robin back where the checkpointed run was."""


class _Raised:
    """Reading an item raised (the reason, until the item has its sample id)."""

    def __init__(self, reason: str):
        self.reason = reason


class StreamPart(IterableDataset):
    """Reads this process's (or worker's) part of ``dataset``, numbered, in batches of
    ``batch_size`` pairs ``(sample_id, item)``, each with the part's position and state after it.

    ``bad(sample_id, reason)`` makes the record of an item that is ``None`` or whose reading raised.
    """

    def __init__(self, dataset: Any, batch_size: int, *, rank: int, world: int, workers: int, splits_itself: bool,
                 bad: Callable[[int, str], Any]):
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world
        self.workers = max(1, workers)
        self.splits_itself, self.bad = splits_itself, bad
        self.stateful = is_stateful(dataset)
        self.epoch = 0
        self.resume: dict | None = None  # {"parts": {worker: part}, "turn": worker}: this epoch continues from there

    def _pairs(self, w: int, nw: int, saved: dict | None):
        """``(sample_id, item, items, read)`` of part ``(rank, w)``; ``items``/``read``: the part's
        items and the stream items its reader has read, after this one."""
        parts, s = self.world * nw, self.rank * nw + w
        every, phase = (1, 0) if self.splits_itself else (parts, s)
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(self.epoch)  # a `datasets` stream's shuffle and its state's epoch
        count = read = skip = 0
        if saved is not None:
            count = saved["items"]
            if self.stateful and saved["state"] is not None:
                self.dataset.load_state_dict(saved["state"])
                read = saved["read"]
            else:
                skip = count  # no state: replay the part and skip what was consumed
        it = iter(self.dataset)
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except Exception as e:  # a broken item is data, not a crash: recorded and budgeted
                item = _Raised(f"the stream raised {type(e).__name__}: {first_line(e)}")
            pos, read = read, read + 1
            if pos % every != phase:
                continue
            if skip:
                skip -= 1
                continue
            sid, count = count * parts + s, count + 1
            if item is None:
                item = self.bad(sid, "the dataset returned None")
            elif type(item) is _Raised:
                item = self.bad(sid, item.reason)
            yield sid, item, count, read

    def _state(self) -> Any:
        return copy.deepcopy(self.dataset.state_dict()) if self.stateful else None  # it travels (pickled) later

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = self.resume or {}
        if resume and w < resume["turn"]:
            yield _Turn()
        pairs, count, read = [], 0, 0
        for sid, item, count, read in self._pairs(w, nw, resume.get("parts", {}).get(w)):
            pairs.append((sid, item))
            if len(pairs) == self.batch_size:
                yield pairs, (w, count, read, self._state())
                pairs = []
        if pairs:
            yield pairs, (w, count, read, self._state())

    def first(self, n: int) -> list:
        """The first ``n`` pairs of this rank's first part, read in this process (preflight, scan)."""
        out = []
        for sid, item, _, _ in self._pairs(0, self.workers, None):
            out.append((sid, item))
            if len(out) >= n:
                break
        return out


class StreamCollate:
    """The DataLoader's collate for a stream: the batch's pairs collated in the worker as map-style
    batches are, with the part's position passed along."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, out: Any) -> tuple:
        if isinstance(out, _Turn):
            return None, None
        pairs, where = out
        return self.collate(pairs), where


class StreamPosition:
    """The main process's record of a stream: each part's items, read count and state after its
    latest batch, and the worker whose batch comes next; the same just before that batch, so that
    a checkpoint of a step that was not computed (the run ended before it) stores where it began."""

    def __init__(self, workers: int, rank: int, world: int, stateful: bool):
        self.workers, self.rank, self.world, self.stateful = max(1, workers), rank, world, stateful
        self.parts: dict[int, dict] = {}
        self.turn = 0
        self._before: tuple | None = None
        self.resumed: dict | None = None  # what the next epoch start continues from

    def reset(self) -> None:
        """A new epoch: every part from its start."""
        self.parts, self.turn, self.resumed = {}, 0, None

    def advance(self, key: tuple, where: tuple) -> None:
        """A batch from part ``where[0]`` was taken; ``key`` is ``(epoch, position)`` before it."""
        w, count, read, state = where
        self._before = (key, self.parts, self.turn)
        self.parts = {**self.parts, w: {"items": count, "read": read, "state": state}}
        self.turn = (w + 1) % self.workers

    def state_dict(self, epoch: int, position: int, current: tuple) -> dict:
        """The stream at ``(epoch, position)``: now, or just before the latest batch."""
        parts, turn = self.parts, self.turn
        if (epoch, position) != current and self._before is not None:  # that batch's step was not computed
            current, parts, turn = self._before  # (at an epoch's start its key is (epoch + 1, 0): the same place)
        return {"epoch": current[0], "position": current[1], "parts": parts, "turn": turn,
                "workers": self.workers, "world": self.world, "stateful": self.stateful}

    def load_state_dict(self, d: dict, name: str) -> None:
        if d["workers"] != self.workers:
            raise ConfigError(f"cannot resume data.{name} (a stream): the checkpoint read it with {d['workers']} part(s) per "
                              f"process (data.num_workers), this run with {self.workers}; a stream's split over workers "
                              "is part of its position",
                              f"resume with --set data.num_workers={d['workers'] if d['workers'] > 1 else 0}, "
                              "or start afresh with --resume never")
        self.parts, self.turn, self._before = dict(d["parts"]), d["turn"], None
        self.resumed = {"parts": self.parts, "turn": self.turn}

    def replayed(self) -> int:
        """Items the resume replays and skips (0 when every part continues from its state)."""
        return sum(p["items"] for p in self.parts.values() if not (self.stateful and p["state"] is not None))
