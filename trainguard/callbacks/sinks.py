"""The loggers the metrics and guard events are mirrored to (TensorBoard, W&B, MLflow), behind one
small interface: ``scalars``, ``text``, ``flush``, ``close``.

They are called only at log steps, evaluations and events, never per step. A package that is not
installed while its key is set is a config error (exit 2, before anything trains); a logger that
fails to start or to log (no network, a bad URI, a full disk) warns once, is recorded in
``events.jsonl`` and dropped: it never stops the run.
"""

from __future__ import annotations

import difflib
import inspect
import os
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from trainguard.config.schema import LogConfig, MlflowConfig
from trainguard.errors import ConfigError, require_package

_console = Console(stderr=True, soft_wrap=True, highlight=False)

# MLflow retries a failed HTTP request 7 times with exponential backoff (minutes) and waits 120 s
# for an answer; the run waits with it. Short defaults here: a dead server costs seconds once,
# then the logger is dropped. The user's own environment settings win.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
WANDB_INIT_TIMEOUT = "30"  # online W&B without a network gives up after this (W&B's own default: 90 s)


class Sink:
    """One logger backend. ``values`` are floats keyed by tags like ``train/loss``."""

    name = "sink"

    def scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def text(self, step: int, tag: str, text: str) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was logged durable now (after a guard event); most backends need nothing."""

    def close(self) -> None:
        """Finish the run in the backend."""


class TensorBoardSink(Sink):
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(log_dir))

    def scalars(self, step, values):
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def text(self, step, tag, text):
        self.w.add_text(tag, text, step)

    def flush(self):
        self.w.flush()

    def close(self):
        self.w.close()


class WandbSink(Sink):
    """A W&B run. Every value is logged against trainguard's step (``define_metric``), not W&B's own
    monotonic ``_step``, so the steps a rollback or a resume repeats are kept, not dropped."""

    name = "wandb"

    def __init__(self, init_kwargs: dict[str, Any]):
        os.environ.setdefault("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT)
        import wandb

        self.run = wandb.init(**init_kwargs)
        self.run.define_metric("step", hidden=True)
        self.run.define_metric("*", step_metric="step")

    def scalars(self, step, values):
        self.run.log({**values, "step": step})

    def text(self, step, tag, text):
        self.run.log({tag: text, "step": step})

    def close(self):
        self.run.finish()


class MlflowSink(Sink):
    """An MLflow run through the tracking client (mlflow-skinny is enough). Scalars go as one
    ``log_batch``; guard texts are kept and written as the artifact ``guard_events.txt`` at the end
    (the running counts are metrics at once, so a killed run still has them)."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, run_name: str, config_yaml: str):
        for k, v in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=cfg.run_name or run_name, tags=cfg.tags).info.run_id
        self.client.log_text(self.run_id, config_yaml, "config.yaml")
        self.texts: list[str] = []

    def scalars(self, step, values):
        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, float(v), ms, step) for k, v in values.items()])

    def text(self, step, tag, text):
        self.texts.append(f"{tag}\t{text}")

    def close(self):
        if self.texts:
            self.client.log_text(self.run_id, "\n".join(self.texts) + "\n", "guard_events.txt")
        self.client.set_terminated(self.run_id)


class Sinks:
    """The run's sinks, called together. One that raises warns once (the console and a
    ``logger_failed`` event) and is dropped for the rest of the run."""

    def __init__(self, log=None):
        self.sinks: list[Sink] = []
        self.log = log  # the RunLog, for the logger_failed event
        self.step = 0

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def open(self, name: str, make: Callable[[], Sink]) -> None:
        try:
            self.sinks.append(make())
        except Exception as e:  # a third-party logger's start: network, auth, URI; never the run's end
            self._failed(name, "could not start", e)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.step = step
        self._each(lambda s: s.scalars(step, values))

    def text(self, step: int, tag: str, text: str) -> None:
        self.step = step
        self._each(lambda s: s.text(step, tag, text))

    def flush(self) -> None:
        self._each(lambda s: s.flush())

    def close(self) -> None:
        self._each(lambda s: s.close())
        self.sinks = []

    def _each(self, call: Callable[[Sink], None]) -> None:
        for s in list(self.sinks):
            try:
                call(s)
            except Exception as e:  # a logger that fails while logging warns once and is dropped
                self.sinks.remove(s)
                self._failed(s.name, "failed", e)

    def _failed(self, name: str, what: str, e: Exception) -> None:
        why = " ".join(str(e).split())[:600]  # one line: some loggers' messages span several
        msg = f"log.{name} {what} ({type(e).__name__}: {why}); the run goes on without it"
        _console.print(f"[yellow]warning[/yellow]: {msg}")
        if self.log is not None:
            self.log.event(self.step, "logger_failed", msg, logger=name)


def wandb_init_kwargs(user: dict[str, Any], run_dir: Path, config: dict) -> dict[str, Any]:
    """``log.wandb`` as ``wandb.init``'s keyword arguments, with trainguard's defaults filled in; a
    key wandb.init does not take is a ConfigError with a did-you-mean."""
    import wandb

    known = list(inspect.signature(wandb.init).parameters)
    for key in user:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"log.wandb.{key} is not an argument of wandb.init",
                              (f"did you mean `{close[0]}`? " if close else "") + "the keys are: " + ", ".join(known))
    kw = {"name": run_dir.name, "config": config, **user}
    if "dir" not in kw:  # always given: wandb reads WANDB_DIR only once per process (its first init)
        kw["dir"] = os.environ.get("WANDB_DIR") or str(run_dir)
    return kw


def open_sinks(cfg: LogConfig, run_dir: Path, log, config: dict, config_yaml: str) -> Sinks:
    """The sinks ``cfg`` asks for (rank 0 only: call this on the process that writes the run directory).

    Raises ConfigError for a package that is not installed or a key wandb.init does not take;
    a logger that fails to start warns and is left out."""
    if cfg.tensorboard:
        require_package("tensorboard", "log.tensorboard", "tensorboard")
    if cfg.wandb is not None:
        require_package("wandb", "log.wandb", "wandb")
    if cfg.mlflow is not None:
        require_package("mlflow", "log.mlflow", "mlflow")
    sinks = Sinks(log)
    if cfg.tensorboard:
        sinks.open("tensorboard", lambda: TensorBoardSink(run_dir / "tb"))
    if cfg.wandb is not None:
        kw = wandb_init_kwargs(cfg.wandb, run_dir, config)
        sinks.open("wandb", lambda: WandbSink(kw))
    if cfg.mlflow is not None:
        sinks.open("mlflow", lambda: MlflowSink(cfg.mlflow, run_dir.name, config_yaml))
    return sinks
