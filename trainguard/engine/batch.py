"""Adapting any batch to the model: which fields it gets, on which device, and where the loss is.

Output rule (what the model, or ``loss(output, target)``, may return):
a scalar tensor; a mapping (dict, ``ModelOutput``, ``UserDict``) or object with a ``loss`` entry;
or a tuple whose first element is the loss, or else which holds exactly one scalar tensor: that
one is the loss (nanoGPT's ``(logits, loss)``; said once at start, :attr:`ModelAdapter.loss_note`).

Batches: a mapping of any kind is a mapping (collation makes it a dict; these accept any).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from trainguard.errors import RunFailed

TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def to_device(x: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move tensors (in dicts, tuples and lists) to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, dict) or isinstance(x, Mapping):  # dict first (and below): a Mapping ABC check costs ~0.3 us per call
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    return x


def batch_size_of(x: Any) -> int:
    """Number of samples in a collated batch."""
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    if isinstance(x, dict) or isinstance(x, Mapping):
        return batch_size_of(next(iter(x.values())))
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], (torch.Tensor, Mapping, tuple)):
        return batch_size_of(x[0])
    return len(x)


def slice_batch(x: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a collated batch."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    if isinstance(x, dict) or isinstance(x, Mapping):
        return {k: slice_batch(v, start, stop) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(slice_batch(v, start, stop) for v in x)
    return x[start:stop]


def select_rows(x: Any, rows: list[int]) -> Any:
    """The samples at ``rows`` of a collated batch."""
    if isinstance(x, torch.Tensor):
        return x[torch.tensor(rows, dtype=torch.long, device=x.device)]
    if isinstance(x, dict) or isinstance(x, Mapping):
        return {k: select_rows(v, rows) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(select_rows(v, rows) for v in x)
    return [x[i] for i in rows]


def micro_sizes(n: int, micro_batch_size: int) -> list[int]:
    """The fewest micro-batches of at most ``micro_batch_size`` that make ``n`` samples, within one
    sample of each other, larger ones first (10 at most 4: 4, 3, 3)."""
    if n <= 0:
        return []
    parts = -(-n // max(1, micro_batch_size))
    q, r = divmod(n, parts)
    return [q + 1] * r + [q] * (parts - r)


def describe_split(n: int, micro_batch_size: int) -> str:
    """``micro-batch 8 x 4 accumulation``, or where ``n`` is not a multiple ``3 micro-batches of 11 or 10``."""
    sizes = micro_sizes(n, micro_batch_size) or [0]
    if sizes[0] == sizes[-1]:
        return f"micro-batch {sizes[0]} x {len(sizes)} accumulation"
    return f"{len(sizes)} micro-batches of {sizes[0]} or {sizes[-1]}"


def split_batch(x: Any, micro_batch_size: int) -> list[tuple[Any, int]]:
    """Split a batch into its :func:`micro_sizes`; returns (micro_batch, n) pairs."""
    out, start = [], 0
    for k in micro_sizes(batch_size_of(x), micro_batch_size):
        out.append((slice_batch(x, start, start + k), k))
        start += k
    return out


def extract_loss(out: Any) -> torch.Tensor:
    """The loss from a model (or loss function) output, by the output rule above."""
    if isinstance(out, dict) or isinstance(out, Mapping):
        loss = out.get("loss")
    elif isinstance(out, (tuple, list)):
        loss = out[0] if out else None
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):  # (logits, loss): its one scalar
            scalars = [t for t in out if isinstance(t, torch.Tensor) and t.dim() == 0]
            loss = scalars[0] if len(scalars) == 1 else loss
    elif isinstance(out, torch.Tensor):
        loss = out
    else:
        loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(out).__name__
        raise RunFailed(f"cannot find a scalar loss in the model output ({what})",
                        "return a scalar loss (or {'loss': ...}), pass labels to the model, or set `loss: {_target_: ...}`")
    return loss if loss.dim() == 0 else loss.reshape(())


def extract_logits(out: Any) -> torch.Tensor | None:
    """Logits from a model output, if it has them (for accuracy)."""
    if isinstance(out, torch.Tensor) and out.dim() >= 2:
        return out
    if isinstance(out, Mapping):
        out = out.get("logits")
        return out if isinstance(out, torch.Tensor) else None
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


class FieldFilter:
    """The fields of dict samples that reach a user's collator (``data.collate_fn``): those the model
    gets (forward()'s names after ``data.fields``) and the targets a loss or a collator reads. The
    same rule as the model's, applied before collating, as Hugging Face's Trainer removes unused
    columns before its collator: a string column (`sentence`) never reaches a padding collator.
    It runs in the loader workers (picklable); ``removed`` is what it left out in this process."""

    KEEP = (*TARGET_KEYS, "label_ids")  # a collator renames label/label_ids itself (DataCollatorWithPadding)

    def __init__(self, accepted: set[str], fields: dict[str, str]):
        self.accepted, self.fields = frozenset(accepted), dict(fields)
        self.removed: set[str] = set()

    def keeps(self, key: str) -> bool:
        return self.fields.get(key, key) in self.accepted or key in self.KEEP

    def __call__(self, items: list) -> list:
        first = items[0] if items else None
        if not isinstance(first, Mapping):
            return items
        drop = {k for it in items if isinstance(it, Mapping) for k in it if not self.keeps(k)}
        if not drop:
            return items
        self.removed |= drop
        return [{k: v for k, v in it.items() if k not in drop} if isinstance(it, Mapping) else it for it in items]


def user_module(model: nn.Module) -> nn.Module:
    """The user's module under the wrappers a strategy may put around it (torch.compile's ``_orig_mod``,
    torch's ``DistributedDataParallel``/``DataParallel`` ``.module``): the one whose ``forward()`` names the fields."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


class ModelAdapter:
    """Calls the model on a batch of any supported form and returns ``(output, loss, labels)``.

    Dict batches: fields are renamed by ``data.fields``, and the model receives as keyword
    arguments only the fields its ``forward()`` names, plus, when it takes ``**kwargs``, those
    ``data.fields`` maps or lists explicitly (the convention of HF's ``remove_unused_columns``).
    Tuple batches ``(inputs, target)`` with a loss function: ``loss(model(inputs), target)``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable | None, fields: dict[str, str]):
        self.model, self.loss_fn, self.fields = model, loss_fn, fields
        params = inspect.signature(user_module(model).forward).parameters.values()  # through compile and DDP wrappers
        self.takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        self.accepted = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        self.required = {p.name for p in params if p.default is inspect.Parameter.empty
                         and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        # a field mapped (or listed) in data.fields is always passed; with **kwargs it is the way in
        self.unknown = sorted(set(fields.values()) - self.accepted) if not self.takes_any else []
        self.accepted |= set(fields.values())
        self.filter = FieldFilter(self.accepted, fields)  # the same rule before a user's collator
        self.dropped: list[str] | None = None  # filled on the first dict batch
        self.loss_note: str | None = None  # filled on the first call: where the loss was found, if not by the plain rule

    def _split_dict(self, data: Mapping) -> tuple[dict, Any]:
        data = {self.fields.get(k, k): v for k, v in data.items()}
        target = None
        if self.loss_fn is not None:
            key = next((k for k in TARGET_KEYS if k in data), None)
            target = data[key] if key is not None else None
        kwargs = {k: v for k, v in data.items() if k in self.accepted}
        if self.dropped is None:
            if self.unknown:
                name = type(user_module(self.model)).__name__
                raise RunFailed(f"data.fields passes {self.unknown} but {name}.forward() has no such argument "
                                f"(it takes {sorted(self.accepted - set(self.unknown))})",
                                "map each field to one of forward()'s arguments in data.fields, or remove the entry",
                                check="data.fields")
            missing = sorted(self.required - set(data))
            if missing:
                raise RunFailed(f"model.forward() requires {missing} but the batch has fields {sorted(data)}",
                                "rename dataset fields to forward() arguments with `data.fields: {field: argument}`",
                                check="data.fields")
            self.dropped = sorted((set(data) - set(kwargs)) | self.filter.removed)
        return kwargs, target

    def __call__(self, data: Any) -> tuple[Any, torch.Tensor, Any]:
        labels = None
        if isinstance(data, dict) or isinstance(data, Mapping):
            kwargs, target = self._split_dict(data)
            out = self.model(**kwargs)
            labels = target if target is not None else next((kwargs[k] for k in TARGET_KEYS if k in kwargs), None)
            loss_out = self.loss_fn(out, target) if self.loss_fn is not None else out
        elif isinstance(data, (tuple, list)) and self.loss_fn is not None:
            inputs, labels = data[0], data[-1]
            out = self.model(*data[:-1]) if len(data) > 2 else self.model(inputs)
            loss_out = self.loss_fn(out, labels)
        elif isinstance(data, (tuple, list)):
            out = loss_out = self.model(*data)
        else:
            out = loss_out = self.model(data)
        loss = extract_loss(loss_out)
        if self.loss_note is None:
            self.loss_note = _loss_note(loss_out, loss)
        return out, loss, labels


def _loss_note(out: Any, loss: torch.Tensor) -> str:
    """Where the loss was found, when it was by the tuple's one-scalar rule ('' otherwise)."""
    if not isinstance(out, (tuple, list)) or not out or isinstance(out[0], torch.Tensor) and out[0].numel() == 1:
        return ""
    at = next(i for i, t in enumerate(out) if t is loss)  # extract_loss returned that scalar itself
    parts = ", ".join(f"Tensor{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in out)
    return (f"the output is a {type(out).__name__} ({parts}) whose first element is not a scalar: "
            f"its one scalar tensor, element {at}, is the loss")
