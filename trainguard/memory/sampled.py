"""The simulated budget counts a step's operators only while its peak is not known.

A dispatch mode costs a Python call per operator, whatever it does (an empty one doubles the step
of a small transformer on a CPU: about 10 us for each of T5's 1,900 operators), so counting every
step of a run makes ``--memory-budget`` slow for models of many small operators. But the steps of
a run repeat. A step runs the same operators on tensors of the same sizes, so it reaches the same
peak byte for byte, when it has the same *signature* (the batch's tensor shapes and dtypes, the
micro-batch, how many parameters take gradients, how many have optimizer state) and takes the same
*path*: the values its forward and backward hand to Python (``bool(mask.all())``, ``item()``,
``tolist()``), which are all that can steer it, are the same. :class:`SampledTracking` counts a
step's operators when its peak is not known that way:

* the first step of each signature and path, and the next one if that one left more live than it
  found (step 1 keeps its loss for step 2; a tensor kept from step to step: a leak is counted on
  every step);
* every step, for the rest of the run, once a counted forward or backward made a shape from values
  (``nonzero``, a boolean mask: torch's ``dynamic_output_shape`` tag), read a value that Python
  did not see (inside an operator: torch's ``data_dependent_output`` tag), called ``numpy()``, or
  took a new path three times; or once a refresh found a known peak changed;
* every ``REFRESH``-th step of a signature, which checks the peak it knows;
* any step whose known peak comes within ``MARGIN`` of the budget.

An uncounted step runs with the tracker off the dispatch stack (``SimulatedMemory.suspend``), and
the values its forward and backward read are checked as they come: at the first that no known
path of its signature read, the attempt raises :class:`NewPath` (an out-of-memory error, so the
loop undoes it as it undoes any: gradients dropped, RNG put back) and this hook, first at
OUT_OF_MEMORY, redoes it counted. Otherwise the step's peak is the known one over what was live at
its start. So the peaks logged and the out-of-memory errors are those of counting every step.
It runs in one process (a group's steps resize FSDP2's storages, which only a counted step
follows) and on an eager model (``torch.compile`` would trace the patched readers);
``TRAINGUARD_MEMORY_TRACK=every`` counts every step.
"""

from __future__ import annotations

import operator
import os
import threading
from dataclasses import dataclass, field

import torch

from trainguard.engine.events import Hook
from trainguard.memory.meter import SimulatedMemory

REFRESH = 128   # a signature's known peak is checked again after this many uncounted steps
MARGIN = 0.02   # a known peak within this fraction of the budget: the step is counted
SAME = 4096     # bytes: a refresh whose peak differs by more found the known peak changed
NEW_PATHS = 3   # new paths found in uncounted steps before every step is counted
_READERS = ("__bool__", "item", "__int__", "__float__", "__index__", "tolist", "numpy")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_DISPATCHED = {"__bool__", "item", "__int__", "__float__", "__index__"}  # one aten._local_scalar_dense each


class NewPath(torch.OutOfMemoryError):
    """An uncounted step read a value no known path of its signature read: it is redone counted."""


@dataclass
class Known:
    path: list       # the values the step's forward and backward read, in order
    peak: int        # its peak over what was live at its start
    settled: bool    # it left no more live than it found


@dataclass
class Signature:
    paths: list[Known] = field(default_factory=list)
    uncounted: int = 0


