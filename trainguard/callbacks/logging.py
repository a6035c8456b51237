"""Metrics logging and the console progress display, as hooks."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from trainguard.callbacks.runlog import RunLog
from trainguard.callbacks.sinks import Sinks
from trainguard.engine.events import Hook


class MetricsLogger(Hook):
    """Writes a train line to metrics.jsonl every ``log_every`` steps (and the first and last),
    and a val line after every evaluation; ``sinks`` (TensorBoard, W&B, MLflow) get the same
    scalars on those steps only.

    The loss is averaged over the steps since the last line, summed in float32 from the values the
    host has anyway: the guard's verdict (read at once, ``state.loss_value``, or one step later,
    VERDICT, for a deferred step: engine/defer.py; a deferred step found bad is redone, and counted
    then). Without a guard it is summed on the device. Either way steps between log lines cost no host
    sync. The window's sum and count go into every checkpoint (:meth:`state_dict`), so the first line
    after a resume averages over the same steps as in an uninterrupted run: the logged curve does not change.
    """

    after = ('Timing',)  # the step's times, measured at its start

    def __init__(self, log: RunLog, log_every: int, max_steps: int, sinks: Sinks | None = None, memory=None):
        self.log, self.every, self.max_steps = log, log_every, max_steps
        self.memory = memory  # a DeviceMemory: each line gets the peak since the last one
        self.sinks = sinks if sinks else None  # TensorBoard, W&B, MLflow (rank 0's); called on log steps only
        if self.sinks is not None:
            log.sinks = self.sinks  # the log mirrors guard events there
        self.last: dict = {}
        self.logged_step = -1
        self._saved: dict | None = None  # the window of the checkpoint resumed from
        self.loss_sum, self.n = None, 0  # from fit start: summed on the device (no guard read the loss)
        self.host_sum = np.float32(0.0)  # summed on the host, in float32 as the device would
        self.on_device = False  # some of the window's losses were summed on the device

    def state_dict(self) -> dict:
        """The logging window so far: its loss sum (from the device now, at a checkpoint) and count."""
        if self.loss_sum is None:  # before fit start
            return dict(self._saved or {"loss_sum": torch.zeros(()), "n": 0})
        return {"loss_sum": self._sum().detach().cpu().clone(), "n": self.n}

    def _sum(self) -> torch.Tensor:
        return self.loss_sum + float(self.host_sum) if self.on_device else torch.tensor(float(self.host_sum))

    def _mean(self) -> float:
        """The window's mean loss: on the host when only guard-read values went in (no read), else one read."""
        if not self.n:
            return float("nan")
        if not self.on_device:
            return float(self.host_sum / np.float32(self.n))
        return (self._sum() / self.n).item()

    def load_state_dict(self, d: dict) -> None:
        self._saved = d

    def on_fit_start(self, trainer) -> None:
        self._reset(trainer)
        if self._saved is not None:  # the window goes on from the checkpoint's steps
            self.host_sum = np.float32(self._saved["loss_sum"].float().numpy())
            self.n = int(self._saved["n"])

    def _reset(self, trainer) -> None:
        self.loss_sum = torch.zeros((), device=trainer.device)
        self.host_sum, self.on_device = np.float32(0.0), False
        self.n, self.t0, self.samples0 = 0, time.perf_counter(), trainer.state.samples
        self.steps0 = trainer.state.step  # the rates are over this process's own steps (n may go back further)
        self.wait0 = trainer.state.input_wait_s

    def needs_verdict(self, trainer) -> bool:
        st = trainer.state
        return st.step == 1 or st.step % self.every == 0 or st.step >= self.max_steps or st.stop

    def on_verdict(self, trainer) -> None:
        self._add(trainer.state.verdict.loss)  # a deferred step, healthy

    def _add(self, loss: float) -> None:
        self.host_sum = np.float32(self.host_sum + np.float32(loss))
        self.n += 1

    def on_step_end(self, trainer) -> None:
        st = trainer.state
        if st.found_inf is not None:
            pass  # deferred: counted at VERDICT (healthy), or at the redone step's STEP_END
        elif st.skip_step:
            pass
        elif st.loss_value is not None:  # read by the guard at once
            self._add(st.loss_value)
        else:
            self.loss_sum += st.loss
            self.n += 1
            self.on_device = True
        if not self.needs_verdict(trainer):
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        loss = self._mean()
        sps = (st.samples - self.samples0) / dt
        lr = float(st.lr) if st.lr is not None else float("nan")  # a user's optimizer may keep a tensor (Adafactor)
        self.last = {"loss": loss, "lr": lr, "samples_per_s": round(sps, 2),
                     "grad_norm": float(st.grad_norm) if st.grad_norm is not None else None}
        trainer.state.final_loss = loss
        self.logged_step = st.step
        mem = {} if self.memory is None else {"peak_memory_bytes": self.memory.take_peak(), "micro_batch_size": trainer.micro_batch_size}
        self.last.update(mem)
        wait = min(1.0, (st.input_wait_s - self.wait0) / dt)
        self.log.metric(st.step, "train", loss=loss, lr=lr, samples_per_s=round(sps, 2),
                        step_time_s=round(dt / max(1, st.step - self.steps0), 5), input_wait_fraction=round(wait, 4),
                        samples=st.samples, epoch=st.epoch, **mem)
        if self.sinks is not None:
            self.sinks.scalars(st.step, {"train/loss": loss, "train/lr": lr, "train/samples_per_s": sps})
        self._reset(trainer)

    def on_eval_end(self, trainer) -> None:
        st = trainer.state
        self.log.metric(st.step, "val", **st.eval_metrics)
        if self.sinks is not None:
            self.sinks.scalars(st.step, {f"val/{k}": v for k, v in st.eval_metrics.items()})

    def on_fit_end(self, trainer) -> None:
        if self.memory is not None:
            self.memory.take_peak()
            trainer.state.report["peak_memory_bytes"] = self.memory.run_peak
            trainer.state.report["memory_limit_bytes"] = self.memory.limit
        if self.sinks is not None:
            self.log.sinks = None  # events after this point (the final checkpoint) go to events.jsonl only
            self.sinks.close()


