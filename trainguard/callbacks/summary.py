"""``summary.json``: written at every end of a run, success or not."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from trainguard.engine.events import Hook


# The contract's summary.json fields, with their values for a run that never took a step.
CONTRACT_FIELDS = {"status": "failed", "steps": 0, "samples": 0, "skipped_samples": 0, "skipped_steps": 0,
                   "final_loss": None, "micro_batch_size": None, "grad_accum": None, "precision": None,
                   "device": None, "profile": None, "error": None, "wall_s": 0.0}


def make_summary(**fields) -> dict:
    """A summary.json mapping: every contract field, then ``fields`` over it."""
    return {**CONTRACT_FIELDS, **fields}


def iso_time(t: float) -> str:
    """``t`` (``time.time()``) as local ISO time with its offset, to the millisecond."""
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def fmt_duration(seconds: float) -> str:
    """A wall time for people: ``4.2 s``, ``5 min 12 s``, ``2 h 3 min``."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def read_summary(path: Path) -> dict | None:
    """An existing summary.json, or None where there is none (or only a half-written or foreign file:
    it is written atomically, so that is not one of ours)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or unreadable: no earlier record (this run's end writes one)
        return None
    return data if isinstance(data, dict) else None


def earlier_segments(prev: dict | None, saved: dict | None) -> list[dict]:
    """A resumed run's earlier segments (one per process that trained): the previous summary.json's,
    unless the resumed checkpoint's own record (``saved``, the SummaryWriter's hook state) names a
    segment that summary does not know: the process that wrote the checkpoint was then killed before
    its summary (kill -9), and its segment counts up to that checkpoint, marked ``died``."""
    known = (prev or {}).get("segments")
    if known is None and prev is not None:  # a summary.json from before segments were recorded
        known = [{"started": None, "wall_s": prev.get("wall_s") or 0.0, "from_step": None,
                  "to_step": prev.get("steps"), "status": prev.get("status")}]
    known = list(known or [])
    ckpt = list((saved or {}).get("segments") or [])
    if ckpt and not any(s.get("started") == ckpt[-1].get("started") for s in known):
        return [*ckpt[:-1], {**ckpt[-1], "status": "died"}]
    return known


def after_failed_setup(prev: dict | None, error: str, exit_code: int, **fields) -> dict:
    """summary.json after an attempt that failed before its first step. A run directory's earlier
    record is kept, the failure added as ``last_attempt``; a completed run stays ``completed`` (a
    failed re-run never replaces it), any other takes the attempt's ``failed``."""
    if prev is None:
        return make_summary(error=error, exit_code=exit_code, segments=[], **fields)
    attempt = {"time": iso_time(time.time()), "status": "failed", "error": error, "exit_code": exit_code}
    if prev.get("status") == "completed":
        return {**prev, "last_attempt": attempt}
    return {**prev, "status": "failed", "error": error, "exit_code": exit_code, "last_attempt": attempt}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON under a temporary name, fsync, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if tmp.exists():  # no half-written file left beside the old one (or in place of none)
            tmp.unlink()
        raise


