"""SIGINT/SIGTERM: the handler only sets a flag; the loop stops at the next step boundary.

The checkpoint is then saved by the Checkpointer at FIT_END (never from inside the handler),
``summary.json`` says ``interrupted``, and the process exits 128 + the signal number.
A second Ctrl-C exits at once. In a process group a signal stops every rank at the same step:
the next step's exchange carries it (``state.agreed.signal``), so torchrun delivering it to the
ranks at slightly different moments does not matter.

torchrun starts each rank in a session of its own, so a kill -9 of the launcher (or of torchrun)
would leave the ranks training, rank 0 holding the run directory's lock and the same command
refused until they finish. In a process group each rank therefore watches its launcher: once it
is gone, the rank stops as on SIGTERM (a checkpoint, then exit 143), and the command resumes.

Once a run has completed (its last checkpoint and summary.json written), a SIGINT/SIGTERM while
the process tears down (loggers closing, loader workers shutting down) must not turn it into a
failure: under the CLI (:func:`hold_after_completion`) the process then exits 0 at once. Called
as a library, the caller's own handlers come back at the end of ``fit()``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from trainguard.engine.events import Hook


def _ignore(signum, frame) -> None:
    pass


_HOLD_AFTER_COMPLETION = False


def hold_after_completion() -> None:
    """For a process that ends with its run (the CLI): once a run has completed, SIGINT/SIGTERM exit
    0 instead of killing the process (-15) or raising KeyboardInterrupt (130) during its teardown."""
    global _HOLD_AFTER_COMPLETION
    _HOLD_AFTER_COMPLETION = True


def _exit_completed(signum, frame) -> None:
    os.write(2, f"note: {signal.Signals(signum).name} after the run completed: exiting 0\n".encode())
    for stream in (sys.stdout, sys.stderr):  # the lines printed so far (os._exit flushes nothing)
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError) as e:  # closed, or interrupted mid-write: said, and on
            os.write(2, f"note: could not flush {getattr(stream, 'name', 'a stream')}: {e}\n".encode())
    os._exit(0)


class SignalHandler(Hook):
    """Turns SIGINT/SIGTERM into ``state.request_stop("interrupted")`` at the next step end."""

    after = ('*', 'SummaryWriter')  # a signal after the summary finds the run complete

    def __init__(self, log=None):
        self.log = log
        self.received: int | None = None
        self.state = None
        self._old: dict = {}
        self._done = threading.Event()  # set at fit end: stop watching the launcher
        self.launcher_gone: int | None = None  # the launcher's pid, once it has died

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
        if trainer.world.size > 1 and os.name == "posix":
            self._done.clear()
            threading.Thread(target=self._watch_launcher, args=(os.getppid(),), daemon=True,
                             name="trainguard-launcher-watch").start()

    def _watch_launcher(self, launcher: int, every: float = 1.0) -> None:
        while not self._done.wait(every):
            if os.getppid() != launcher:  # re-parented: the launcher died without stopping us
                self.launcher_gone = launcher
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def needs_verdict(self, trainer) -> bool:
        return self.received is not None  # it stops the run here (a checkpoint follows)

    def on_step_end(self, trainer) -> None:
        agreed = trainer.state.agreed
        received = agreed.signal if agreed is not None else self.received  # a process group: any rank's
        if received is not None and not trainer.state.stop:
            name = signal.Signals(received).name
            why = f"the launcher (pid {self.launcher_gone}) is gone" if self.launcher_gone else f"{name} received"
            trainer.state.request_stop("interrupted", f"stopped by {name}" + (f" ({why})" if self.launcher_gone else ""),
                                       128 + received)
            if self.log:
                self.log.event(trainer.state.step, "stop", f"{why}; saving a checkpoint and exiting")

    def on_fit_end(self, trainer) -> None:
        self._done.set()
        held = _HOLD_AFTER_COMPLETION and trainer.state.status == "completed"
        for s, old in self._old.items():
            signal.signal(s, _exit_completed if held and s in (signal.SIGINT, signal.SIGTERM) else old)
        self._old.clear()
