"""The Checkpointer hook: saves on its own cadence and at the end, restores on resume."""

from __future__ import annotations

import math
import shutil
import time
import weakref
from pathlib import Path

import torch

from trainguard import distributed
from trainguard.checkpoint import rng, sharded, store
from trainguard.config.schema import CheckpointConfig
from trainguard.engine import watchdog
from trainguard.engine.events import Event, Hook, state_keys
from trainguard.errors import require_package


def params_finite(model: torch.nn.Module) -> bool:
    """True if every parameter and buffer is finite (one host sync). Sharded (FSDP2), each rank
    checks its own shards (DTensors; a DTensor reduction stacked with a plain buffer's, BatchNorm's
    statistics, cannot be combined) and the ranks agree, since saving is a collective."""
    flags = [torch.isfinite(distributed.local(t)).all() for t in (*model.parameters(), *model.buffers())
             if t.is_floating_point()]
    ok = bool(torch.stack(flags).all()) if flags else True
    return all(distributed.gather_objects(ok)) if distributed.is_sharded(model) else ok


def trainer_state(trainer, rngs: list[dict] | None = None, streams: list | None = None) -> dict:
    """Everything but the weights that resume needs, as tensors and plain values. ``rngs``: every
    rank's RNG states, in rank order (a process group); one process keeps only ``rng``. ``streams``:
    every rank's stream position (its own part of a stream); one process: its own. A sharded
    run's optimizer is not here (None) but in the checkpoint's shards (:mod:`sharded`)."""
    hooks = {k: h.state_dict() for k, h in zip(state_keys(trainer.hooks), trainer.hooks) if hasattr(h, "state_dict")}
    return {
        "rng_ranks": rngs or [],
        "optimizer": trainer.strategy.optimizer_state(trainer.model, trainer.optimizer),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": rng.capture(),
        "counters": trainer.state.counters(),
        "streams": streams or [trainer.data.stream_state(trainer.state.epoch, trainer.state.position)],
        "micro_batch_size": trainer.micro_batch_size,
        "final_loss": trainer.state.final_loss,
        "hooks": hooks,
    }


def restore_weights_and_optimizer(trainer, ckpt: Path) -> dict:
    """Load weights, optimizer, scheduler and GradScaler from ``ckpt``; returns its trainer state.
    Both files are read before anything is applied: one that does not load (:class:`store.Unloadable`)
    leaves the trainer as it was."""
    weights, ts = store.load_file(ckpt, "model.pt"), store.load_file(ckpt, "trainer.pt")
    strategy, model, optimizer = trainer.strategy, trainer.model, trainer.optimizer
    strategy.load_model_state(model, weights)
    shards = strategy.optimizer_shards(model, optimizer) if (ckpt / sharded.DIRNAME).is_dir() else None
    if shards is not None:  # a sharded run's: every rank reads its own shards into their layout
        sharded.load_optimizer(shards, ckpt / sharded.DIRNAME)
        strategy.load_optimizer_shards(model, optimizer, shards)
    else:
        strategy.load_optimizer_state(model, optimizer, ts["optimizer"])
    trainer.scheduler.load_state_dict(ts["scheduler"])
    trainer.scaler.load_state_dict(ts["scaler"])
    return ts


def restore_trainer(trainer, ckpt: Path) -> dict:
    """Resume: everything in the checkpoint, including counters, data position, hook state and RNG.
    Returns the checkpoint's trainer state."""
    ts = restore_weights_and_optimizer(trainer, ckpt)
    for k, v in ts["counters"].items():
        setattr(trainer.state, k, v)
    trainer.state.final_loss = ts.get("final_loss")
    for k, h in zip(state_keys(trainer.hooks), trainer.hooks):  # each its own (two of one class included)
        if hasattr(h, "load_state_dict") and k in ts["hooks"]:
            h.load_state_dict(ts["hooks"][k])
    streams = ts.get("streams")  # each rank's part of a stream (absent in checkpoints from before streams had parts)
    if streams and trainer.data.iterable:
        trainer.data.load_stream_state(streams[trainer.world.rank if len(streams) > 1 else 0])
        trainer.state.epoch, trainer.state.position = trainer.data.epoch, trainer.data.position  # this rank's own
    else:
        trainer.data.seek(trainer.state.epoch, trainer.state.position)
    rng.restore(ts["rng_ranks"][trainer.world.rank] if trainer.world.size > 1 else ts["rng"])
    return ts


