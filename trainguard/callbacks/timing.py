"""Where the time goes: start-up (command to first step) and waiting for data, as a hook.

``startup_s`` runs from the command's start (the process's, for the CLI) to the first step's
batch being ready: imports, building, resuming, the preflight and the first batch (loader
workers starting). ``input_wait_fraction`` is the share of the loop's time after that spent in
``next(data)`` (``RunState.input_wait_s``, kept by the loop): the steps were waiting for the
loader. Both go into summary.json; a run that waited more than :data:`INPUT_BOUND` of the time
says so at the end, with what to change.
"""

from __future__ import annotations

import time

from trainguard.engine.events import Hook
from trainguard.hardware.probe import cpu_count

INPUT_BOUND = 0.2    # a larger share of loop time waiting for data is worth a line at the end
MIN_STEPS = 10       # ... over at least this many steps


class Timing(Hook):
    def __init__(self, started: float):
        self.started = started
        self.t_first: float | None = None
        self.wait_first = 0.0
        self.steps_first = 0

    def on_step_start(self, trainer) -> None:
        if self.t_first is None:  # the first step of this process: start-up ends here
            st = trainer.state
            self.t_first, self.wait_first, self.steps_first = time.perf_counter(), st.input_wait_s, st.step
            st.report["startup_s"] = round(time.time() - self.started, 3)

    def on_fit_end(self, trainer) -> None:
        st = trainer.state
        if self.t_first is None:
            return
        loop = time.perf_counter() - self.t_first
        steps = st.step - self.steps_first
        if steps < 1 or loop <= 0:
            return
        frac = min(1.0, (st.input_wait_s - self.wait_first) / loop)
        st.report["input_wait_fraction"] = round(frac, 4)
        if frac > INPUT_BOUND and steps >= MIN_STEPS:
            from rich.console import Console

            loader = trainer.data.loader
            workers = loader.num_workers
            fix = (f"raise data.num_workers (now {workers})" if workers < cpu_count() - 1 else
                   "make the dataset's __getitem__ cheaper (decode or resize once, offline; cache in RAM)")
            st.report["input_bound"] = f"{frac:.0%} of step time waiting for data: {fix}"
            Console(stderr=True, highlight=False).print(f"[yellow]input-bound[/yellow]: {st.report['input_bound']}")
