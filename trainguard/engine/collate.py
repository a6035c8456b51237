"""Collating samples into a batch, with the dtype rules the field reports call for.

* ints, numpy integers, bools-as-ints and (nested) lists of ints become ``torch.long``;
* floats and lists of floats become ``float32`` (float64 tensors/arrays are cast to float32);
* tensors and arrays are stacked; int32/int16/int8 tensors widen to ``long`` (uint8 stays: images);
* strings (and anything else) stay Python lists;
* dicts collate field by field, tuples/lists position by position.

Items that cannot be stacked raise an error naming the field and the shapes.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from trainguard.errors import RunFailed

_WIDEN = {torch.int8, torch.int16, torch.int32}


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
        raise RunFailed(f"field `{field}` cannot be stacked into a batch: samples have shapes {', '.join(shapes)}",
                        "pad or crop the samples to one shape in the dataset, or give the field a fixed length") from None


def collate_samples(items: list, field: str = "item") -> Any:
    """Collate a list of samples (dicts, tuples, tensors, numbers, strings) into one batch."""
    first = items[0]
    if type(first) is tuple and all(type(x) is torch.Tensor for x in first) \
            and all(type(x) is tuple and len(x) == len(first) for x in items):  # (inputs, target) tensors: the common case
        try:
            return tuple(_fix_dtype(torch.stack(column)) for column in zip(*items))
        except (RuntimeError, TypeError):
            pass  # the general path below names the field that cannot be stacked
    if isinstance(first, dict):
        keys = list(first)
        for it in items[1:]:
            if not isinstance(it, dict) or set(it) != set(keys):
                raise RunFailed(f"samples have different fields: {sorted(keys)} vs {sorted(it) if isinstance(it, dict) else type(it).__name__}",
                                "make every sample return the same keys")
        return {k: collate_samples([it[k] for it in items], k if field == "item" else f"{field}.{k}") for k in keys}
    if isinstance(first, torch.Tensor):
        return _stack(items, field)
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
            lens = sorted({str(_shape(x)) for x in items})
            raise RunFailed(f"field `{field}` cannot be stacked into a batch: samples have lengths {', '.join(lens)}",
                            "pad the sequences to one length in the dataset (and pass an attention mask)")
        dtype = torch.long if np.issubdtype(arr.dtype, np.integer) else torch.float32
        return torch.as_tensor(arr, dtype=dtype)
    if isinstance(first, tuple) or (isinstance(first, list) and not isinstance(first, str)):
        if all(isinstance(x, (list, tuple)) and len(x) == len(first) for x in items):
            return tuple(collate_samples([x[i] for x in items], f"{field}[{i}]") for i in range(len(first)))
    return list(items)