_HIGHER_IS_BETTER = ("acc", "f1", "auc", "precision", "recall", "bleu", "rouge", "map", "iou", "dice", "score")


def higher_is_better(metric: str, mode: str = "auto") -> bool:
    """``best_mode``: ``max``/``min`` as said; ``auto`` reads the metric's name (``accuracy`` up, ``loss`` down)."""
    if mode != "auto":
        return mode == "max"
    return any(word in metric.lower() for word in _HIGHER_IS_BETTER)


class Checkpointer(Hook):
    """Saves every ``every_steps`` steps, every ``every_minutes`` of wall-clock time since the last
    save, after a new best evaluation, and when the loop ends at a step boundary (completed,
    interrupted, or stopped by a guard); keeps the newest ``keep_last`` plus the best. A save the
    disk refuses (full) stops the run (failed) with nothing of it left behind."""

    after = ('Guard', 'Evaluator')  # never saves a step the Guard refused; `best` reads the evaluation

    def __init__(self, root: Path, cfg: CheckpointConfig, config_yaml: str, log=None):
        self.root, self.cfg, self.config_yaml, self.log = Path(root), cfg, config_yaml, log
        if cfg.safetensors:
            require_package("safetensors", "checkpoint.safetensors", "safetensors", "set checkpoint.safetensors: false")
        self.last_saved = -1
        self.best_value: float | None = None
        self.best_step: int | None = None
        self._best_pending = False
        self.every_s = cfg.every_minutes * 60
        self._deadline = math.inf  # time.monotonic() when the next save on time is due
        self._decided: tuple = (None, None, None)  # (step, its batch, why it is saved or None): see _due
        self._next_check = 0  # a process group: the step at which rank 0's clock is asked next
        self._last_check = (0, 0.0)  # (step, time) of that last question
        self.write_failed: store.CheckpointWriteFailed | None = None

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_step": self.best_step}

    def load_state_dict(self, d: dict) -> None:
        self.best_value, self.best_step = d["best_value"], d["best_step"]

    def on_fit_start(self, trainer) -> None:
        if trainer.world.is_main:
            store.clean_temporaries(self.root)
        self.last_saved = trainer.state.step if trainer.state.step else -1
        now = time.monotonic()
        self._deadline = now + self.every_s if self.every_s else math.inf
        self._next_check, self._last_check = trainer.state.step + 1, (trainer.state.step, now)

    def on_eval_end(self, trainer) -> None:
        metric = self.cfg.best_metric
        value = trainer.state.eval_metrics.get(metric) if metric else None
        if value is None or value != value:  # absent, or NaN: never the best
            return
        sign = 1 if higher_is_better(metric, self.cfg.best_mode) else -1
        if self.best_value is None or sign * value > sign * self.best_value:
            self.best_value, self.best_step, self._best_pending = value, trainer.state.step, True

    def _due(self, trainer) -> str | None:
        """Why this step is saved (steps, time, best), or None; decided once per step (a deferred step
        found bad and redone fires STEP_END again, and is saved or not as decided the first time)."""
        step = trainer.state.step
        if self._decided[0] == step and self._decided[1] is not None and self._decided[1]() is trainer.batch:
            return self._decided[2]
        on_steps = bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0
        on_time = not on_steps and bool(self.every_s) and (
            time.monotonic() >= self._deadline if trainer.world.size == 1 else self._due_in_group(trainer, step))
        due = None
        if (on_steps or on_time or self._best_pending) and step < trainer.cfg.max_steps and step != self.last_saved:
            due = "steps" if on_steps else "time" if on_time else "best"
        self._decided = (step, weakref.ref(trainer.batch) if trainer.batch is not None else None, due)  # not kept alive
        return due

    def needs_verdict(self, trainer) -> bool:
        return self._due(trainer) is not None

    def on_step_end(self, trainer) -> None:
        due = self._due(trainer)
        if due is not None:
            self.save(trainer, trigger=due)

    def on_fit_end(self, trainer) -> None:
        # a guard stop (failed) also ends at a step boundary: keep that work too (save() refuses
        # non-finite parameters), so raising a budget and re-running continues from here
        ended = trainer.at_boundary and trainer.state.status in ("completed", "interrupted", "failed")
        if ended and trainer.state.step != self.last_saved and self.write_failed is None:
            self.save(trainer)
        if self.best_step is not None and (self.root / store.step_dir_name(self.best_step)).is_dir():
            trainer.state.report["best"] = {"metric": self.cfg.best_metric, "value": self.best_value, "step": self.best_step,
                                            "checkpoint": str(self.root / store.step_dir_name(self.best_step))}

    def save(self, trainer, trigger: str | None = None) -> Path | None:
        """Commit a checkpoint of the current step, then prune old ones.

        In a process group every rank calls this at the same step. Replicated (DDP), the weights and
        optimizer are the same on all, so rank 0 writes them, with every rank's RNG states gathered
        to it. Sharded (FSDP2), every rank first writes its shards of the optimizer into the
        temporary directory rank 0 made, and the model is gathered whole to rank 0. Either way
        rank 0 commits the directory, so a checkpoint is whole or absent for all ranks at once."""
        st = trainer.state
        self._deadline = time.monotonic() + self.every_s if self.every_s else math.inf
        if not params_finite(trainer.model):
            if self.log:
                self.log.event(st.step, "checkpoint_refused", "parameters are not finite; the last good checkpoint is kept")
            return None
        phase = watchdog.begin("checkpoint")  # a write has its own allowance (guard.stall_timeout)
        rngs = distributed.gather_objects(rng.capture()) if trainer.world.size > 1 else None
        streams = (distributed.gather_objects(trainer.data.stream_state(st.epoch, st.position))
                   if trainer.world.size > 1 and trainer.data.iterable else None)  # each rank reads its own part
        tmp = None
        shards = trainer.strategy.optimizer_shards(trainer.model, trainer.optimizer)
        if shards is not None:  # every rank writes its optimizer shards into rank 0's temporary directory
            tmp = distributed.broadcast_object(store.begin(self.root, st.step) if trainer.world.is_main else None)
            sharded.save_optimizer(shards, tmp / sharded.DIRNAME)
        weights = trainer.strategy.model_state(trainer.model)  # sharded: gathered, every rank taking part
        if trainer.world.is_main:
            files = {"model.pt": weights, "trainer.pt": trainer_state(trainer, rngs, streams), "config.yaml": self.config_yaml}
            if self.cfg.safetensors:  # the same (under fsdp: gathered) state dict, in the same atomic write
                files["model.safetensors"] = store.safetensors_writer(weights)
            try:
                path = store.write_checkpoint(self.root, st.step, files, {"world_size": trainer.world.size}, tmp=tmp)
            except store.CheckpointWriteFailed as e:
                watchdog.begin(phase)
                return self._failed(trainer, e)
        else:
            path = self.root / store.step_dir_name(st.step)
        self.last_saved, self._best_pending = st.step, False
        st.last_checkpoint = str(path)
        if self.log:
            self.log.event(st.step, "checkpoint", "saved", path=str(path), **({"trigger": trigger} if trigger else {}))
        if trainer.world.is_main:
            self._prune()
        watchdog.begin(phase)
        trainer.fire(Event.CHECKPOINT_SAVED)
        return path

    def _due_in_group(self, trainer, step: int) -> bool:
        """Whether a save on time is due, the same on every rank (saving is a collective): rank 0's
        clock decides, asked only at steps every rank knows in advance: half the steps that rank 0
        predicts to the deadline (at most 15 s of them), so that healthy steps carry no collective
        of this and a misjudged step time costs little lateness."""
        if step < self._next_check:
            return False
        answer = None
        if trainer.world.is_main:
            now = time.monotonic()
            last_step, last_time = self._last_check
            per_step = max((now - last_time) / max(step - last_step, 1), 1e-6)
            due = now >= self._deadline
            left = self.every_s if due else self._deadline - now
            answer = (due, step + max(1, int(min(left, 30.0) / 2 / per_step)))
            self._last_check = (step, now)
        due, self._next_check = distributed.broadcast_object(answer)
        return due

    def _failed(self, trainer, e) -> None:
        """A checkpoint the disk refused: the run stops here (failed), naming the newest intact one."""
        self.write_failed = e
        st = trainer.state
        if self.log:
            self.log.event(st.step, "checkpoint_failed", e.message)
        if st.status != "failed":  # a guard's stop keeps its own diagnosis
            st.request_stop("failed", e.message, hint=e.hint)
        return None

    def _prune(self) -> None:
        keep_best = store.step_dir_name(self.best_step) if self.best_step is not None else None
        for old in store.list_checkpoints(self.root)[self.cfg.keep_last:]:
            if old.name != keep_best:
                shutil.rmtree(old, ignore_errors=True)
