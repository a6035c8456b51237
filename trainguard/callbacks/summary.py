"""``summary.json``: written at every end of a run, success or not."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trainguard.engine.events import Hook


# The contract's summary.json fields, with their values for a run that never took a step.
CONTRACT_FIELDS = {"status": "failed", "steps": 0, "samples": 0, "skipped_samples": 0, "skipped_steps": 0,
                   "final_loss": None, "micro_batch_size": None, "grad_accum": None, "precision": None,
                   "device": None, "profile": None, "error": None, "wall_s": 0.0}


def make_summary(**fields) -> dict:
    """A summary.json mapping: every contract field, then ``fields`` over it."""
    return {**CONTRACT_FIELDS, **fields}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON under a temporary name, fsync, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SummaryWriter(Hook):
    """Writes ``summary.json`` at FIT_END with the contract's fields (and a few more)."""

    def __init__(self, run_dir: Path, info: dict, log=None, write: bool = True, rank: int = 0):
        self.path, self.write = Path(run_dir) / "summary.json", write  # write: rank 0 of a process group
        self.rank = rank
        self.info = info  # micro_batch_size, grad_accum, precision, device, profile ...
        self.t0 = time.time()
        self.summary: dict = {}
        self.log = log

    # In a process group, a rank that fails with its own diagnosis takes the others down with it: they
    # fail in their next collective ("Connection closed by peer"), rank 0 included, which writes the
    # summary. So a failing rank leaves its error here first, and rank 0 reports that cause instead.
    def _records(self) -> list[Path]:
        return sorted(self.path.parent.glob("rank_error.rank*.json"))

    def on_fit_start(self, trainer) -> None:
        if self.write:
            for old in self._records():  # from an earlier job in this directory
                old.unlink(missing_ok=True)

    def build(self, trainer) -> dict:
        st = trainer.state
        return make_summary(
            status=st.status, steps=st.step, samples=st.samples,
            skipped_samples=st.skipped_samples, skipped_steps=st.skipped_steps,
            final_loss=st.final_loss, **self.info,
            micro_batch_size=trainer.micro_batch_size, grad_accum=trainer.grad_accum,
            error=st.error, wall_s=round(time.time() - self.t0, 3),
            eval=st.eval_metrics or None, last_checkpoint=st.last_checkpoint, exit_code=st.exit_code,
            **st.report,
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
        write_json_atomic(self.path, self.summary)
        if self.log is not None:
            st = trainer.state
            self.log.event(st.step, "end", st.error or st.status, status=st.status)
