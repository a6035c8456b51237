"""Live tensor bytes, counted as a device allocator would see them, with an optional cap.

:class:`TensorMemory` is a ``TorchDispatchMode``: every tensor storage that an operator creates
or reads is counted once (views share their storage) until the storage is freed (a weakref
finaliser). Storages are rounded up to 512 bytes, as CUDA's caching allocator does. With a
``limit`` it raises ``torch.OutOfMemoryError`` at the operator whose result would push the live
bytes past it, which is where a GPU of that size would have failed: so ``--memory-budget`` on a
CPU gives every OOM path a real exception in a real run (forward, backward, optimizer step).
Gradients made by the autograd engine are counted too: the mode is active in the backward.

It nests inside ``FakeTensorMode`` (fake tensors have storages of their real size), which is how
:mod:`trainguard.memory.predict` measures a step without computing it.

A wrapper subclass (a DTensor: FSDP2's parameters, their gradients and optimizer state) is
counted by the tensors it wraps (``__tensor_flatten__``): its own storage has the whole tensor's
size but holds no data.

A storage can also change size in place, ``UntypedStorage.resize_``, which no dispatch mode sees:
FSDP2 frees each block's gathered parameters that way after its forward and backward, and grows
them again before the next all-gather. While a tracker is entered, ``resize_`` is wrapped (as
torch's own ``MemTracker`` does) so the live bytes follow it, and a growth past the limit raises.

``torch.utils._python_dispatch.TorchDispatchMode`` is the documented way to write a dispatch mode,
though its module is underscored; it is used only here, and tests/test_memory.py checks the counts
against torch's own MemTracker. Storages are kept by ``id`` in a plain dict, each entry removed by a
weakref finaliser when its storage's Python object dies (torch keeps one per live storage).
"""

from __future__ import annotations

import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, is_traceable_wrapper_subclass

from trainguard.memory.sizes import fmt_bytes

BLOCK = 512  # the CUDA caching allocator's rounding


def rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


_ACTIVE: list["TensorMemory"] = []  # trackers entered now: each sees every resize_
_ORIGINAL_RESIZE = torch.UntypedStorage.resize_


def _resize(st: torch.UntypedStorage, nbytes: int):
    for tracker in _ACTIVE:
        tracker._resizing(st, nbytes)
    out = _ORIGINAL_RESIZE(st, nbytes)
    for tracker in _ACTIVE:
        tracker._resized(st)
    return out


def _watch_resizes(tracker: "TensorMemory", on: bool) -> None:
    """Wrap ``UntypedStorage.resize_`` while at least one tracker is entered."""
    if on:
        _ACTIVE.append(tracker)
    elif tracker in _ACTIVE:
        _ACTIVE.remove(tracker)
    torch.UntypedStorage.resize_ = _resize if _ACTIVE else _ORIGINAL_RESIZE


_READ, _SHAPE = torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape
_FROM_VALUES: dict = {}  # operator -> None, "read" (gives Python a value) or "shape" (a shape made from values)


def from_values(func, args) -> str | None:
    """Whether ``func``'s result comes from tensor values: ``"read"``, a value for Python (``item``,
    ``bool(t)``), or ``"shape"``, a shape that depends on values (``nonzero``, a boolean mask); torch's
    own tags, as fake tensors use them. Indexing by integer tensors keeps its index's shape."""
    kind = _FROM_VALUES.get(func, 0)
    if kind == 0:
        kind = _FROM_VALUES[func] = "read" if _READ in func.tags else "shape" if _SHAPE in func.tags else None
    if kind == "shape" and func is torch.ops.aten.index.Tensor:
        return "shape" if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]) else None
    return kind


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, (list, tuple)):
                yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


