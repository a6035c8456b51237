"""Periodic evaluation on ``data.val``, as a hook with its own cadence."""

from __future__ import annotations

from trainguard.engine.data import DataStream
from trainguard.engine.events import Event, Hook


class Evaluator(Hook):
    """Evaluates every ``every`` steps and at the last step; fires EVAL_END with ``state.eval_metrics``."""

    after = ('Guard',)  # evaluates the step the Guard let stand (a rollback comes first)

    def __init__(self, data: DataStream, every: int, max_batches: int = 0):
        self.data, self.every, self.max_batches = data, every, max_batches
        self.last_step = -1

    def _run(self, trainer) -> None:
        trainer.state.eval_metrics = trainer.evaluate(self.data, self.max_batches)
        self.last_step = trainer.state.step
        trainer.fire(Event.EVAL_END)

    def needs_verdict(self, trainer) -> bool:
        st = trainer.state
        return bool(self.every) and (st.step % self.every == 0 or st.step >= trainer.cfg.max_steps)

    def on_step_end(self, trainer) -> None:
        if self.needs_verdict(trainer):
            self._run(trainer)
