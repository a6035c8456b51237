"""Fetched ``(id, item)`` pairs made into a :class:`Batch`: bad samples set aside, then the built-in
rules (:mod:`trainguard.engine.collate`) or the user's collator (``data.collate_fn``) behind guards
that turn a sample it fails on into a bad sample, and seed it per batch so that 0 or N workers and
a resume give the same batch.
"""

from __future__ import annotations

import functools
import multiprocessing
import pickle
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainguard.engine.collate import MixedItems, UserCollate, collate_samples
from trainguard.engine.fetch import BadSample
from trainguard.engine.rng import host_rng_kept, sample_seed
from trainguard.errors import ConfigError, RunFailed, first_line


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


def collate_pairs(pairs: list, user: UserCollate | None = None) -> Batch:
    """``(id, item)`` pairs as one :class:`Batch`, the :class:`BadSample` s among them set aside."""
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
    s = sample_seed(user.seed, len(ids), zlib.crc32(struct.pack(f"{len(ids)}q", *ids)))
    with host_rng_kept():
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


def loader_collate(user: UserCollate | None, num_workers: int, name: str):
    """The DataLoader's collate function: the built-in one, or the user's behind the same guards.
    Workers that are spawned (not forked) receive it pickled: an unpicklable one is refused here."""
    if user is None:
        return collate_pairs
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_context().get_start_method()
    if num_workers > 0 and method != "fork":  # (allow_none: asking must not fix the process's start method)
        try:
            pickle.dumps(user)
        except Exception as e:  # a lambda, a local function, an open handle: said with the fix
            raise ConfigError(f"data.collate_fn `{user.name}` cannot be sent to the {num_workers} loader workers of "
                              f"data.{name}: it is not picklable ({type(e).__name__}: {first_line(e, 160)})",
                              "make it a module-level function or class instance (not a lambda or a local function), "
                              "or set data.num_workers: 0") from None
    return functools.partial(collate_pairs, user=user)
