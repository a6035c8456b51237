"""The training loop: ``fit()`` and ``train_step()``, with hooks at named events.

See :mod:`trainguard.engine.events` for the loop's pseudocode. Everything that is not the
step itself (logging, evaluation, checkpoints, guards, signals, the summary) is a hook.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainguard.config.schema import TrainConfig
from trainguard.engine.batch import ModelAdapter, extract_logits, split_batch, to_device
from trainguard.engine.data import Batch, DataStream
from trainguard.engine.defer import DEFER, KeptBuffers, Pending, StepStart, takes_found_inf
from trainguard.engine.events import Event, Hook, hook_method
from trainguard.engine.grads import total_norm
from trainguard.engine.precision import autocast
from trainguard.engine.state import OutOfMemory, RunState, Verdict
from trainguard.engine.strategy import SingleProcess, Strategy
from trainguard.engine import watchdog
from trainguard.errors import first_line


def handlers(hooks: list[Hook]) -> dict[Event, list]:
    """Per event, the bound methods of the hooks that override it, in hook order."""
    return {e: [m for m in (getattr(h, hook_method(e)) for h in hooks)
                if getattr(m, "__func__", None) is not getattr(Hook, hook_method(e))] for e in Event}


@dataclass
class Trainer:
    """The parts of one run, wired together; ``fit()`` runs it. Built by :func:`trainguard.run.build_trainer`."""

    model: nn.Module
    adapter: ModelAdapter
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    data: DataStream
    device: torch.device
    precision: str
    micro_batch_size: int
    cfg: TrainConfig
    hooks: list[Hook] = field(default_factory=list)
    memory: Any = None  # a trainguard.memory.meter.DeviceMemory when memory is measured (CUDA, or a budget)
    strategy: Strategy = field(default_factory=SingleProcess)  # how the step runs over the job's processes
    state: RunState = field(default_factory=RunState)
    batch: Batch | None = None
    at_boundary: bool = False  # True once fit() left the loop between steps (safe to checkpoint)
    pending: Pending | None = None  # the step whose verdict the host has not read yet (engine/defer.py)
    replaying: bool = False  # a deferred step found bad is being done again
    _handlers: tuple = (None, 0, {}, [])  # (the hooks list they came from, its length, event -> bound methods,
                                          # the hooks at STEP_END)

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]  # what the optimizer updates
        self.strategy.bind(self)
        self.kept = KeptBuffers(self.model)  # BatchNorm statistics as at each step's start

    @property
    def defers(self) -> bool:
        """Whether the guards may defer this step's verdict (engine/defer.py): a strategy that allows it
        (one process, ddp), an optimizer that takes ``found_inf``, no fp16 GradScaler, no simulated
        memory budget, not a bad step being redone."""
        return (DEFER and self.strategy.defers and not self.replaying and not self.scaler.is_enabled()
                and getattr(self.memory, "kind", None) != "simulated" and takes_found_inf(self.optimizer))

    @property
    def world(self):
        """This process's place in the job (a :class:`trainguard.distributed.World`)."""
        return self.strategy.world

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank (``data.batch_size`` is this rank's share)."""
        return max(1, math.ceil(self.data.batch_size / self.micro_batch_size))

    def fire(self, event: Event) -> None:
        """Call every hook's method for ``event``, in order (those a hook overrides; the rest are no-ops)."""
        if self._handlers[0] is not self.hooks or self._handlers[1] != len(self.hooks):  # hooks set or added since
            by_event = handlers(self.hooks)
            self._handlers = (self.hooks, len(self.hooks), by_event,
                              [getattr(m, "__self__", None) for m in by_event[Event.STEP_END]])
        for method in self._handlers[2][event]:
            method(self)

    def fit(self) -> RunState:
        """Train until ``max_steps``, or until a hook sets ``state.stop``. FIT_END fires at every end."""
        st = self.state
        try:
            self.fire(Event.FIT_START)
            while not st.stop and st.step < self.cfg.max_steps:
                watchdog.step_begins(st.step + 1)  # progress marks for the stall watchdog (a few stores)
                t = time.perf_counter()
                self.batch = next(self.data)
                st.input_wait_s += time.perf_counter() - t
                st.batch_ids = self.batch.ids
                watchdog.begin("step")
                self.fire(Event.STEP_START)
                if not self.train_step(self.batch):
                    break  # the step could not be computed: the run ends before it (state as after the last step)
                st.epoch, st.position = self.data.epoch, self.data.position
                if not (self.pending is not None and self.needs_verdict() and self.settle(begun=False)):
                    self.fire(Event.STEP_END)  # (a deferred step found bad was redone, its STEP_END with it)
            self.settle(begun=False)  # a step still deferred
            self.at_boundary = True
            if st.status == "running":
                st.status = "completed"
        except KeyboardInterrupt:
            if st.status == "running":
                st.status, st.exit_code, st.error = "interrupted", 130, "interrupted by a second Ctrl-C (no checkpoint)"
            raise
        except BaseException as e:
            if st.status == "running":
                st.status, st.exit_code = "failed", getattr(e, "exit_code", 1)
                st.error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
                st.hint = getattr(e, "hint", None)  # set by trainguard's own errors: a diagnosis, not a symptom
            raise
        finally:
            watchdog.begin("end")
            self.fire(Event.FIT_END)
        return st

    def train_step(self, batch: Batch) -> bool:
        """One optimizer step over ``batch``, accumulated over micro-batches.

        Returns False when its gradients could not be computed (out of memory, and no hook
        recovered): nothing of the step was applied.
        """
        st, opt = self.state, self.optimizer
        if not self.model.training:  # not every step: train() walks every module
            self.model.train()
        self.strategy.begin_step(self)  # in a group: rank 0's buffers (BatchNorm statistics) everywhere
        while True:
            st.skip_step, st.found_inf, st.loss_value = False, None, None
            st.lr = opt.param_groups[0]["lr"]
            buffers = self.kept.capture()  # BatchNorm statistics before the forward (a bad step puts them back)
            start = StepStart.take(self, buffers) if self.defers else None
            if not self.gradients(batch):
                return False
            if not self.settle(begun=True):  # the previous step's verdict, now that this step is queued
                break
            if st.stop:  # that step was bad, redone, and the run ends after it
                return False
            batch = self.batch  # it was bad and redone, and this step started again (known-bad samples dropped)
        self.fire(Event.AFTER_BACKWARD)
        self.unscale_and_clip()
        self.fire(Event.BEFORE_OPTIMIZER_STEP)
        if not st.skip_step:
            self.optimizer_step()
            self.scheduler.step()
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        if st.found_inf is not None and start is not None:  # deferred: its verdict is read later
            self.pending = Pending(start, st.loss, st.grad_norm, st.found_inf)
        st.step += 1
        st.samples += self.strategy.samples(batch)  # every rank's
        return True

    def optimizer_step(self) -> None:
        """The update; with ``state.found_inf`` set (a deferred verdict), skipped on the device when the flag is."""
        opt, flag = self.optimizer, self.state.found_inf
        if flag is None:
            self.scaler.step(opt)
            return
        opt.found_inf, opt.grad_scale = flag.float(), None  # what GradScaler hands a fused optimizer
        try:
            self.scaler.step(opt)
        finally:
            del opt.found_inf, opt.grad_scale

    def needs_verdict(self) -> bool:
        """Whether STEP_END must see this step's verdict: the run ends here, or a hook reads values now."""
        st = self.state
        return (st.stop or st.step >= self.cfg.max_steps
                or any(not hasattr(h, "needs_verdict") or h.needs_verdict(self) for h in self._handlers[3]))

    def settle(self, begun: bool) -> bool:
        """Read the deferred step's verdict (:mod:`~trainguard.engine.defer`). Healthy: VERDICT fires.
        Bad: the step is redone at once (:meth:`replay`); ``begun``: the next step had begun, and
        starts again. Returns True when a step was redone."""
        p, self.pending = self.pending, None
        if p is None:
            return False
        loss, norm, bad = p.read()
        if not bad:
            self.state.verdict = Verdict(p.step, loss, norm)
            self.fire(Event.VERDICT)
            return False
        self.replay(p, begun)
        return True

    def replay(self, p: Pending, begun: bool) -> None:
        """A deferred step found bad, done again as an undeferred one from its start (its masked update
        changed no weights and no optimizer state; RNG, BatchNorm statistics, scheduler and counters are
        put back): the same gradients, and the guards decide on it at once. Then its STEP_END, and the
        next step's STEP_START again if it had begun (its gradients are dropped: it runs again)."""
        st, nxt = self.state, self.batch
        self.optimizer.zero_grad(set_to_none=True)
        after = (st.epoch, st.position)
        p.restore(self)
        self.replaying = True
        try:
            done = self.train_step(p.start.batch)
        finally:
            self.replaying = False
        if not done:  # out of memory and nobody recovered: the run ends before that step
            return
        st.epoch, st.position = after
        self.fire(Event.STEP_END)
        if begun and not st.stop:
            self.batch, st.batch_ids = nxt, nxt.ids
            self.fire(Event.STEP_START)

    def gradients(self, batch: Batch) -> bool:
        """``forward_backward`` into ``state.loss``, redone while an OUT_OF_MEMORY hook recovers.

        Returns False if the run must end before this step (``state.stop`` is then set).
        """
        st = self.state
        st.loss = self.forward_backward(batch)
        while st.oom is not None:
            self.fire(Event.OUT_OF_MEMORY)
            if st.oom is not None:  # no hook lowered the micro-batch
                if not st.stop:
                    st.request_stop("failed", st.oom.describe(), hint="lower train.micro_batch_size, or set guard.on_oom: split")
                return False
            st.loss = self.forward_backward(batch)
        return True

    def unscale_and_clip(self) -> None:
        """Unscale fp16 gradients and clip (``grad_clip`` > 0); the total norm stays a device tensor
        (no host sync). Unclipped, only the norm is taken (the guards' finite check reads it)."""
        self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:
            self.state.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            self.state.grad_norm = total_norm(self.params)

    def retry_step(self, batch: Batch) -> bool:
        """Redo this step's gradients on another batch (fewer samples, or smaller micro-batches).

        Called by hooks at BEFORE_OPTIMIZER_STEP. Not with an fp16 GradScaler, which allows
        one unscale per step. Returns False if the run must end before this step.
        """
        assert not self.scaler.is_enabled(), "retry_step needs the scaler disabled (fp32/bf16)"
        self.optimizer.zero_grad(set_to_none=True)
        self.batch = batch
        self.state.batch_ids = batch.ids
        if not self.gradients(batch):
            return False
        self.unscale_and_clip()
        return True

    def forward_backward(self, batch: Batch) -> torch.Tensor | None:
        """Forward and backward over the micro-batches (the strategy's :meth:`~Strategy.accumulate`);
        returns the sample-weighted mean loss, the same gradient whatever the micro-batch size.

        Out of device memory, the attempt is undone (partial gradients dropped, RNG streams restored,
        the exception and the activations its traceback holds released) and ``state.oom`` says so. In
        a process group the ranks then agree (:meth:`~Strategy.agree`): one rank's out-of-memory is
        every rank's, and the gradients are reduced only once none ran out.
        """
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state() if self.device.type == "cuda" else None)
        oom = loss = None
        try:
            loss = self.strategy.accumulate(self, batch)
        except torch.OutOfMemoryError as e:
            oom = OutOfMemory(self.state.step + 1, self.micro_batch_size, first_line(e, 300))
        # outside the except block: the exception and its frames are gone, so memory is free again
        loss, oom = self.strategy.agree(self, batch, loss, oom)
        if oom is None:
            return loss
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1])
        if self.memory is not None:
            oom.in_use, oom.limit = self.memory.release()
        self.state.oom = oom
        return None

    @torch.no_grad()
    def evaluate(self, data: DataStream, max_batches: int = 0) -> dict[str, float]:
        """Loss (and accuracy, when the output has logits and the batch has labels) on ``data``.

        Runs in eval mode under no_grad and restores train mode afterwards. In a process group
        each rank evaluates its share of every batch with rank 0's buffers, and the sums are
        reduced: every rank gets the metrics of the whole pass.
        """
        self.strategy.begin_eval(self)
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        counted = torch.zeros((), device=self.device, dtype=torch.long)
        n_samples = 0
        phase = watchdog.begin("eval")  # progress is per batch: a long evaluation is not a stall
        try:
            for i, batch in enumerate(data.one_pass()):
                watchdog.touch()
                if max_batches and i >= max_batches:
                    break
                if batch.data is None:
                    continue
                for micro, k in split_batch(batch.data, self.micro_batch_size):  # follows OOM splits
                    micro = to_device(micro, self.device, non_blocking=True)
                    with autocast(self.device.type, self.precision):
                        out, loss, labels = self.adapter(micro)
                    loss_sum += loss.double() * k
                    n_samples += k
                    logits = extract_logits(out)
                    if logits is not None and isinstance(labels, torch.Tensor) and logits.shape[:-1] == labels.shape:
                        mask = labels != -100
                        correct += ((logits.argmax(-1) == labels) & mask).sum()
                        counted += mask.sum()
        finally:
            watchdog.begin(phase)
            self.model.train(was_training)
            self.strategy.end_forwards(self.model)
        sums = torch.stack([loss_sum, torch.tensor(float(n_samples), device=self.device, dtype=torch.float64),
                            correct.double(), counted.double()])
        loss_total, n, right, judged = self.strategy.reduce_sums(sums).tolist()
        metrics = {"loss": loss_total / max(1.0, n)}
        if judged > 0:
            metrics["accuracy"] = right / judged
        return metrics
