"""SIGINT/SIGTERM: the handler only sets a flag; the loop stops at the next step boundary.

The checkpoint is then saved by the Checkpointer at FIT_END (never from inside the handler),
``summary.json`` says ``interrupted``, and the process exits 128 + the signal number.
A second Ctrl-C exits at once. In a process group a signal stops every rank at the same step:
the next step's exchange carries it (``state.agreed.signal``), so torchrun delivering it to the
ranks at slightly different moments does not matter.
"""

from __future__ import annotations

import signal
import threading

from trainguard.engine.events import Hook


def _ignore(signum, frame) -> None:
    pass


class SignalHandler(Hook):
    """Turns SIGINT/SIGTERM into ``state.request_stop("interrupted")`` at the next step end."""

    def __init__(self, log=None):
        self.log = log
        self.received: int | None = None
        self.state = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # second Ctrl-C: leave now
        self.received = signum
        if self.state is not None:
            self.state.received_signal = signum
        if hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self._old:
            # Ctrl-C and a job scheduler's SIGTERM reach the data loader's workers too, which may die
            # of it: the DataLoader's SIGCHLD check would then fail the run mid-step. The run is
            # stopping at this step's end anyway, so that check is switched off until fit ends. A
            # Python no-op, not SIG_DFL: a SIGCHLD already pending would otherwise be reported by
            # Python as "Signal 17 ignored due to race condition", with a traceback.
            self._old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _ignore)

    def on_fit_start(self, trainer) -> None:
        self.state = trainer.state
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handler)

    def on_step_end(self, trainer) -> None:
        agreed = trainer.state.agreed
        received = agreed.signal if agreed is not None else self.received  # a process group: any rank's
        if received is not None and not trainer.state.stop:
            name = signal.Signals(received).name
            trainer.state.request_stop("interrupted", f"stopped by {name}", 128 + received)
            if self.log:
                self.log.event(trainer.state.step, "stop", f"{name} received; saving a checkpoint and exiting")

    def on_fit_end(self, trainer) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