class _Reads:
    """The values a step's forward and backward give Python, through the Tensor methods that give them:
    wrapped for the run (``install``, ``remove``: a class attribute set invalidates torch's type caches,
    too dear per step), recorded inside a step's window only (``start``, ``stop``). Uncounted, each is
    checked against the known paths as it comes."""

    def __init__(self):
        self.originals: dict = {}
        self.values: list = []
        self.paths: list[list] | None = None  # uncounted: the known paths that agree so far
        self.dispatched = 0
        self.new_path = False
        self.on = False  # recording
        self.thread = threading.get_ident()  # the loop's: a loader's or a logger's thread reads apart

    def install(self) -> None:
        if not self.originals:
            self.originals = {n: getattr(torch.Tensor, n) for n in _READERS}
            for n, f in self.originals.items():
                setattr(torch.Tensor, n, self._reader(n, f))

    def remove(self) -> None:
        for n, f in self.originals.items():
            setattr(torch.Tensor, n, f)
        self.originals, self.on = {}, False

    def start(self, paths: list[list] | None) -> None:
        self.values, self.paths, self.dispatched, self.new_path = [], paths, 0, False
        self.thread, self.on = threading.get_ident(), True

    def stop(self) -> None:
        self.on = False

    def _reader(self, name: str, original):
        reads = self

        def read(t, *args, **kwargs):
            value = original(t, *args, **kwargs)
            if reads.on and threading.get_ident() == reads.thread:
                reads.saw(name, value)
            return value

        read.__name__ = name
        return read

    def saw(self, name: str, value) -> None:
        i = len(self.values)
        self.values.append((name, None if name == "numpy" else value))
        self.dispatched += name in _DISPATCHED
        if self.paths is not None and not self.new_path:
            self.paths = [p for p in self.paths if len(p) > i and p[i] == self.values[i]]
            if not self.paths:
                self.new_path = True
                raise NewPath(f"the step read {name}() = {value!r}, which no counted step of these shapes read: "
                              "it is redone with its memory counted")