class TensorMemory(TorchDispatchMode):
    """Counts live tensor bytes (and their peak); past ``limit`` raises ``torch.OutOfMemoryError``.

    Use as a context manager. ``track()`` registers tensors made before it was entered (a model's
    parameters, an optimizer's state); tensors an operator reads are registered on first sight.
    Only the process that created it counts (a forked DataLoader worker passes through).
    """

    def __init__(self, limit: int | None = None, *, name: str = "memory budget"):
        super().__init__()
        self.limit, self.name = limit, name
        self.live = 0
        self.peak = 0
        # id(storage) -> [its counted bytes]; the entry goes when the storage's Python object dies (a
        # weakref finaliser, which runs before the id can be reused): a plain dict, as a lookup per operator
        # argument made WeakIdKeyDictionary's weak-reference objects a third of a small model's step
        self._sizes: dict[int, list[int]] = {}
        self._host: set[int] = set()  # storages made while paused (host side: a dataset's tensors): never counted
        self._pid = os.getpid()
        self.enforce = True   # False: count, but never raise (measuring past the limit)
        self.paused = False   # True: neither count nor raise (host-side copies made by the search)
        self.watching = False  # True: note the operators whose results come from tensor values (memory.sampled)
        self.value_reads = 0   # operators seen while watching that gave Python a tensor's value
        self.shape_from_values: str | None = None  # the first one seen that made a shape from values

    # ---- counting ---------------------------------------------------------------------------
    def _free(self, key: int, cell: list[int]) -> None:
        self.live -= cell[0]
        if self._sizes.get(key) is cell:
            del self._sizes[key]

    def _add(self, t: torch.Tensor) -> int:
        if is_traceable_wrapper_subclass(t):  # a DTensor's storage holds no data: its local tensor's does
            attrs, _ = t.__tensor_flatten__()
            return sum(self._add(v) for v in (getattr(t, a) for a in attrs) if isinstance(v, torch.Tensor))
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested, or a subclass without one storage
            return 0
        return self._add_storage(st)

    def _add_storage(self, st: torch.UntypedStorage) -> int:
        key = id(st)
        if key in self._sizes or key in self._host:
            return 0
        cell = [rounded(st.nbytes())]  # the storage's current size: resize_ changes it
        self._sizes[key] = cell
        weakref.finalize(st, self._free, key, cell)
        return self._grow(cell[0])

    def _mark_host(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(st)
        if key not in self._sizes and key not in self._host:
            self._host.add(key)
            weakref.finalize(st, self._host.discard, key)

    def _grow(self, n: int) -> int:
        self.live += n
        if self.live > self.peak:
            self.peak = self.live
        return n

    def _resizing(self, st: torch.UntypedStorage, nbytes: int) -> None:
        """Before ``st.resize_(nbytes)``: past the limit, raise as the allocation would."""
        if self.paused or not self.enforce or self.limit is None or os.getpid() != self._pid:
            return
        cell = self._sizes.get(id(st))
        grow = rounded(nbytes) - (cell[0] if cell is not None else 0)
        if grow > 0 and self.live + grow > self.limit:
            raise torch.OutOfMemoryError(
                f"out of memory under the {self.name} of {fmt_bytes(self.limit)} (simulated on the CPU): "
                f"tried to allocate {fmt_bytes(grow)} in UntypedStorage.resize_, with {fmt_bytes(self.live)} in use")

    def _resized(self, st: torch.UntypedStorage) -> None:
        """After ``st.resize_``: the live bytes follow the storage's new size."""
        if self.paused or os.getpid() != self._pid:
            return
        cell = self._sizes.get(id(st))
        if cell is None:
            self._add_storage(st)
            return
        new = rounded(st.nbytes())
        self.live -= cell[0]
        cell[0] = new
        self._grow(new)

    def track(self, *objs) -> None:
        """Count tensors created outside the mode: modules (parameters, gradients, buffers),
        optimizers (state), tensors, or containers of them."""
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                for t in (*obj.parameters(), *obj.buffers()):
                    self._add(t)
                    if getattr(t, "grad", None) is not None:
                        self._add(t.grad)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    for t in _tensors(state):
                        self._add(t)
            else:
                for t in _tensors(obj):
                    self._add(t)

    def innermost(self) -> bool:
        """Whether this is the dispatch mode operators reach first (entered last, none entered since)."""
        return _get_current_dispatch_mode() is self

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        self.peak = self.live

    # ---- the mode -------------------------------------------------------------------------------
    def __enter__(self):
        _watch_resizes(self, True)
        return super().__enter__()

    def __exit__(self, *exc):
        _watch_resizes(self, False)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if os.getpid() != self._pid:
            return out
        if self.watching:
            kind = from_values(func, args)
            if kind == "read":
                self.value_reads += 1
            elif kind == "shape" and self.shape_from_values is None:
                self.shape_from_values = str(func)
        if self.paused:  # made on the host (a dataset built, items loaded): its views later count nothing either
            for t in _tensors(out):
                self._mark_host(t)
            return out
        for t in _tensors(args):
            self._add(t)
        peak, new = self.peak, 0
        for t in _tensors(out):
            new += self._add(t)
        if self.enforce and self.limit is not None and new and self.live > self.limit:
            live, self.peak = self.live, peak
            del out  # the allocation "failed": its result is dropped (and never was the peak), as on a GPU
            raise torch.OutOfMemoryError(
                f"out of memory under the {self.name} of {fmt_bytes(self.limit)} (simulated on the CPU): "
                f"tried to allocate {fmt_bytes(new)} in {func}, with {fmt_bytes(live - new)} in use")
        return out
