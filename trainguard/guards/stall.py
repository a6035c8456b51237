"""The stall watchdog (``guard.stall_timeout``): a run that stops making progress is never a silent death.

A daemon thread, started at FIT_START and stopped at FIT_END, reads this process's progress marks
(:mod:`trainguard.engine.watchdog`) about once a second. Nothing runs on the training thread for
it beyond those few stores per step.

* A sample's fetch that hangs is abandoned where it runs (the fetch alarm, in the main process
  with 0 loader workers, in each worker with N): the sample becomes a bad sample (a ``skip``
  event, counted in the skip budget) and later epochs leave it out without fetching it.
* Anything else that makes no progress for its allowance (a step, the model's forward, a
  collective, an evaluation batch, a checkpoint write, a fetch blocked in C) stops the run: every
  thread's stack into ``<run_dir>/stall_stacks.txt`` (``stall_stacks.rank<r>.txt`` in a process
  group), one ``error:`` naming where (the sample, the module, the rank that did not arrive) with
  a ``hint:``, exit 1, the newest checkpoint untouched. The main thread is interrupted first (a
  :class:`~trainguard.engine.watchdog.StallStop` raised there, reported as any failure); if it
  does not unwind within a short grace (blocked in C), this thread writes ``summary.json`` and the
  error itself and ends the process (``os._exit(1)``).
* In a process group each rank publishes its progress into the job's c10d store from this thread
  (about once a second, never from the training thread); a rank that waits in a collective past
  its allowance reads the others' to name the one that did not arrive, and waits on while that
  one is still within its own allowance (a stalled fetch being abandoned, a checkpoint write).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

from trainguard import distributed
from trainguard.engine.data import IDLE
from trainguard.engine.events import Hook
from trainguard.engine.watchdog import PROGRESS, StallStop, begin, install_alarm, interrupt, release_alarm

FLOOR_S = 300.0          # auto: the least a step (and a sample's fetch) may take before it is a stall
SLOWEST_FACTOR = 10.0    # auto: ... or this many times the slowest step so far
LONG_AUTO_S = 1800.0     # auto: the preflight, the first step (compile, warm-up) and checkpoint writes
LONG_FACTOR = 10.0       # SECONDS: those get this many times the setting
FETCH_SLACK = 1.5        # a fetch is abandoned within 1.25 x its allowance; past 1.5 x it could not be


def allowances(setting, slowest: float = 0.0) -> tuple[float, float, float]:
    """``(step, long, fetch)`` seconds for ``guard.stall_timeout`` after a slowest step of ``slowest`` s:
    a step, collective or evaluation batch; the preflight, first step and checkpoint writes; one
    sample's fetch."""
    if setting == "auto":
        step = max(FLOOR_S, SLOWEST_FACTOR * slowest)
        return step, max(LONG_AUTO_S, step), FLOOR_S
    s = float(setting)
    return s, LONG_FACTOR * s, s


def group_timeout(setting) -> float:
    """The process group's own timeout (``init_process_group(timeout=...)``): longer than any wait
    the watchdog allows, so that its diagnosis comes first, and never torch's 10-30 minute default
    when the setting is shorter."""
    return allowances(setting)[1] * 1.25 + 30.0


def _frames(ident: int) -> list:
    """The thread's frames, innermost first."""
    f, out = sys._current_frames().get(ident), []
    while f is not None:
        out.append(f)
        f = f.f_back
    return out


_TORCH = os.path.dirname(torch.__file__)
_STDLIB = os.path.dirname(os.__file__)
_DIST = os.path.join(_TORCH, "distributed")