class SampledTracking(Hook):
    """Counts a step's operators under a simulated budget only while its peak is not known (see the
    module's docstring). Its window opens last at STEP_START (:class:`StepOpens`, its companion); it is
    first at OUT_OF_MEMORY (a new path's redo) and at STEP_END, so the logger reads a peak that includes
    the step."""

    name = "memory_sampling"

    def __init__(self, memory: SimulatedMemory, log=None):
        self.memory, self.tracker, self.log = memory, memory.tracker, log
        self.known: dict[tuple, Signature] = {}
        self.every: str | None = None  # why every step is counted now
        self.new_paths = 0  # found in uncounted steps
        self.reads = _Reads()
        self._step: list | None = None  # [signature, live at start, peak before, counted]
        self._held = None  # the last step's loss, over an uncounted step (a failed attempt drops the loop's)

    @staticmethod
    def enabled(trainer) -> bool:
        return (getattr(trainer.memory, "kind", None) == "simulated" and trainer.world.size == 1
                and not trainer.cfg.compile  # (a compiled forward would trace the patched readers)
                and os.environ.get("TRAINGUARD_MEMORY_TRACK", "sampled") != "every")

    def signature(self, trainer) -> tuple:
        shapes: list = []
        _shapes(trainer.batch.data if trainer.batch is not None else None, shapes)
        return (tuple(shapes), trainer.micro_batch_size, sum(map(_REQUIRES_GRAD, trainer.params)),
                len(trainer.optimizer.state))

    def companion(self) -> "StepOpens":
        """The hook that opens each step's window, last at STEP_START (after every hook that may read a
        value or change the batch there): list it with this one."""
        return StepOpens(self)

    # ---- the step's window: the last STEP_START hook to AFTER_BACKWARD (its reads), to STEP_END (its peak)
    def open_step(self, trainer) -> None:
        tr = self.tracker
        if self.every is not None:  # nothing is recorded any more: no signature either
            self._step = [None, tr.live, tr.peak, True]
            self._count()
            return
        sig = self.signature(trainer)
        known = self.known.setdefault(sig, Signature())
        settled = [k for k in known.paths if k.settled]
        count = (not settled or len(settled) < len(known.paths)
                 or known.uncounted >= REFRESH or not self.memory.can_suspend()
                 or tr.live + max(k.peak for k in settled) > tr.limit * (1 - MARGIN))
        self._step = [sig, tr.live, tr.peak, count]
        if count:
            self._count()
        else:
            known.uncounted += 1
            self._held = trainer.state.loss  # live until an attempt counted as every step would be: redone, it is
            self.memory.suspend()
            self.reads.start([k.path for k in settled])

    def _count(self) -> None:
        tr = self.tracker
        tr.peak = tr.live  # this step's own peak, merged back at its end
        tr.value_reads, tr.shape_from_values, tr.watching = 0, None, True
        self.reads.start(None)

    def on_out_of_memory(self, trainer) -> None:
        if self._step is None or self._step[3] or not self.reads.new_path:
            self._held = None  # a real one: the loop dropped the last step's loss, as it does counting every step
            return
        self.reads.stop()  # the uncounted attempt read a value no known path read: it is done again, counted
        trainer.kept.put_back(trainer.kept.before)  # its forward moved the BatchNorm statistics (the loop put
        self.new_paths += 1                          # back the RNG and dropped the gradients)
        self.memory.resume()
        self._step[1], self._step[3] = self.tracker.live, True
        self.known[self._step[0]].uncounted -= 1
        self._count()
        trainer.state.oom = None

    def on_after_backward(self, trainer) -> None:
        self.tracker.watching = False
        self.reads.stop()

    def on_step_end(self, trainer) -> None:
        if self._step is None:
            return
        (sig, start, before, count), self._step = self._step, None
        tr, reads, self._held = self.tracker, self.reads, None
        tr.watching = False
        reads.stop()
        if not count:
            self.memory.resume()
            st = trainer.state  # what the step keeps for the next: its loss and norm, gradients an optimizer
            tr.track(st.loss, st.grad_norm, st.found_inf, [p.grad for p in trainer.params if p.grad is not None])
            known = [k for k in self.known[sig].paths if k.path == reads.values]
            if not known:  # a path that ended early, or one a user's except swallowed NewPath in
                self._count_every(trainer, "an uncounted step took a path no counted step took")
                known = self.known[sig].paths
            tr.peak = max(before, start + max(k.peak for k in known))
            return
        peak, tr.peak = tr.peak - start, max(before, tr.peak)
        why = (f"its forward or backward makes a shape from tensor values ({tr.shape_from_values})" if tr.shape_from_values
               else "its forward or backward reads tensor values inside an operator" if tr.value_reads > reads.dispatched
               else "its forward or backward calls numpy()" if any(n == "numpy" for n, _ in reads.values)
               else f"its forward or backward took {NEW_PATHS} new paths" if self.new_paths >= NEW_PATHS else None)
        if why:
            self._count_every(trainer, why + ", so its memory may follow the data")
        if self.every is not None or trainer.state.skip_step or sig != self.signature(trainer):
            return  # (skipped: no optimizer step in its peak; another signature: an out-of-memory split, a retry)
        known = self.known.setdefault(sig, Signature())
        same = next((k for k in known.paths if k.path == reads.values), None)
        if same is not None and same.settled and known.uncounted and abs(peak - same.peak) > SAME:
            self._count_every(trainer, "its peak changed at the same batch shapes and path")
        if same is not None:
            known.paths.remove(same)
        known.paths.append(Known(reads.values, peak, tr.live <= start))  # settled: it kept nothing
        if known.uncounted:
            known.uncounted = 0
            tr.track(trainer.model, trainer.optimizer)  # what uncounted steps made and kept, if anything

    def _count_every(self, trainer, why: str) -> None:
        if self.every is None:
            self.every = why
            if self.log is not None:
                self.log.event(trainer.state.step, "note", f"memory budget: every step's operators are counted from "
                               f"step {trainer.state.step + 1} on: {why}")

    def on_fit_start(self, trainer) -> None:
        self.reads.install()

    def on_fit_end(self, trainer) -> None:
        self.reads.remove()
        self.tracker.watching = False
        if self._step is not None:  # the run ended inside a step: the peak before it is kept
            self.tracker.peak = max(self.tracker.peak, self._step[2])
            self._step = self._held = None
            self.memory.resume()


def _shapes(x, out: list) -> None:
    if isinstance(x, torch.Tensor):
        out.append((tuple(x.shape), x.dtype))
    elif isinstance(x, dict):
        for k, v in x.items():
            out.append(k)
            _shapes(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _shapes(v, out)
    elif x is None or isinstance(x, (bool, int, float, str)):  # plain values in the batch (a count, a text)
        out.append(x)
    else:
        out.append(type(x).__name__)


class StepOpens(Hook):
    """:class:`SampledTracking`'s window opener: last at STEP_START, so the reads it checks are the step's
    own (a hook that reads a value at STEP_START is not part of a path) and the signature is of the batch
    the step trains on (after the guard dropped known-bad samples)."""

    name = "memory_sampling_opens"
    after = ("*",)

    def __init__(self, owner: SampledTracking):
        self.owner = owner

    def on_step_start(self, trainer) -> None:
        self.owner.open_step(trainer)
