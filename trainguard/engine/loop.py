"""The training loop: ``fit()`` and ``train_step()``, with hooks at named events.

See :mod:`trainguard.engine.events` for the loop's pseudocode. Everything that is not the
step itself (logging, evaluation, checkpoints, guards, signals, the summary) is a hook.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainguard.config.schema import TrainConfig
from trainguard.engine.batch import ModelAdapter, extract_logits, split_batch, to_device
from trainguard.engine.data import Batch, DataStream
from trainguard.engine.events import Event, Hook, hook_method
from trainguard.engine.precision import autocast
from trainguard.engine.state import RunState


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
    state: RunState = field(default_factory=RunState)
    batch: Batch | None = None
    at_boundary: bool = False  # True once fit() left the loop between steps (safe to checkpoint)

    @property
    def grad_accum(self) -> int:
        return max(1, math.ceil(self.data.batch_size / self.micro_batch_size))

    def fire(self, event: Event) -> None:
        """Call every hook's method for ``event``, in order."""
        name = hook_method(event)
        for hook in self.hooks:
            getattr(hook, name)(self)

    def fit(self) -> RunState:
        """Train until ``max_steps``, or until a hook sets ``state.stop``. FIT_END fires at every end."""
        st = self.state
        try:
            self.fire(Event.FIT_START)
            while not st.stop and st.step < self.cfg.max_steps:
                self.batch = next(self.data)
                st.batch_ids, st.epoch, st.position = self.batch.ids, self.data.epoch, self.data.position
                self.fire(Event.STEP_START)
                self.train_step(self.batch)
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
            raise
        finally:
            self.fire(Event.FIT_END)
        return st

    def train_step(self, batch: Batch) -> None:
        """One optimizer step over ``batch``, accumulated over micro-batches."""
        st, opt = self.state, self.optimizer
        st.skip_step = False
        st.lr = opt.param_groups[0]["lr"]
        self.model.train()
        st.loss = self.forward_backward(batch)
        self.fire(Event.AFTER_BACKWARD)
        self.unscale_and_clip()
        self.fire(Event.BEFORE_OPTIMIZER_STEP)
        if not st.skip_step:
            self.scaler.step(opt)
            self.scheduler.step()
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        st.step += 1
        st.samples += len(batch) + len(batch.bad)

    def unscale_and_clip(self) -> None:
        """Unscale fp16 gradients and clip; the total norm stays a device tensor (no host sync)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        self.state.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def retry_step(self, batch: Batch) -> None:
        """Redo this step's gradients on another batch (fewer samples, or smaller micro-batches).

        Called by hooks at BEFORE_OPTIMIZER_STEP. Not with an fp16 GradScaler, which allows
        one unscale per step.
        """
        assert not self.scaler.is_enabled(), "retry_step needs the scaler disabled (fp32/bf16)"
        self.optimizer.zero_grad(set_to_none=True)
        self.batch = batch
        self.state.batch_ids = batch.ids
        self.state.loss = self.forward_backward(batch)
        self.unscale_and_clip()

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """Forward and backward over the micro-batches; returns the sample-weighted mean loss.

        Each micro-batch's loss is scaled by its share of the samples present, so the summed
        gradient equals that of one big batch whatever the micro-batch size.
        """
        n = len(batch)
        total = torch.zeros((), device=self.device)
        if n == 0:  # every sample failed to load: nothing to learn from (the Guard records it)
            return total + float("nan")
        for micro, k in split_batch(batch.data, self.micro_batch_size):
            micro = to_device(micro, self.device, non_blocking=True)
            with autocast(self.device.type, self.precision):
                _, loss, _ = self.adapter(micro)
            share = k / n
            self.scaler.scale(loss * share).backward()
            total += loss.detach().float() * share
        return total

    @torch.no_grad()
    def evaluate(self, data: DataStream, max_batches: int = 0) -> dict[str, float]:
        """Loss (and accuracy, when the output has logits and the batch has labels) on ``data``.

        Runs in eval mode under no_grad and restores train mode afterwards.
        """
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        counted = torch.zeros((), device=self.device, dtype=torch.long)
        n_samples = 0
        try:
            for i, batch in enumerate(data.one_pass()):
                if max_batches and i >= max_batches:
                    break
                if batch.data is None:
                    continue
                micro = to_device(batch.data, self.device, non_blocking=True)
                with autocast(self.device.type, self.precision):
                    out, loss, labels = self.adapter(micro)
                loss_sum += loss.double() * len(batch)
                n_samples += len(batch)
                logits = extract_logits(out)
                if logits is not None and isinstance(labels, torch.Tensor) and logits.shape[:-1] == labels.shape:
                    mask = labels != -100
                    correct += ((logits.argmax(-1) == labels) & mask).sum()
                    counted += mask.sum()
        finally:
            self.model.train(was_training)
        metrics = {"loss": (loss_sum / max(1, n_samples)).item()}
        if counted.item() > 0:
            metrics["accuracy"] = (correct.double() / counted).item()
        return metrics
