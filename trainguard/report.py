"""``trainguard report``: what happened in one or more runs, read from their run directories alone.

A run directory holds everything: ``summary.json`` (written at every end), ``metrics.jsonl``,
``events.jsonl`` and ``config.yaml``. :func:`read_run` reads them, also while the run is still
going (the lock says so) or after it died without a summary (kill -9). :func:`summarize` turns a
run into the report's fields, :func:`plot` draws the loss, validation and learning-rate curves
with the guard events marked (matplotlib, an optional extra), and :func:`sparkline` is the
terminal's compact curve when matplotlib is absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainguard.callbacks.summary import read_summary
from trainguard.errors import ConfigError

RUN_FILES = ("summary.json", "metrics.jsonl", "events.jsonl", "config.yaml")


@dataclass
class Run:
    """One run directory's files, as read."""

    run_dir: Path
    summary: dict | None
    config: dict
    train: list[dict] = field(default_factory=list)   # metrics.jsonl, split train
    val: list[dict] = field(default_factory=list)     # ... split val
    events: list[dict] = field(default_factory=list)
    holder: dict | None = None                       # the process training there now, if any

    @property
    def name(self) -> str:
        return self.run_dir.name or str(self.run_dir)

    @property
    def status(self) -> str:
        if self.holder is not None:
            return "running"
        if self.summary is None or self._ended_before_last_start():
            return "died"  # no summary for the latest start: killed (-9) or the machine went down
        return self.summary.get("status", "?")

    def _ended_before_last_start(self) -> bool:
        """summary.json is older than the latest start or resume: it is an earlier end's."""
        starts = [e["time"] for e in self.events if e.get("type") in ("start", "resume") and "time" in e]
        path = self.run_dir / "summary.json"
        return bool(starts) and path.exists() and path.stat().st_mtime < max(starts)


def _jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a half-written last line (a live run) is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def read_run(run_dir: str | Path) -> Run:
    """Read a run directory (ConfigError if it is not one)."""
    from trainguard.checkpoint import lock

    rd = Path(run_dir)
    if not rd.is_dir() or not any((rd / f).exists() for f in RUN_FILES):
        raise ConfigError(f"{rd} is not a run directory (no {', '.join(RUN_FILES)})",
                          "give the --run-dir of a `trainguard train` (default runs/<config stem>)")
    summary = read_summary(rd / "summary.json")
    config = yaml.safe_load((rd / "config.yaml").read_text()) if (rd / "config.yaml").exists() else {}
    metrics = _jsonl(rd / "metrics.jsonl")
    return Run(rd, summary, config or {}, [m for m in metrics if m.get("split") == "train"],
               [m for m in metrics if m.get("split") == "val"], _jsonl(rd / "events.jsonl"), lock.holder(rd))


def _kind(reason: str) -> str:
    """A skip's reason without its details: ``non-finite loss``, ``sample failed to load: KeyError``."""
    head = reason.split(";")[0]
    if head.startswith("sample failed to load"):
        return ":".join(head.split(":")[:2]).strip()
    if head.startswith("loss spike"):
        return "loss spike"
    return head.split(":")[0].strip()