class StallWatchdog(Hook):
    """``guard.stall_timeout``: abandons hung fetches, stops a run that makes no progress (see the module)."""

    after = ('Checkpointer',)  # its final save is watched too

    def __init__(self, setting, run_dir: Path, log=None, remember: bool = True):
        self.setting, self.run_dir, self.log, self.remember = setting, Path(run_dir), log, remember
        self.left_out: set[int] = set()   # samples whose fetch stalled: left out of later epochs (checkpointed)
        self.fired: tuple[str, str] | None = None
        self.trainer = None
        self._done, self._unwound, self._lock = threading.Event(), threading.Event(), threading.Lock()
        self._thread: threading.Thread | None = None
        self._main = threading.main_thread().ident
        self._store = None
        self._published = 0.0

    def state_dict(self) -> dict:
        return {"left_out": sorted(self.left_out)}

    def load_state_dict(self, d: dict) -> None:
        self.left_out = set(d.get("left_out", []))

    # ---- events --------------------------------------------------------------------------
    def watch(self, trainer) -> None:
        """Start watching (before the preflight, from run.py; else at FIT_START); once."""
        if self._thread is not None:
            return
        self.trainer, self.fired = trainer, None
        self._main = threading.get_ident()
        self.interruptible = install_alarm()  # False when train() runs in another thread: a stall then ends the process
        self._done.clear()
        self._unwound.clear()
        PROGRESS.__init__()  # this run's marks (steps, slowest step), not those of an earlier run in this process
        begin("preflight")
        self._thread = threading.Thread(target=self._watch, daemon=True, name="trainguard-stall-watchdog")
        self._thread.start()

    def close(self) -> None:
        """Stop watching (FIT_END, or a run that stops before it)."""
        with self._lock:
            self._unwound.set()
        self._done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        release_alarm()

    def on_fit_start(self, trainer) -> None:
        trainer.data.watch_stalls(self.left_out if self.remember else None)
        self.watch(trainer)

    def on_fit_end(self, trainer) -> None:
        self.close()
        st = trainer.state
        if self.fired is not None:
            trainer.data.end_workers()  # a worker blocked in C is ended now, not left behind
        if self.fired is not None and st.status == "failed":  # the stall, not what it caused (a peer's closed connection)
            st.error, st.hint, st.exit_code = self.fired[0], self.fired[1], 1

    # ---- the thread ----------------------------------------------------------------------
    def _allowance(self, phase: str) -> float:
        p, data = PROGRESS, self.trainer.data
        step, long, fetch = allowances(self.setting, p.slowest)
        if phase in ("setup", "preflight", "checkpoint", "end") or p.steps <= 1:
            return long
        if phase == "data" and not data.iterable:
            return max(step, FETCH_SLACK * fetch)  # progress is per sample: a hung one is abandoned before this
        return step

    def _watch(self) -> None:
        p, data, world = PROGRESS, self.trainer.data, self.trainer.world
        poll = min(1.0, max(0.1, allowances(self.setting)[0] / 8))
        if world.size > 1:
            try:
                self._store = distributed.progress_store()
            except (RuntimeError, OSError, ValueError) as e:  # then the error names no peer
                self._store = None
                print(f"warning: the stall watchdog cannot reach the job's store ({e}); a stall will not name the rank",
                      file=sys.stderr)
        last, changed = None, time.monotonic()
        while not self._done.wait(poll):
            now = time.monotonic()
            beats = data.fetch_beats() if p.phase == "data" else None
            snap = (p.phase, p.step, p.since, p.item, p.fetches, beats)
            if snap != last:
                changed = p.since if last is None or snap[:3] != last[:3] else now
                last = snap
            idle, allowance = now - changed, self._allowance(p.phase)
            if self._store is not None and now - self._published >= 1.0:
                self._publish(idle, allowance)
            if idle <= allowance:
                continue
            if self._stalled(idle, allowance, beats):
                return

    def _where(self) -> tuple[str, str | None, bool]:
        """From the main thread's stack: a place (file:line in function), the innermost module whose
        forward it is in, and whether it waits in a collective (torch.distributed)."""
        frames = _frames(self._main)
        waiting = bool(frames) and frames[0].f_code.co_filename.startswith(_DIST)
        module = None
        names = {id(m): n for n, m in self.trainer.model.named_modules()}
        for f in frames:
            obj = f.f_locals.get("self") if f.f_code.co_name == "forward" else None
            if isinstance(obj, torch.nn.Module):
                module = names.get(id(obj), "") or type(obj).__name__
                break
        place = ""
        for f in frames:
            name = f.f_code.co_filename
            if not name.startswith((_TORCH, _STDLIB)):
                try:
                    name = os.path.relpath(name)
                except ValueError:  # another drive (Windows)
                    pass
                place = f"{name}:{f.f_lineno} in {f.f_code.co_name}"
                break
        return place, module, waiting

    def _publish(self, idle: float, allowance: float) -> None:
        p = PROGRESS
        place, module, waiting = self._where() if idle > allowance / 4 else ("", None, False)
        mark = {"step": p.step, "phase": p.phase, "idle": idle, "allowance": allowance, "waiting": waiting,
                "where": (f"module `{module}`, " if module else "") + place, "t": time.time()}
        try:
            self._store.set(f"rank{self.trainer.world.rank}", json.dumps(mark))
        except (RuntimeError, OSError) as e:  # the store is gone (the job is ending): stop publishing
            print(f"warning: the stall watchdog stopped publishing progress ({e})", file=sys.stderr)
            self._store = None
        self._published = time.monotonic()

    def _peers(self) -> dict[int, dict]:
        out, world = {}, self.trainer.world
        for r in range(world.size):
            if r == world.rank:
                continue
            try:
                if self._store.check([f"rank{r}"]):
                    mark = json.loads(self._store.get(f"rank{r}"))
                    mark["idle"] += time.time() - mark["t"]
                    out[r] = mark
            except (RuntimeError, OSError, ValueError) as e:
                print(f"warning: the stall watchdog cannot read rank {r}'s progress ({e})", file=sys.stderr)
        return out

    def _stalled(self, idle: float, allowance: float, beats) -> bool:
        """No progress past the allowance: stop the run, unless this rank waits for one still within its own.
        Returns True once the run is being stopped."""
        p, trainer = PROGRESS, self.trainer
        place, module, waiting = self._where()
        where = (f" in the forward of module `{module}`" if module else "") + (f" ({place})" if place else "")
        setting = (f"guard.stall_timeout: auto = {allowance:.0f} s here" if self.setting == "auto" else
                   f"guard.stall_timeout: {float(self.setting):g}")
        ckpt = trainer.state.last_checkpoint
        resume = (f"re-running the same command resumes from {ckpt}" if ckpt else
                  "re-running the same command starts again (no checkpoint yet)")
        stacks = self.run_dir / ("stall_stacks.txt" if trainer.world.size == 1 else f"stall_stacks.rank{trainer.world.rank}.txt")
        sample_ids: list[int] = []
        if waiting and trainer.world.size > 1:
            peers = self._peers() if self._store is not None else {}
            late = {r: m for r, m in peers.items() if not m["waiting"]}
            if any(m["idle"] <= m["allowance"] for m in late.values()):
                return False  # waiting for a rank still within its allowance (a fetch being abandoned, a write)
            if late:
                r, m = min(late.items(), key=lambda kv: kv[1]["step"])
                msg = (f"stall: rank {r} did not arrive at the collective of step {p.step} for {idle:.0f} s: it has been in "
                       f"{_phase(m['phase'], m['step'])} for {m['idle']:.0f} s"
                       + (f" ({m['where']})" if m["where"] else ""))
                hint = (f"rank {r}'s stacks are in {self.run_dir / f'stall_stacks.rank{r}.txt'}; look at what it runs there "
                        f"(a deadlock, a blocking call, a hung device), or raise guard.stall_timeout if it is only slow; {resume}")
            else:
                msg = (f"stall: waiting for the other ranks in a collective of step {p.step} for {idle:.0f} s"
                       + ("; every rank waits in one (they call different collectives)" if peers else
                          " (the other ranks' progress is unknown)"))
                hint = f"every rank's stacks are in {self.run_dir}/stall_stacks.rank*.txt; {resume}"
        elif p.phase == "data":
            msg, hint, sample_ids = self._data_stall(idle, beats, stacks, resume)
        else:
            what = {"step": f"step {p.step}", "eval": f"the evaluation after step {trainer.state.step}",
                    "checkpoint": f"writing the checkpoint of step {trainer.state.step}",
                    "preflight": "the preflight (one forward and backward before step 1)",
                    "setup": "the start of the run", "end": "the end of the run"}.get(p.phase, p.phase)
            msg = f"stall: {what} made no progress for {idle:.0f} s{where}"
            fix = ("the run directory's filesystem (full, a hung network mount)" if p.phase == "checkpoint" else
                   "what it runs there (a deadlock, a blocking call, a hung device)")
            hint = f"every thread's stack is in {stacks}; look at {fix}, or raise guard.stall_timeout if it is only slow; {resume}"
        msg += f" ({setting})"
        self._stop(msg, hint, stacks, sample_ids)
        return True

    def _data_stall(self, idle: float, beats, stacks: Path, resume: str) -> tuple[str, str, list[int]]:
        p, data = PROGRESS, self.trainer.data
        stuck = [(w, b & IDLE) for w, b in enumerate(beats or []) if b & IDLE != IDLE]
        if data.iterable:
            msg = (f"stall: data.{data.name} (a stream) gave no batch for step {p.step} in {idle:.0f} s: "
                   "an item whose next() hangs cannot be skipped")
            ids: list[int] = []
        elif stuck:
            w, i = stuck[0]
            msg = (f"stall: loader worker {w} has been fetching sample {i} for more than {idle:.0f} s and could not "
                   "abandon it (it blocks outside Python, e.g. in C code)")
            ids = [i for _, i in stuck]
        elif p.item is not None and p.item >= 0:
            msg = (f"stall: the fetch of sample {p.item} made no progress for {idle:.0f} s and could not be abandoned "
                   "(it blocks outside Python, e.g. in C code, or the run is not in the main thread)")
            ids = [p.item]
        else:
            ids = data.pending_ids()
            msg = (f"stall: no batch came from the data loader for step {p.step} in {idle:.0f} s (samples "
                   f"{ids[:8]}{'...' if len(ids) > 8 else ''})")
        hint = (f"look at the dataset's loading of {'that sample' if len(ids) == 1 else 'those samples'} (a hung network "
                f"filesystem, a lock, a download); every thread's stack is in {stacks}; {resume}")
        return msg, hint, ids

    def _stop(self, msg: str, hint: str, stacks: Path, sample_ids: list[int]) -> None:
        trainer, rank = self.trainer, self.trainer.world.rank
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(stacks, "w") as f:
                f.write(f"{msg}\nevery thread's stack, innermost call last (the main thread is the training loop):\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:  # the stop goes on without the file
            print(f"warning: could not write {stacks}: {e}", file=sys.stderr)
        if self.log is not None:
            self.log.event(trainer.state.step, "stall", msg, phase=PROGRESS.phase, stacks=str(stacks),
                           **({"sample_ids": sample_ids} if sample_ids else {}))
        self.fired = (msg, hint)
        grace = min(15.0, max(3.0, allowances(self.setting, PROGRESS.slowest)[0] / 2))
        if self.interruptible:
            interrupt(StallStop(msg, hint))
        if self._unwound.wait(grace):
            return
        with self._lock:  # the main thread did not unwind (blocked in C): end the process from here
            if self._unwound.is_set():
                return
            st = trainer.state
            st.status, st.exit_code, st.error, st.hint = "failed", 1, msg, hint
            writer = next((h for h in trainer.hooks if type(h).__name__ == "SummaryWriter"), None)
            if writer is not None:
                try:
                    writer.on_fit_end(trainer)
                except (OSError, ValueError, TypeError, RuntimeError) as e:
                    print(f"warning: could not write summary.json: {e}", file=sys.stderr)
            on = f"[rank {rank}] " if rank else ""
            print(f"error: {on}{msg}\nhint: {hint}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)


def _phase(phase: str, step: int) -> str:
    return {"data": f"drawing the batch of step {step}", "step": f"step {step}", "eval": f"an evaluation before step {step}",
            "checkpoint": f"a checkpoint write before step {step}", "setup": "the start of the run",
            "preflight": "the preflight",
            "end": "the end of the run"}.get(phase, f"{phase} of step {step}")