class SummaryWriter(Hook):
    """Writes ``summary.json`` at FIT_END with the contract's fields (and a few more).

    A resumed run is one record: ``segments`` lists every process that trained it (``started``,
    ``wall_s``, ``from_step``, ``to_step``, ``status``, ``startup_s``) and ``wall_s`` is their sum.
    The earlier segments come from the previous summary.json; each checkpoint also carries them
    (this hook's state, with the current segment up to that checkpoint), so a process killed
    before writing its summary loses only its time since its last checkpoint. ``eval``,
    ``startup_s`` and ``last_checkpoint`` carry over from the earlier segments until this one
    has its own.
    """

    after = ('*',)  # the record of every other hook's end

    CARRIED = ("eval", "startup_s", "last_checkpoint")

    def __init__(self, run_dir: Path, info: dict, log=None, write: bool = True, rank: int = 0,
                 started: float | None = None):
        self.path, self.write = Path(run_dir) / "summary.json", write  # write: rank 0 of a process group
        self.rank = rank
        self.info = info  # micro_batch_size, grad_accum, precision, device, profile ...
        self.t0 = started or time.time()  # the command's start: a segment's wall time includes its start-up
        self.summary: dict = {}
        self.log = log
        self.state = None  # the trainer's RunState, from fit start
        self.from_step = 0
        self.prior: list[dict] = []  # the run's earlier segments
        self.carried: dict = {}  # CARRIED fields of the earlier segments
        self._saved: dict | None = None  # this hook's state in the checkpoint resumed from

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the record: the segments so far, this one up to now."""
        if self.state is None:  # a checkpoint before fit start (a guard's anchor at step 0)
            return dict(self._saved or {})
        return {"segments": [*self.prior, self._segment("running")], "eval": dict(self.state.eval_metrics) or None}

    def load_state_dict(self, d: dict) -> None:
        self._saved = d

    def _segment(self, status: str) -> dict:
        st = self.state
        seg = {"started": iso_time(self.t0), "wall_s": round(time.time() - self.t0, 3), "from_step": self.from_step,
               "to_step": st.step, "status": status}
        if "startup_s" in st.report:
            seg["startup_s"] = st.report["startup_s"]
        return seg

    # In a process group, a rank that fails with its own diagnosis takes the others down with it: they
    # fail in their next collective ("Connection closed by peer"), rank 0 included, which writes the
    # summary. So a failing rank leaves its error here first, and rank 0 reports that cause instead.
    def _records(self) -> list[Path]:
        return sorted(self.path.parent.glob("rank_error.rank*.json"))

    def on_fit_start(self, trainer) -> None:
        from trainguard.checkpoint.store import step_dir_name  # here: `trainguard report` reads this module without torch

        if self.write:
            for old in self._records():  # from an earlier job in this directory
                old.unlink(missing_ok=True)
        self.state, self.from_step = trainer.state, trainer.state.step
        # a summary.json here now is this run's: a fresh start has set an earlier run's files aside
        prev = read_summary(self.path)
        self.prior = earlier_segments(prev, self._saved)
        self.carried = {k: prev[k] for k in self.CARRIED if prev and prev.get(k) is not None}
        if (self._saved or {}).get("eval"):  # the evaluation the resumed checkpoint had seen
            self.carried["eval"] = self._saved["eval"]
        started = [s["startup_s"] for s in self.prior if s.get("startup_s") is not None]
        if started and "startup_s" not in self.carried:  # a killed segment's, from its checkpoint
            self.carried["startup_s"] = started[-1]
        resumed = self.path.parent / "checkpoints" / step_dir_name(trainer.state.step)
        if trainer.state.step and resumed.is_dir():
            self.carried["last_checkpoint"] = str(resumed)
        elif not Path(self.carried.get("last_checkpoint", "")).is_dir():  # pruned since
            self.carried.pop("last_checkpoint", None)

    def build(self, trainer) -> dict:
        st = trainer.state
        if self.state is None:  # fit start never ran (a hook before this one failed there)
            self.state = st
        segments = [*self.prior, self._segment(st.status)]
        return make_summary(
            status=st.status, steps=st.step, samples=st.samples,
            skipped_samples=st.skipped_samples, skipped_steps=st.skipped_steps,
            final_loss=st.final_loss, **self.info,
            micro_batch_size=trainer.micro_batch_size, grad_accum=trainer.grad_accum,
            error=st.error, wall_s=round(sum(s.get("wall_s") or 0.0 for s in segments), 3),
            eval=st.eval_metrics or self.carried.get("eval"),
            last_checkpoint=st.last_checkpoint or self.carried.get("last_checkpoint"), exit_code=st.exit_code,
            **{**({"startup_s": self.carried["startup_s"]} if "startup_s" in self.carried else {}), **st.report},
            segments=segments,
        )

    def on_fit_end(self, trainer) -> None:
        st = trainer.state
        if not self.write:
            if st.status == "failed" and st.hint:  # a diagnosis of this rank's (see above)
                write_json_atomic(self.path.parent / f"rank_error.rank{self.rank}.json",
                                  {"rank": self.rank, "error": st.error, "hint": st.hint})
            self.summary = self.build(trainer)
            return
        records = self._records()
        if st.status == "failed" and not st.hint and records:  # rank 0 failed of another rank's failure
            cause = json.loads(records[0].read_text())
            st.error = f"rank {cause['rank']}: {cause['error']}"
            st.hint = cause["hint"]
        for r in records:
            r.unlink(missing_ok=True)
        self.summary = self.build(trainer)
        try:
            write_json_atomic(self.path, self.summary)
        except OSError as e:  # a full or failing disk: the run's own end (and error) still comes through
            print(f"warning: could not write {self.path}: {e.strerror or e}", file=sys.stderr, flush=True)
        if self.log is not None:
            st = trainer.state
            self.log.event(st.step, "end", st.error or st.status, status=st.status)