def summarize(run: Run) -> dict[str, Any]:
    """The report's fields for one run (``--json`` prints them)."""
    s = run.summary if run.status not in ("running", "died") else None
    train = run.train
    skips: dict[str, dict[str, int]] = {}
    for e in run.events:
        if e.get("type") == "skip":
            k = skips.setdefault(_kind(e.get("reason", "")), {"samples": 0, "steps": 0})
            # a skipped step: its whole batch (`samples`; batch_ids is cut at 1000); a drop: its culprits
            k["samples"] += e.get("samples") or len(e.get("batch_ids") or e.get("sample_ids") or [])
            k["steps"] += 1
    ooms = [{"step": e["step"], "from": e.get("micro_batch_size"), "to": e.get("new_micro_batch_size")}
            for e in run.events if e.get("type") == "oom" and e.get("new_micro_batch_size")]
    rollbacks = [{"from_step": e.get("from_step"), "to_step": e.get("to_step"), "reason": e.get("reason")}
                 for e in run.events if e.get("type") == "rollback"]
    spikes = [{"step": e["step"], "loss": e.get("loss"), "ratio": e.get("ratio"), "z": e.get("z"),
               "action": e.get("action") or ("warn" if e["type"] == "spike" else "skip"), "sample_ids": e.get("sample_ids") or []}
              for e in run.events if e.get("type") == "spike" and e.get("action") != "restart"
              or e.get("type") == "skip" and _kind(e.get("reason", "")) == "loss spike"]  # guard.on_spike
    times = [e["time"] for e in run.events if "time" in e]
    peaks = [m["peak_memory_bytes"] for m in train if m.get("peak_memory_bytes")]
    waits = [m["input_wait_fraction"] for m in train if m.get("input_wait_fraction") is not None]
    last = train[-1] if train else {}
    return {
        "run_dir": str(run.run_dir),
        "status": run.status,
        "running": run.holder,
        "steps": s["steps"] if s else last.get("step", 0),
        "max_steps": (run.config.get("train") or {}).get("max_steps"),
        "wall_s": s["wall_s"] if s else (round(max(times) - min(times), 1) if times else None),
        "final_loss": s["final_loss"] if s else last.get("loss"),
        "val": {k: v for k, v in run.val[-1].items() if k not in ("step", "split")} if run.val else None,
        "best": (s or {}).get("best"),  # checkpoint.best_metric: metric, value, step, checkpoint
        "skipped_samples": s["skipped_samples"] if s else sum(k["samples"] for k in skips.values()),
        "skipped_steps": s["skipped_steps"] if s else None,
        "skips": skips,
        "oom_splits": ooms,
        "rollbacks": rollbacks,
        "spikes": spikes,
        "overflow_steps": sum(e.get("type") == "overflow" for e in run.events),
        "resumes": sum(e.get("type") == "resume" for e in run.events),
        "segments": (s or {}).get("segments"),  # one per process that trained the run (summary.json's)
        "last_attempt": (s or {}).get("last_attempt"),  # a later attempt that failed before training
        "peak_memory_bytes": (s or {}).get("peak_memory_bytes") or (max(peaks) if peaks else None),
        "input_wait_fraction": (s or {}).get("input_wait_fraction",
                                            round(sum(waits) / len(waits), 4) if waits else None),
        "micro_batch_size": s["micro_batch_size"] if s else last.get("micro_batch_size"),
        "device": (s or run.summary or {}).get("device"),
        "precision": (run.config.get("train") or {}).get("precision"),
        "error": (s or {}).get("error") if run.status not in ("running", "completed") else None,
    }


def _steps_at(events: list[dict], kind: str) -> list[int]:
    return [e["step"] for e in events if e.get("type") == kind]


