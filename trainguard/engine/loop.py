"""The training loop: ``fit()`` and ``train_step()``, with hooks at named events.

See :mod:`trainguard.engine.events` for the loop's pseudocode. Everything that is not the
step itself (logging, evaluation, checkpoints, guards, signals, the summary) is a hook.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainguard import distributed
from trainguard.config.schema import TrainConfig
from trainguard.engine.batch import ModelAdapter, extract_logits, slice_batch, split_batch, to_device
from trainguard.engine.data import Batch, DataStream
from trainguard.engine.events import Event, Hook, hook_method
from trainguard.engine.precision import autocast
from trainguard.engine.state import OutOfMemory, RunState
from trainguard.engine import watchdog
from trainguard.errors import RunFailed, first_line
from trainguard.guards import consensus
from trainguard.guards.localize import preserved_state


def handlers(hooks: list[Hook]) -> dict[Event, list]:
    """Per event, the bound methods of the hooks that override it, in hook order."""
    return {e: [m for m in (getattr(h, hook_method(e)) for h in hooks)
                if getattr(m, "__func__", None) is not getattr(Hook, hook_method(e))] for e in Event}


def total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, as a device tensor (what ``clip_grad_norm_`` returns)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if len({(g.device, g.dtype) for g in grads}) > 1:
        return torch.nn.utils.clip_grad_norm_(params, float("inf"))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


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
    world: distributed.World = field(default_factory=distributed.World)  # this process's place in the job
    state: RunState = field(default_factory=RunState)
    batch: Batch | None = None
    at_boundary: bool = False  # True once fit() left the loop between steps (safe to checkpoint)
    _spare: Any = None  # sharded: one sample of this rank's latest batch, for stand-in forwards
    _handlers: tuple = (None, 0, {})  # (the hooks list they came from, its length, event -> bound methods)

    def __post_init__(self) -> None:
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]  # what the optimizer updates
        self.buffers = list(self.model.buffers())
        # in a process group the gradients live in flat buckets, averaged over ranks without a copy
        self.sharded = distributed.is_sharded(self.model)  # FSDP2: gradients reduced in the backward
        self.grad_views = distributed.GradViews(self.params) if self.world.size > 1 and not self.sharded else None

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank (``data.batch_size`` is this rank's share)."""
        return max(1, math.ceil(self.data.batch_size / self.micro_batch_size))

    def fire(self, event: Event) -> None:
        """Call every hook's method for ``event``, in order (those a hook overrides; the rest are no-ops)."""
        if self._handlers[0] is not self.hooks or self._handlers[1] != len(self.hooks):  # hooks set or added since
            self._handlers = (self.hooks, len(self.hooks), handlers(self.hooks))
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
                self.fire(Event.STEP_END)
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
        st.skip_step = False
        st.lr = opt.param_groups[0]["lr"]
        if not self.model.training:  # not every step: train() walks every module
            self.model.train()
        if self.world.size > 1 and self.buffers:  # as DDP does: rank 0's buffers (BatchNorm statistics) everywhere
            distributed.broadcast_tensors(self.buffers)
        if not self.gradients(batch):
            return False
        self.fire(Event.AFTER_BACKWARD)
        self.unscale_and_clip()
        self.fire(Event.BEFORE_OPTIMIZER_STEP)
        if not st.skip_step:
            self.scaler.step(opt)
            self.scheduler.step()
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        st.step += 1
        st.samples += (len(batch) + len(batch.bad)) * self.world.size  # every rank's share is the same size
        return True

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
        """Forward and backward over the micro-batches; returns the sample-weighted mean loss.

        Each micro-batch's loss is scaled by its share of the samples present, so the summed
        gradient equals that of one big batch whatever the micro-batch size. Out of device
        memory, the attempt is undone (partial gradients dropped, RNG streams restored, the
        exception and the activations its traceback holds released) and ``state.oom`` says so.
        In a process group the ranks then agree (:meth:`_agree`): one rank's out-of-memory is
        every rank's, and the gradients are averaged only once none ran out. Sharded, a rank that
        ran out does not enter the exchange (OomRecovery takes it out of the job).
        """
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state() if self.device.type == "cuda" else None)
        oom = loss = None
        if self.grad_views is not None:
            self.grad_views.prepare()
        try:
            loss = self._accumulate(batch)
        except torch.OutOfMemoryError as e:
            oom = OutOfMemory(self.state.step + 1, self.micro_batch_size, first_line(e, 300))
        # outside the except block: the exception and its frames are gone, so memory is free again
        if self.world.size > 1 and not (self.sharded and oom is not None):  # sharded, a rank that ran out
            loss, oom = self._agree(batch, loss, oom)  # may have left the others inside the forward's collectives
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

    def _agree(self, batch: Batch, loss: torch.Tensor | None, oom: OutOfMemory | None):
        """In a process group: the step's one exchange (:func:`consensus.exchange`), then, unless
        some rank ran out of memory, the gradients averaged over every sample of every rank.
        Returns ``(loss, oom)``: the agreed mean loss, or every rank's out-of-memory."""
        st = self.state
        st.agreed = ag = consensus.exchange(loss, self.params, len(batch), len(batch.bad), oom is not None,
                                            st.received_signal,
                                            self.grad_views.present(self.params) if self.grad_views else None)
        if ag.oom_ranks:  # every rank undoes the step and splits, not only those that ran out
            if oom is None:
                oom = OutOfMemory(st.step + 1, self.micro_batch_size, "out of device memory on another rank")
            oom.ranks = ag.oom_ranks
            return None, oom
        if self.grad_views is not None:
            self.grad_views.reduce(len(batch) / ag.samples if ag.samples else 0.0, ag.present, self.params)
        elif self.sharded and ag.samples:  # FSDP's mean over ranks of per-sample sums -> the mean over samples
            with torch.no_grad():
                torch._foreach_mul_([p.grad.to_local() for p in self.params if p.grad is not None],
                                    self.world.size / ag.samples)
        return torch.tensor(ag.loss, device=self.device), None

    def _accumulate(self, batch: Batch) -> torch.Tensor:
        n = len(batch)
        if self.sharded:
            return self._accumulate_sharded(batch)
        if n == 0:  # every sample failed to load: nothing to learn from (the Guard records it)
            return torch.full((), float("nan"), device=self.device)
        if n <= self.micro_batch_size:  # one micro-batch: its loss is the step's
            micro = to_device(batch.data, self.device, non_blocking=True)
            with autocast(self.device.type, self.precision):
                _, loss, _ = self.adapter(micro)
            self.scaler.scale(loss).backward()
            return loss.detach().float()
        total = torch.zeros((), device=self.device)
        for micro, k in split_batch(batch.data, self.micro_batch_size):
            micro = to_device(micro, self.device, non_blocking=True)
            with autocast(self.device.type, self.precision):
                _, loss, _ = self.adapter(micro)
            share = k / n
            self.scaler.scale(loss * share).backward()
            total += loss.detach().float() * share
        return total

    def _accumulate_sharded(self, batch: Batch) -> torch.Tensor:
        """FSDP2: each forward and backward is a sequence of collectives, so every rank runs as many
        micro-batches as a full share of the batch needs, also when samples failed to load (or
        were left out as culprits) on this rank only. The missing ones are stand-ins: one sample
        of this rank's, weighted 0 (its RNG draws and buffer updates undone).

        Each micro-batch's loss is weighted by its sample count, not its share: FSDP averages the
        reduced gradients over ranks, and :meth:`_agree` then scales them by ranks / samples of all
        ranks, so the gradient is the mean over every sample present, as under ddp and in one
        process, also when ranks hold different numbers of samples."""
        n = len(batch)
        parts = split_batch(batch.data, self.micro_batch_size) if n else []
        if n:
            self._spare = slice_batch(batch.data, 0, 1)
        need = self.grad_accum  # micro-batches of a full share
        if len(parts) < need and self._spare is None:
            raise RunFailed("train.strategy: fsdp: every sample of this rank's first batch failed to load, and a "
                            "sharded step needs one to take part in the other ranks' forwards",
                            "fix the data (events.jsonl names the samples), or use train.strategy: ddp")
        parts += [(self._spare, 0)] * (need - len(parts))
        total = torch.zeros((), device=self.device)
        for micro, k in parts:
            micro = to_device(micro, self.device, non_blocking=True)
            with preserved_state(self.model) if k == 0 else contextlib.nullcontext(), \
                    autocast(self.device.type, self.precision):
                _, loss, _ = self.adapter(micro)
            self.scaler.scale(loss * k).backward()
            total += loss.detach().float() * (k / n if n else 0.0)
        return total if n else torch.full((), float("nan"), device=self.device)

    @torch.no_grad()
    def evaluate(self, data: DataStream, max_batches: int = 0) -> dict[str, float]:
        """Loss (and accuracy, when the output has logits and the batch has labels) on ``data``.

        Runs in eval mode under no_grad and restores train mode afterwards. In a process group
        each rank evaluates its share of every batch with rank 0's buffers, and the sums are
        reduced: every rank gets the metrics of the whole pass.
        """
        if self.world.size > 1 and self.buffers:
            distributed.broadcast_tensors(self.buffers)
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
            if self.sharded:  # forwards without a backward leave FSDP's root gathered whole
                distributed.reshard(self.model)
        sums = torch.stack([loss_sum, torch.tensor(float(n_samples), device=self.device, dtype=torch.float64),
                            correct.double(), counted.double()])
        if self.world.size > 1:
            torch.distributed.all_reduce(sums)
        loss_total, n, right, judged = sums.tolist()
        metrics = {"loss": loss_total / max(1.0, n)}
        if judged > 0:
            metrics["accuracy"] = right / judged
        return metrics
