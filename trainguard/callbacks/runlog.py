"""The run directory's append-only logs: ``metrics.jsonl`` and ``events.jsonl``."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them readable instead of invalid
    return v


GUARD_EVENTS = ("skip", "oom", "overflow", "rollback", "stop", "checkpoint_refused", "checkpoint_corrupt", "resume",
                "batch_coupled", "spike")


class RunLog:
    """Writes one JSON object per line, flushed at once so a killed run loses nothing logged.
    ``enabled=False`` (the ranks of a process group other than 0) writes nothing."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.events_path = self.run_dir / "events.jsonl"
        self.sinks = None  # the loggers (callbacks.sinks.Sinks: TensorBoard, W&B, MLflow) guard events are mirrored to
        self.counts: dict[str, int] = {}
        self.lost_lines = 0  # lines a full (or failing) disk refused; the run goes on, and says so once

    def truncate_after(self, step: int) -> None:
        """On resume: drop metric lines logged after ``step`` (they will be logged again)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def _append(self, path: Path, row: dict) -> None:
        if not self.enabled:
            return
        data = (json.dumps({k: _clean(v) for k, v in row.items()}) + "\n").encode("utf-8")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    if os.write(fd, data) != len(data):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                except OSError:
                    os.ftruncate(fd, start)  # never half a line: a resume reads every line back
                    raise
            finally:
                os.close(fd)
        except OSError as e:  # a full disk: not worth the run (a checkpoint that cannot be written stops it)
            self.lost_lines += 1
            if self.lost_lines == 1:
                print(f"warning: cannot write {path}: {e.strerror or e}; the run goes on, its lines are lost "
                      "until the disk takes them again", file=sys.stderr)

    def metric(self, step: int, split: str, **fields: Any) -> None:
        """Append a metrics.jsonl line: ``step``, ``split``, then ``fields``."""
        self._append(self.metrics_path, {"step": step, "split": split, **fields})

    def event(self, step: int, type: str, reason: str = "", **fields: Any) -> None:
        """Append an events.jsonl line: ``step``, ``type``, ``reason``, then ``fields`` (e.g. ``sample_ids``)."""
        self._append(self.events_path, {"step": step, "type": type, "reason": reason, "time": round(time.time(), 3), **fields})
        if self.sinks and self.enabled and type in GUARD_EVENTS:
            self._to_sinks(step, type, reason, fields)

    def _to_sinks(self, step: int, type: str, reason: str, fields: dict) -> None:
        """A guard event as text (``guard/<type>``) and a running count (``guard/<type>s``) in every
        logger; skips also count their samples, OOM splits show the new micro-batch, rollbacks the
        step returned to."""
        ids = fields.get("sample_ids") or []
        self.sinks.text(step, f"guard/{type}", f"step {step}: {reason}" + (f" (samples {ids[:20]})" if ids else ""))
        self.counts[type] = self.counts.get(type, 0) + 1
        values = {f"guard/{type}s": self.counts[type]}
        if type == "skip":
            self.counts["skipped_samples"] = self.counts.get("skipped_samples", 0) + (fields.get("samples") or len(fields.get("batch_ids") or ids))
            values["guard/skipped_samples"] = self.counts["skipped_samples"]
        elif type == "oom" and fields.get("new_micro_batch_size"):
            values["guard/micro_batch_size"] = fields["new_micro_batch_size"]
        self.sinks.scalars(step, values)
        if type == "rollback" and fields.get("to_step") is not None:
            self.sinks.scalars(fields.get("from_step", step), {"guard/rollback_to_step": fields["to_step"]})
        self.sinks.flush()