def plot(runs: list[Run], out: Path) -> Path:
    """Loss (train, and val where evaluated), validation accuracy (where there is one) and learning
    rate over optimizer steps, one colour per run, with skipped steps (x), OOM splits (dotted),
    rollbacks (dashed) and the best checkpoint (a star) marked; a PNG at ``out``.
    Needs matplotlib (ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any(isinstance(m.get("accuracy"), (int, float)) for r in runs for m in r.val)
    if has_acc:  # validation accuracy gets its own panel, between the losses and the learning rate
        fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True,
                                                     gridspec_kw={"height_ratios": [3, 1.3, 1]})
    else:
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        ax_acc = None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    marked: set[str] = set()

    def label(what: str) -> str | None:  # each kind of marker once in the legend
        if what in marked:
            return None
        marked.add(what)
        return what

    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        steps, loss = [m["step"] for m in run.train], [m.get("loss") for m in run.train]
        parts = _segments(run.train)  # a rollback (or a resume) logs its steps again: each stretch drawn apart
        for k, part in enumerate(parts):
            redone = parts[k + 1][0]["step"] if k < len(parts) - 1 else None  # steps from here were run again
            kept = [m for m in part if redone is None or m["step"] < redone]
            gone = kept[-1:] + [m for m in part if redone is not None and m["step"] >= redone]
            ax_loss.plot([m["step"] for m in kept], [m.get("loss") for m in kept], color=c, lw=1.4,
                         label=f"{prefix}train loss" if k == 0 else None)
            if len(gone) > 1:
                ax_loss.plot([m["step"] for m in gone], [m.get("loss") for m in gone], color=c, lw=0.9, alpha=0.4,
                             label=label("steps undone by a rollback"))
        if run.val:
            ax_loss.plot([m["step"] for m in run.val], [m.get("loss") for m in run.val], color=c, lw=1.2, ls="--",
                         marker="o", ms=4, label=f"{prefix}val loss")
        if ax_acc is not None:
            acc = [(m["step"], m["accuracy"]) for m in run.val if isinstance(m.get("accuracy"), (int, float))]
            if acc:
                ax_acc.plot([a for a, _ in acc], [b for _, b in acc], color=c, lw=1.2, ls="--", marker="o", ms=4,
                            label=f"{prefix}val accuracy")
        best = (run.summary or {}).get("best")  # checkpoint.best_metric: a star where it was taken
        on = {"loss": ax_loss, "accuracy": ax_acc}.get(best["metric"]) if best else None
        if on is not None and isinstance(best.get("value"), (int, float)):
            on.scatter([best["step"]], [best["value"]], marker="*", s=180, color=c, edgecolors="black", zorder=6,
                       label=label(f"best checkpoint ({best['metric']})"))
        for k, part in enumerate(parts):
            ax_lr.plot([m["step"] for m in part], [m.get("lr") for m in part], color=c, lw=1.2,
                       label=f"{prefix}lr" if k == len(parts) - 1 else None)
        skipped = sorted(set(_steps_at(run.events, "skip")))
        if skipped and steps:
            ys = [_at(steps, loss, s) for s in skipped]
            ax_loss.scatter(skipped, ys, marker="x", color="red", s=40, zorder=5, label=label("skipped step / samples"))
        warned = [e["step"] for e in run.events if e.get("type") == "spike" and e.get("action") == "warn"]
        if warned and steps:  # guard.on_spike: warn (a skipped spike is a skipped step, above)
            ax_loss.scatter(warned, [_at(steps, loss, s) for s in warned], marker="^", color="darkorange", s=40,
                            zorder=5, label=label("loss spike (warned)"))
        splits: dict[int, list] = {}  # step -> micro-batch sizes (one step may split twice)
        for e in run.events:
            if e.get("type") == "oom" and e.get("new_micro_batch_size"):
                splits.setdefault(e["step"], [e.get("micro_batch_size")]).append(e["new_micro_batch_size"])
        for step, sizes in splits.items():
            ax_loss.axvline(step, color="orange", ls=":", lw=1.5, label=label("OOM: micro-batch split"))
            ax_loss.annotate("micro " + "->".join(map(str, sizes)), (step, 0.98), xycoords=("data", "axes fraction"),
                             fontsize=8, color="darkorange", rotation=90, va="top", ha="right")
        for e in run.events:
            if e.get("type") == "rollback":
                ax_loss.axvline(e.get("from_step", e["step"]), color="purple", ls="--", lw=1.2,
                                label=label("rollback"))
                ax_loss.annotate(f"rollback to {e.get('to_step')}", (e.get("from_step", e["step"]), 0.98),
                                 xycoords=("data", "axes fraction"), fontsize=8, color="purple", rotation=90,
                                 va="top", ha="right")
            elif e.get("type") == "resume" and steps and e["step"] < max(steps):  # not one at the end
                ax_loss.axvline(e["step"], color="gray", ls="-", lw=0.8, alpha=0.6, label=label("resumed"))
    finite = [m.get("loss") for r in runs for m in r.train if isinstance(m.get("loss"), (int, float))]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(", ".join(f"{r.name} ({r.status})" for r in runs))
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, loc="upper right")
    if ax_acc is not None:
        ax_acc.set_ylabel("val accuracy")
        ax_acc.margins(y=0.15)  # room for the best-checkpoint star
        ax_acc.grid(alpha=0.3)
        ax_acc.legend(fontsize=8, loc="lower right")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    if len(runs) > 1:
        ax_lr.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _segments(rows: list[dict]) -> list[list[dict]]:
    """``rows`` cut wherever the step goes back (after a rollback, or a resume that logs again)."""
    parts: list[list[dict]] = []
    for m in rows:
        if not parts or m["step"] <= parts[-1][-1]["step"]:
            parts.append([])
        parts[-1].append(m)
    return parts


def _at(xs: list[int], ys: list, x: int) -> float | None:
    """``ys`` at ``x`` (the nearest logged step at or before it)."""
    best = None
    for a, b in zip(xs, ys):
        if a <= x and isinstance(b, (int, float)):
            best = b
    return best if best is not None else next((b for b in ys if isinstance(b, (int, float))), None)


BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(run: Run, width: int = 60) -> list[str]:
    """The train loss as one line of blocks (``width`` columns of steps), and a line under it with
    ``x`` where steps or samples were skipped, ``M`` at an OOM split and ``R`` at a rollback."""
    rows = [(m["step"], m["loss"]) for m in run.train if isinstance(m.get("loss"), (int, float))]
    if not rows:
        return ["(no train loss logged yet)"]
    first, last = rows[0][0], max(rows[-1][0], rows[0][0] + 1)
    cols: list[list[float]] = [[] for _ in range(width)]
    col = lambda step: min(width - 1, int((step - first) / (last - first + 1e-9) * width))  # noqa: E731
    for step, loss in rows:
        if loss == loss and abs(loss) != float("inf"):
            cols[col(step)].append(loss)
    vals = [sum(c) / len(c) if c else None for c in cols]
    known = [v for v in vals if v is not None]
    lo, hi = min(known), max(known)
    line = "".join(" " if v is None else BLOCKS[min(7, int((v - lo) / (hi - lo + 1e-12) * 8))] for v in vals)
    marks = [" "] * width
    for e in run.events:
        kind = {"skip": "x", "oom": "M", "rollback": "R", "spike": "!"}.get(e.get("type", ""))
        if kind and first <= e.get("step", -1) <= last:
            marks[col(e["step"])] = kind if marks[col(e["step"])] in (" ", "x") else marks[col(e["step"])]
    return [f"loss |{line}| {lo:.4g} .. {hi:.4g}, steps {first}-{rows[-1][0]}",
            f"      {''.join(marks)}  (x skipped, M out-of-memory split, R rollback, ! loss spike warned)"]
