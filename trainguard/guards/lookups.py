"""The preflight's ``data.indices`` check: every embedding lookup of its forward receives integer
ids within the table's rows (:func:`embedding_inputs`), seen by a ``TorchFunctionMode`` that is
active only during the preflight; a failure names the table and the dataset field the ids came from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from trainguard.errors import RunFailed
from trainguard.guards.checks import Check
from trainguard.guards.localize import module_name


class _Lookups(TorchFunctionMode):
    """Sees every ``F.embedding`` / ``F.embedding_bag`` call of a forward: what it indexes with is
    really an index, whichever module (or none) made the call. Active only inside the preflight."""

    def __init__(self, model: nn.Module, micro, fields: dict[str, str]):
        super().__init__()
        self.micro, self.fields = micro, fields
        self.names: dict[int, str] = {}  # id(weight) -> the module that owns it (an Embedding first)
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and (id(w) not in self.names or isinstance(mod, (nn.Embedding, nn.EmbeddingBag))):
                self.names[id(w)] = name
        self.tables = {name: mod for name, mod in model.named_modules() if isinstance(mod, (nn.Embedding, nn.EmbeddingBag))}
        self.seen: set[str] = set()
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding or func is F.embedding_bag:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor):
                self._judge(x, w)
        return func(*args, **kwargs)

    def _judge(self, x: torch.Tensor, w: torch.Tensor) -> None:
        name = self.names.get(id(w))
        rows = w.shape[0]
        if name is not None:
            self.seen.add(name)
        mod = self.tables.get(name) if name is not None else None
        layer = (f"{type(mod).__name__ if type(mod) not in (nn.Embedding, nn.EmbeddingBag) else 'Embedding'} "
                 f"`{module_name(name)}` ({rows} rows)" if mod is not None
                 else f"the embedding lookup on `{name}.weight` ({rows} rows)" if name is not None
                 else f"an embedding lookup ({rows} rows)")
        field = _field_of(x, self.micro)
        source = f" from the dataset field `{field}`" + (f" (forward() argument `{self.fields[field]}`)"
                                                          if self.fields.get(field, field) != field else "") if field else ""
        self.checked += 1
        if x.is_floating_point() or x.is_complex():
            raise RunFailed(f"{layer} receives {str(x.dtype).replace('torch.', '')} indices{source}; embedding indices must be integers",
                            f"cast {f'`{field}`' if field else 'the token ids'} to int in the dataset "
                            "(ids read back as floats, e.g. through pandas or JSON with NaN)", check="data.indices")
        if x.numel() and not x.dtype == torch.bool:
            lo, hi = int(x.min()), int(x.max())  # host syncs: the preflight only
            if lo < 0 or hi >= rows:
                bad = hi if hi >= rows else lo
                hint = ("the tokenizer's vocabulary and the model's vocab size differ: build the model with the tokenizer's vocab size"
                        if field else "the index is computed inside the model (e.g. positions past its maximum length): "
                        "shorten the sequences, or build the model for longer ones")
                raise RunFailed(f"{layer} receives index {bad}{source}, outside [0, {rows})", hint, check="data.indices")

    def check(self) -> Check:
        """``data.indices``: what was judged, and the Embedding layers it could not judge (a skip, never a fail)."""
        unjudged = self.unjudged
        rest = f"; not judged: {', '.join(f'`{n}`' for n in unjudged[:3])}" + (
            f" (and {len(unjudged) - 3} more)" if len(unjudged) > 3 else "") + " (their forward() made no lookup by index)" if unjudged else ""
        if not self.checked:
            return Check("data.indices", "skip", "no embedding lookup by index ran in the first forward" + rest)
        return Check("data.indices", "pass", f"{self.checked} embedding lookups: integer ids within their rows" + rest)

    @property
    def unjudged(self) -> list[str]:
        return [n for n in self.tables if n not in self.seen]


@contextlib.contextmanager
def embedding_inputs(model: nn.Module, micro=None, fields: dict[str, str] | None = None):
    """Check what each embedding lookup receives during a forward: integer indices within its rows.

    Float indices (token ids saved as floats) and ids past the vocabulary are data errors that
    torch reports obscurely (on CUDA, an out-of-range id is a device-side assert that kills the
    process); here they name the layer, the dtype or the offending id, and the dataset field of
    ``micro`` the indices came from. Only real lookups are judged (``F.embedding`` and
    ``F.embedding_bag``, which ``nn.Embedding``'s own forward calls): an ``nn.Embedding`` subclass
    whose forward takes shapes or positions is judged by the lookup it makes, not by its arguments.
    Yields the :class:`_Lookups` (``.check()`` is the ``data.indices`` result).
    """
    mode = _Lookups(model, micro, fields or {})
    with mode:
        yield mode


def _field_of(x: torch.Tensor, micro, prefix: str = "") -> str | None:
    """The field of the batch ``x`` was taken from (the same storage, e.g. a view; else equal values)."""
    flat = dict(_tensors(micro, prefix))
    ptr = x.untyped_storage().data_ptr()
    for name, t in flat.items():
        if t.device == x.device and t.untyped_storage().data_ptr() == ptr:
            return name
    for name, t in flat.items():
        if t.device == x.device and t.numel() == x.numel() and t.numel() and torch.equal(t.reshape(-1).to(x.dtype), x.reshape(-1)):
            return name
    return None


def _tensors(x, prefix: str = ""):
    if isinstance(x, torch.Tensor):
        yield prefix or "input", x
    elif isinstance(x, Mapping):
        for k, v in x.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _tensors(v, f"{prefix}[{i}]" if prefix else f"item {i}")
