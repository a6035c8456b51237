"""`trainguard report`: a thin wrapper over :mod:`trainguard.report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from trainguard.cli._errors import user_errors
from trainguard.cli.train import DebugOpt


def report_command(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR", help="One or more run directories (several: curves overlaid).", show_default=False)],
    json_: Annotated[bool, typer.Option("--json", metavar="", help="Print {runs: [...], plot: PATH|null} as JSON (for scripts).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", metavar="PATH", show_default=False, help="Where the PNG goes (default RUN_DIR/report.png; several runs: ./report-A-vs-B.png).")] = None,
    debug: DebugOpt = False,
) -> None:
    """What happened in a run: finished, failed, killed or still running.

    A table of status, steps, time, skips by reason, OOM splits, rollbacks, peak memory and input
    wait, and the loss / val / learning-rate curves with those events marked, as a PNG (with
    matplotlib: pip install the `plot` extra) or a compact curve in the terminal."""
    with user_errors(debug):
        from trainguard.report import plot, read_run, sparkline, summarize

        runs = [read_run(d) for d in run_dirs]
        rows = [summarize(r) for r in runs]
        if out is None:
            out = runs[0].run_dir / "report.png" if len(runs) == 1 else Path(f"report-{'-vs-'.join(r.name for r in runs)}.png")
        try:
            png: Path | None = plot(runs, out) if any(r.train for r in runs) else None
        except ImportError:
            png = None
        if json_:
            print(json.dumps({"runs": rows, "plot": str(png) if png else None}, indent=2))
            return
        print_table(rows)
        if png is not None:
            print(f"curves: {png}")
        else:
            for r in runs:
                print(f"{r.name}:")
                for line in sparkline(r):
                    print(f"  {line}")
            if any(r.train for r in runs):
                print("(pip install matplotlib, or the plot extra: pip install -e '.[plot]' in a clone, for the curves as a PNG)")


def _fmt_bytes(n) -> str:
    from trainguard.memory.sizes import fmt_bytes

    return fmt_bytes(n) if n else "-"


def _cells(row: dict) -> dict[str, str]:
    skips = "; ".join(f"{k}: {v['samples']} samples in {v['steps']} steps" for k, v in row["skips"].items()) or "-"
    val = ", ".join(f"{k} {v:.4g}" for k, v in (row["val"] or {}).items() if isinstance(v, (int, float))) or "-"
    running = row["running"]
    status = row["status"] + (f" (pid {running.get('pid')})" if running else "")
    return {
        "status": status,
        "steps": f"{row['steps']}" + (f" / {row['max_steps']}" if row["max_steps"] else ""),
        "wall time": f"{row['wall_s']:.1f} s" if isinstance(row["wall_s"], (int, float)) else "-",
        "final loss": f"{row['final_loss']:.4f}" if isinstance(row["final_loss"], (int, float)) else "-",
        "validation": val,
        "best checkpoint": (f"{row['best']['metric']} {row['best']['value']:.4g} at step {row['best']['step']}"
                            if row.get("best") else "-"),
        "skipped": f"{row['skipped_samples']} samples" + (f", {row['skipped_steps']} steps" if row["skipped_steps"] is not None else ""),
        "skips by reason": skips,
        "OOM splits": ", ".join(f"step {o['step']}: micro {o['from']}->{o['to']}" for o in row["oom_splits"]) or "-",
        "rollbacks": ", ".join(f"{r['from_step']}->{r['to_step']}" for r in row["rollbacks"]) or "-",
        "loss spikes": (f"{len(row['spikes'])}: " + ", ".join(f"step {k['step']} ({k['action']})" for k in row["spikes"][:8])
                        + (" ..." if len(row["spikes"]) > 8 else "")) if row.get("spikes") else "-",
        "fp16 overflow steps": str(row["overflow_steps"]),
        "segments": _segments(row),
        "peak memory": _fmt_bytes(row["peak_memory_bytes"]),
        "input wait": f"{row['input_wait_fraction']:.0%} of step time" if row["input_wait_fraction"] is not None else "-",
        "micro-batch": str(row["micro_batch_size"] or "-"),
        "device": f"{row['device'] or '-'}, {row['precision'] or '-'}",
        "error": row["error"] or "-",
        "last attempt": (f"{row['last_attempt']['status']} at {row['last_attempt']['time']}: "
                         f"{row['last_attempt']['error'].splitlines()[0]}" if row.get("last_attempt") else "-"),
    }


def _segments(row: dict) -> str:
    """``3 segments, 12 min 3 s in all: 0-40 died, 40-120 interrupted, 120-200 completed``."""
    from trainguard.callbacks.summary import fmt_duration

    segs = row.get("segments")
    if not segs:  # a summary from before segments were recorded, or none yet (running, killed)
        n = row["resumes"]
        return f"{n} resume{'s' if n > 1 else ''} so far" if n else "-"
    total = sum(s.get("wall_s") or 0 for s in segs)
    if len(segs) == 1:
        return f"1 segment, {fmt_duration(total)}"
    shown = segs if len(segs) <= 6 else [*segs[:2], None, *segs[-3:]]
    parts = ", ".join("..." if s is None else f"{s.get('from_step', '?')}-{s.get('to_step', '?')} {s.get('status', '?')}"
                      for s in shown)
    return f"{len(segs)} segments, {fmt_duration(total)} in all: {parts}"


def print_table(rows: list[dict]) -> None:
    from rich.table import Table

    from trainguard.cli._errors import console

    t = Table(box=None, padding=(0, 2), show_header=True, header_style="bold")
    t.add_column("", style="bold", no_wrap=True)
    for row in rows:
        t.add_column(Path(row["run_dir"]).name or row["run_dir"], overflow="fold")
    cells = [_cells(r) for r in rows]
    for key in cells[0]:
        if key in ("error", "last attempt") and all(c[key] == "-" for c in cells):
            continue
        t.add_row(key, *(c[key] for c in cells))
    console().print(t)
