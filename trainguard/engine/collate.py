"""Collating samples into a batch, with the dtype rules the field reports call for.

* ints, numpy integers, bools-as-ints and (nested) lists of ints become ``torch.long``;
* floats and lists of floats become ``float32`` (float64 tensors/arrays are cast to float32);
* tensors and arrays are stacked; int32/int16/int8 tensors widen to ``long`` (uint8 stays: images);
* strings (and anything else) stay Python lists;
* dicts (any mapping: a ``BatchEncoding`` too) collate field by field into a dict, tuples/lists
  position by position.

Items that cannot be stacked raise an error naming the field and the shapes. Items of one batch
that differ in form (a 3-tuple among ``(x, y)`` pairs, a dict with other keys, a tensor among
tuples) raise :class:`MixedItems` with the odd ones' places: the minority is skipped and recorded
as bad samples, like items that fail to load. This is checked only where collating fails, so a
healthy batch costs nothing more.

A user's collator (``data.collate_fn``) replaces these rules; :class:`UserCollate` calls it and
applies the dtype rules to what it returns (a mapping becomes a dict, int tensors ``long``).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from trainguard.config.instantiate import instantiate
from trainguard.errors import ConfigError, RunFailed

_WIDEN = {torch.int8, torch.int16, torch.int32}

RAGGED_HINT = ("give a padding collator, e.g. `data.collate_fn: {_target_: transformers.DataCollatorWithPadding, "
               "tokenizer: ...}` (DataCollatorForLanguageModeling for language-model labels, DataCollatorForSeq2Seq "
               "for encoder-decoder labels), or pad the sequences to one length in the dataset (with an attention mask)")


def _fix_dtype(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float64:
        return t.float()
    if t.dtype in _WIDEN:
        return t.long()
    return t


def _is_int(x: Any) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (numbers.Number, np.number)) and not isinstance(x, (bool, complex))


def _nested_numbers(x: Any) -> bool:
    while isinstance(x, (list, tuple)) and x:
        x = x[0]
    return _is_num(x)


def _shape(x: Any) -> Any:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return tuple(x.shape)
    if isinstance(x, (list, tuple)):
        return (len(x),)
    return type(x).__name__


def _stack(values: list, field: str) -> torch.Tensor:
    try:
        return _fix_dtype(torch.stack(values))
    except RuntimeError:
        shapes = sorted({str(tuple(v.shape)) for v in values})
        tokens = all(v.dim() == 1 and not v.is_floating_point() for v in values)  # token ids of different lengths
        raise RunFailed(f"field `{field}` cannot be stacked into a batch: samples have shapes {', '.join(shapes)}",
                        RAGGED_HINT if tokens else
                        "pad or crop the samples to one shape in the dataset, or give the field a fixed length") from None


class MixedItems(RunFailed):
    """Some items of a batch differ in form from the others: ``rows`` (their places in the batch,
    the minority; ties: those unlike the first item) are each ``kinds[row]`` where the others are
    ``usual``."""

    def __init__(self, rows: list[int], kinds: dict[int, str], usual: str):
        super().__init__(f"items {', '.join(map(str, rows))} of the batch are {', '.join(sorted(set(kinds.values())))}, "
                         f"the others {usual}", "make every item of the dataset the same form, e.g. always (inputs, target)")
        self.rows, self.kinds, self.usual = rows, kinds, usual


def _form(x: Any) -> str:
    """What an item is, in words, as far as collating it goes (``2-tuple``, ``dict with keys a, b``, ``tensor``)."""
    if isinstance(x, Mapping):
        return f"dicts with keys {', '.join(sorted(map(str, x)))}"
    if isinstance(x, tuple) and not all(_is_num(v) for v in x):
        return f"{len(x)}-tuples"  # fields, (inputs, target): their number is the form
    if isinstance(x, (tuple, list)) and (not x or _nested_numbers(x)):
        return "sequences of numbers"  # token ids or features: a length that varies is a ragged field, not a form
    if isinstance(x, list):
        return f"{len(x)}-lists"
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return "tensors"
    if _is_num(x) or isinstance(x, bool):
        return "numbers"
    return f"{type(x).__name__} objects"


def _mixed(items: list) -> None:
    """Raise :class:`MixedItems` if the items are not all of one form (called where collating failed)."""
    forms = [_form(x) for x in items]
    counts: dict[str, int] = {}
    for f in forms:
        counts[f] = counts.get(f, 0) + 1
    if len(counts) < 2:
        return
    usual = max(counts, key=counts.__getitem__)  # ties: the first item's form (dicts keep insertion order)
    rows = [r for r, f in enumerate(forms) if f != usual]
    raise MixedItems(rows, {r: forms[r] for r in rows}, usual)


def collate_samples(items: list, field: str = "item") -> Any:
    """Collate a list of samples (dicts, tuples, tensors, numbers, strings) into one batch.

    Raises:
        MixedItems: (the top level only) items of different forms; the caller skips the odd ones.
        RunFailed: a field that cannot be stacked.
    """
    first = items[0]
    if type(first) is tuple and all(type(x) is torch.Tensor for x in first) \
            and all(type(x) is tuple and len(x) == len(first) for x in items):  # (inputs, target) tensors: the common case
        try:
            return tuple(_fix_dtype(torch.stack(column)) for column in zip(*items))
        except (RuntimeError, TypeError):
            pass  # the general path below names the field that cannot be stacked
    if isinstance(first, dict) or isinstance(first, Mapping):
        keys = list(first)
        for it in items[1:]:
            if not isinstance(it, Mapping) or set(it) != set(keys):
                if field == "item":
                    _mixed(items)
                raise RunFailed(f"samples have different fields: {sorted(keys)} vs {sorted(it) if isinstance(it, Mapping) else type(it).__name__}",
                                "make every sample return the same keys")
        return {k: collate_samples([it[k] for it in items], k if field == "item" else f"{field}.{k}") for k in keys}
    if isinstance(first, torch.Tensor):
        try:
            return _stack(items, field)
        except TypeError:  # torch.stack: an item that is not a tensor
            if field == "item":
                _mixed(items)
            raise
    if isinstance(first, np.ndarray):
        return _stack([torch.as_tensor(x) for x in items], field)
    if isinstance(first, bool):
        return torch.tensor(items, dtype=torch.bool)
    if all(_is_int(x) for x in items):
        return torch.tensor([int(x) for x in items], dtype=torch.long)
    if all(_is_num(x) for x in items):
        return torch.tensor([float(x) for x in items], dtype=torch.float32)
    if isinstance(first, (list, tuple)) and _nested_numbers(first):
        try:
            arr = np.asarray(items)
        except ValueError:
            arr = None
        if arr is None or arr.dtype == object:
            if field == "item":
                _mixed(items)
            if isinstance(first, tuple) and not all(_is_num(v) for v in first) \
                    and all(type(x) is tuple and len(x) == len(first) for x in items):  # (list, int) pairs: by position
                return tuple(collate_samples([x[i] for x in items], f"{field}[{i}]") for i in range(len(first)))
            lens = sorted({str(_shape(x)) for x in items})
            raise RunFailed(f"field `{field}` cannot be stacked into a batch: samples have lengths {', '.join(lens)}",
                            RAGGED_HINT)
        dtype = torch.long if np.issubdtype(arr.dtype, np.integer) else torch.float32
        return torch.as_tensor(arr, dtype=dtype)
    if isinstance(first, tuple) or (isinstance(first, list) and not isinstance(first, str)):
        if all(isinstance(x, (list, tuple)) and len(x) == len(first) for x in items):
            return tuple(collate_samples([x[i] for x in items], f"{field}[{i}]") for i in range(len(first)))
    if field == "item":
        _mixed(items)
    return list(items)


def finish_batch(x: Any) -> Any:
    """What a user's collator returned, under the dtype rules: a mapping (a ``BatchEncoding``) becomes
    a dict, numpy arrays tensors, int8/16/32 tensors ``long``, float64 ``float32``; the rest is kept."""
    if isinstance(x, torch.Tensor):
        return _fix_dtype(x)
    if isinstance(x, Mapping):
        return {k: finish_batch(v) for k, v in x.items()}
    if isinstance(x, np.ndarray) and x.dtype != object:
        return _fix_dtype(torch.as_tensor(x))
    if type(x) in (tuple, list):
        return type(x)(finish_batch(v) for v in x)
    return x


def build_collate(spec: dict | None, seed: int = 0) -> "UserCollate | None":
    """``data.collate_fn``, built once (its nested ``_target_`` values first); ``None`` without one.
    ``seed``: the run's, from which each batch's collate is seeded (a collator that masks at random)."""
    if spec is None:
        return None
    fn = instantiate(spec, "data.collate_fn")
    if not callable(fn):
        raise ConfigError(f"data.collate_fn._target_ returned {type(fn).__name__}, which is not callable",
                          "return a collator: a callable taking the list of samples (e.g. transformers.DataCollatorWithPadding)")
    return UserCollate(fn, str(spec["_target_"]), seed)


@dataclass(frozen=True)
class StreamSample:
    """A sample with the collate function of its stream (a user's ``data.collate_fn``): the memory
    trials and forecasts repeat it and collate the copies as training does (:func:`collate_copies`)."""

    item: Any
    collate: Callable[[list], Any]


def collate_copies(sample: Any, m: int) -> Any:
    """``m`` copies of one sample (a plain item, or a :class:`StreamSample`), collated."""
    if isinstance(sample, StreamSample):
        return sample.collate([sample.item] * m)
    return collate_samples([sample] * m)


class UserCollate:
    """The user's ``data.collate_fn``: called with the list of samples (of dict samples, only the fields
    the model gets: ``keep``, the model's field filter), its output under :func:`finish_batch`.

    It runs in the loader workers, so it is pickled with them where processes are spawned.
    """

    def __init__(self, fn: Callable, name: str, seed: int = 0):
        self.fn, self.name, self.seed = fn, name, seed
        self.keep: Callable[[list], list] | None = None  # the model's field filter (batch.FieldFilter), once it is built

    def __call__(self, items: list) -> Any:
        return finish_batch(self.fn(self.keep(items) if self.keep is not None else items))
