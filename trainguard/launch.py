"""``trainguard train --nproc-per-node N``: the same command in N processes of this node, started
by torch's own elastic launcher (what ``torchrun --standalone`` runs), not a home-made one.

Each process then finds torchrun's environment (``RANK``, ``WORLD_SIZE``, ...) and joins the group
(:func:`trainguard.distributed.init`). The exit code is the job's: rank 0's, or the first failing
rank's (a config error stays 2, a stop by SIGTERM 143). torchrun starts each process in a session
of its own, so a Ctrl-C or SIGTERM reaches them through the launcher, which passes it on and
waits (up to 120 s; 30 s with an older torch whose torchrun has no ``--shutdown-timeout``, such as 2.11)
for them to checkpoint and exit. A signal that reaches the launcher after the job has completed
(rank 0 wrote a completed ``summary.json`` during this launch) exits 0, as one process does.

A sharded (fsdp) process that runs out of memory ends with exit 75 after recording a smaller
micro-batch (trainguard.guards.oom): the launcher then starts the job again, which resumes from
the newest checkpoint with that micro-batch. The halving bounds the restarts; :data:`MAX_RESTARTS`
is a backstop.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path


MAX_RESTARTS = 16  # out-of-memory restarts of one job (each halves the micro-batch, so ~log2 of it happen)


def launch(nproc: int, argv: list[str], debug: bool = False, run_dir: str | Path | None = None) -> int:
    """Run ``trainguard *argv`` in ``nproc`` processes on this node; returns the job's exit code.
    ``run_dir``: the job's run directory, read after a signal to tell a completed job from a stopped one."""
    from trainguard.guards.oom import RESTART_EXIT

    for restart in range(MAX_RESTARTS + 1):
        code = _run_once(nproc, argv, debug, run_dir)
        if code != RESTART_EXIT:
            return code
        if restart < MAX_RESTARTS:
            print("trainguard: restarting the job with a smaller micro-batch (a sharded process ran out of memory)",
                  flush=True)
    print(f"error: the job ran out of memory {MAX_RESTARTS + 1} times in a row", flush=True)
    return 1


def _completed_since(run_dir: str | Path | None, since: float) -> bool:
    """Whether rank 0 wrote a completed summary.json into ``run_dir`` at or after ``since``."""
    if run_dir is None:
        return False
    from trainguard.callbacks.summary import read_summary

    path = Path(run_dir) / "summary.json"
    summary = read_summary(path)  # None: none yet, or unreadable
    try:
        return summary is not None and summary.get("status") == "completed" and path.stat().st_mtime >= since
    except OSError:  # replaced meanwhile: not this launch's
        return False


def _run_once(nproc: int, argv: list[str], debug: bool, run_dir: str | Path | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1, with a warning; share the cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    if not debug:  # the processes print their own error: and hint: lines; the launcher's report repeats them
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    flags = ["--standalone", f"--nproc-per-node={nproc}"]
    if "--shutdown-timeout" in torchrun.get_args_parser()._option_string_actions:  # not in 2.11
        flags.append("--shutdown-timeout=120")
    args = torchrun.parse_args([*flags, "-m", "trainguard", *argv])
    began = time.time() - 1  # a summary written by this launch's job (mtime granularity)
    try:
        torchrun.run(args)
        return 0
    except ChildFailedError as e:
        # the cause, not a victim: when one process fails, torchrun ends the others with SIGTERM
        from trainguard.guards.oom import RESTART_EXIT

        if any(f.exitcode == RESTART_EXIT for f in e.failures.values()):  # a sharded rank left the job out of memory
            return RESTART_EXIT
        victim = (128 + signal.SIGTERM, -signal.SIGTERM)
        _, first = min(e.failures.items(), key=lambda kv: (kv[1].exitcode in victim, kv[0] != 0, kv[0]))
        code = first.exitcode
        if code < 0:  # killed by a signal
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            print(f"error: a training process died of {name}; the others were stopped", flush=True)
            return 128 - code
        return code
    except SignalException as e:  # Ctrl-C or SIGTERM: passed on to the processes, which saved and exited
        if _completed_since(run_dir, began):  # it came as the job closed: the run is complete
            print(f"note: {signal.Signals(int(e.sigval)).name} after the run completed: exiting 0", flush=True)
            return 0
        return 128 + int(e.sigval)
