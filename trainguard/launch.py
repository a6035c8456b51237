"""``trainguard train --nproc-per-node N``: the same command in N processes of this node, started
by torch's own elastic launcher (what ``torchrun --standalone`` runs), not a home-made one.

Each process then finds torchrun's environment (``RANK``, ``WORLD_SIZE``, ...) and joins the group
(:func:`trainguard.distributed.init`). The exit code is the job's: rank 0's, or the first failing
rank's (a config error stays 2, a stop by SIGTERM 143). torchrun starts each process in a session
of its own, so a Ctrl-C or SIGTERM reaches them through the launcher, which passes it on and
waits (up to 120 s; 30 s with an older torch whose torchrun has no ``--shutdown-timeout``, such as 2.11)
for them to checkpoint and exit.
"""

from __future__ import annotations

import logging
import os
import signal


def launch(nproc: int, argv: list[str], debug: bool = False) -> int:
    """Run ``trainguard *argv`` in ``nproc`` processes on this node; returns the job's exit code."""
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
    try:
        torchrun.run(args)
        return 0
    except ChildFailedError as e:
        # the cause, not a victim: when one process fails, torchrun ends the others with SIGTERM
        victim = (128 + signal.SIGTERM, -signal.SIGTERM)
        _, first = min(e.failures.items(), key=lambda kv: (kv[1].exitcode in victim, kv[0] != 0, kv[0]))
        code = first.exitcode
        if code < 0:  # killed by a signal
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            print(f"error: a training process died of {name}; the others were stopped", flush=True)
            return 128 - code
        return code
    except SignalException as e:  # Ctrl-C or SIGTERM: passed on to the processes, which saved and exited
        return 128 + int(e.sigval)
