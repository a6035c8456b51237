"""Named events of the training loop, and the :class:`Hook` base class.

The loop, with the events marked (``fit()`` and ``train_step()`` in ``engine/loop.py``)::

    fire(FIT_START)                          # after setup and resume, before the first step
    while step < max_steps and not stop:
        batch = next(data)                   # engine-owned order: epoch, position
        fire(STEP_START)
        for micro_batch in split(batch):     # gradient accumulation
            loss = forward(micro_batch)
            backward(loss * share)
        while out of memory:                 # the attempt is undone (gradients, RNG)
            fire(OUT_OF_MEMORY)              # OomRecovery: halve micro_batch_size, or stop
            redo the forward/backward above  # nobody recovered: the run ends before this step
        fire(AFTER_BACKWARD)                 # grads summed over micro-batches, still scaled
        unscale; clip
        fire(BEFORE_OPTIMIZER_STEP)          # guards decide: state.skip_step, state.stop
        optimizer.step(); scheduler.step()   # unless skipped
        zero_grad; step += 1
        fire(STEP_END)                       # logging, evaluation, checkpoints (own cadence)
            fire(EVAL_END)                   # after each evaluation
            fire(CHECKPOINT_SAVED)           # after each committed checkpoint
    fire(FIT_END)                            # at every end: completed, failed, interrupted

Hooks change the run only through explicit fields on :class:`~trainguard.engine.state.RunState`
(``skip_step``, ``stop``/``status``, ``oom``) and ``trainer.micro_batch_size``, never by raising
through the loop.
"""

from __future__ import annotations

from enum import Enum


class Event(str, Enum):
    """The events at which hooks are called, in loop order."""

    FIT_START = "fit_start"
    STEP_START = "step_start"
    OUT_OF_MEMORY = "out_of_memory"
    AFTER_BACKWARD = "after_backward"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    STEP_END = "step_end"
    EVAL_END = "eval_end"
    CHECKPOINT_SAVED = "checkpoint_saved"
    FIT_END = "fit_end"


class Hook:
    """Base class for hooks: one no-op method per :class:`Event`, named ``on_<event>``.

    Subclass it and override the events you need. Every method receives the trainer
    (``trainer.state`` is the :class:`RunState`; ``trainer.model``, ``trainer.optimizer`` ...).
    """

    def on_fit_start(self, trainer) -> None:
        """After setup and resume, before the first step."""

    def on_step_start(self, trainer) -> None:
        """A batch has been drawn; ``trainer.state.batch_ids`` names its samples."""

    def on_out_of_memory(self, trainer) -> None:
        """The forward/backward ran out of device memory; ``trainer.state.oom`` says where. Its
        gradients and RNG draws are undone. Lower ``trainer.micro_batch_size`` and set
        ``state.oom = None`` to redo it; otherwise the run ends before this step."""

    def on_after_backward(self, trainer) -> None:
        """Gradients of all micro-batches are accumulated (still loss-scaled under fp16)."""

    def on_before_optimizer_step(self, trainer) -> None:
        """Gradients are unscaled and clipped; set ``state.skip_step`` to skip the update."""

    def on_step_end(self, trainer) -> None:
        """The optimizer step is done (or skipped) and ``state.step`` counts it."""

    def on_eval_end(self, trainer) -> None:
        """An evaluation finished; ``trainer.state.eval_metrics`` holds its results."""

    def on_checkpoint_saved(self, trainer) -> None:
        """A checkpoint was committed at ``trainer.state.last_checkpoint``."""

    def on_fit_end(self, trainer) -> None:
        """The run ended; ``trainer.state.status`` says how."""


def hook_method(event: Event) -> str:
    """The :class:`Hook` method name for an event."""
    return f"on_{event.value}"