class ConsoleProgress(Hook):
    """A rich progress bar with loss, lr and samples/s; plain log lines when stderr is not a terminal."""

    after = ('MetricsLogger',)  # shows the logger's window

    def __init__(self, metrics: MetricsLogger, max_steps: int, enabled: bool | str = "auto"):
        self.metrics, self.max_steps = metrics, max_steps
        self.console = Console(stderr=True, soft_wrap=True, highlight=False)
        self.bar = self.console.is_terminal if enabled == "auto" else bool(enabled)
        self.progress: Progress | None = None

    def on_fit_start(self, trainer) -> None:
        if not self.bar:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=self.max_steps, completed=trainer.state.step, info="")
        self.progress.start()

    def _info(self) -> str:
        m = self.metrics.last
        return f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['samples_per_s']:.0f} samples/s" if m else ""

    def needs_verdict(self, trainer) -> bool:
        return False  # it shows the logger's last line

    def on_step_end(self, trainer) -> None:
        st = trainer.state
        new = self.metrics.logged_step == st.step
        if self.progress is not None:
            if new:
                self.progress.update(self.task, completed=st.step, info=self._info())
            else:
                self.progress.update(self.task, completed=st.step)
        elif new:
            print(f"step {st.step:>6}/{self.max_steps}  {self._info()}", file=sys.stderr, flush=True)

    def on_eval_end(self, trainer) -> None:
        text = "  ".join(f"{k} {v:.4f}" for k, v in trainer.state.eval_metrics.items())
        self.console.print(f"[cyan]eval[/cyan] step {trainer.state.step}: {text}", highlight=False)

    def on_fit_end(self, trainer) -> None:
        if self.progress is not None:
            self.progress.stop()
