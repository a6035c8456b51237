"""Out of device memory mid-run: redo the step with smaller micro-batches (``guard.on_oom: split``).

The loop undoes the failed attempt (gradients, RNG draws, the exception and the activations it
held) and fires OUT_OF_MEMORY. This hook halves the micro-batch (the batch is then split into the
fewest micro-batches of at most half as many samples, within one sample of each other; each is
weighted by its samples, so the gradient is that of the same batch) and the loop redoes the step on the same samples. The new size is kept
for the rest of the run, saved in checkpoints, and reported. When one sample does not fit, or
with ``on_oom: stop``, the run stops before the step, saying how much memory one sample needs.

Sharded (``train.strategy: fsdp``) the step cannot be undone by all ranks together: a forward
is a sequence of collectives, and a rank that ran out of memory inside it leaves the others
waiting in the next one. That rank therefore leaves the job instead (exit :data:`RESTART_EXIT`),
after recording the split in ``oom_restart.rankN.json`` in the run directory. The job is
restarted (by ``--nproc-per-node`` itself, or torchrun's ``--max-restarts``) and resumes from the
newest checkpoint, where :meth:`OomRecovery.after_restart` reads the record on rank 0, and every
rank starts with the smaller micro-batch. The work since that checkpoint is redone; the halving
bounds the restarts (log2 of the micro-batch), and at one sample the run stops.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from trainguard.engine.events import Hook
from trainguard.engine.state import preserved_state
from trainguard.errors import RunFailed
from trainguard.memory.search import fewest_micro_batches
from trainguard.memory.sizes import fmt_bytes, one_sample_does_not_fit


def one_sample_need(trainer, batch) -> int | None:
    """Bytes a forward/backward on the largest of ``batch``'s samples peaks at: measured past the
    limit on a simulated device, else predicted on fake tensors; None if neither can tell."""
    from trainguard.engine.batch import slice_batch
    from trainguard.memory import predict, trial

    if batch is None or batch.data is None or not len(batch):
        return None
    item = _first_item(slice_batch(batch.data, 0, 1))
    if getattr(trainer.memory, "kind", None) == "simulated":
        with preserved_state(trainer.model):  # forward/backward only: weights untouched, buffers and RNG restored
            t = trial.measure(trainer, item, 1, optimizer_step=False, enforce=False, batch_size=len(batch))
        return t.peak
    try:
        return predict.predict_trainer(trainer, item, 1).peak
    except Exception:  # noqa: BLE001 - the estimate is a courtesy in an error message
        return None


def _first_item(x):
    """A one-sample batch back as one sample (so it can be repeated and collated again)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x[0]
    if isinstance(x, Mapping):
        return {k: _first_item(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_first_item(v) for v in x)
    return x[0] if isinstance(x, list) else x


RESTART_EXIT = 75  # EX_TEMPFAIL: this process ended so that the job is restarted with a smaller micro-batch
RECORD_GLOB = "oom_restart.rank*.json"


class JobRestart(RunFailed):
    """A sharded rank ran out of memory: the job must restart with a smaller micro-batch (said as a
    ``warning:``: the launcher goes on)."""

    exit_code = RESTART_EXIT
    label = "warning"


def restart_pending(run_dir: Path) -> bool:
    """Some rank of this job recorded an out-of-memory it left the job for."""
    return any(Path(run_dir).glob(RECORD_GLOB))


class OomRecovery(Hook):
    """Splits the micro-batch on OUT_OF_MEMORY (or stops the run), and records each split."""

    def __init__(self, on_oom: str, batch_size: int, log, configured_micro_batch: int, run_dir: Path | None = None):
        self.on_oom, self.batch_size, self.log = on_oom, batch_size, log
        self.configured = configured_micro_batch
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.splits: list[dict] = []
        # the preflight's model.batch_coupling Check, or (set by run.py when the run started with one
        # micro-batch per step) a callable that runs it, called at the first split
        self.batch_coupling = None

    def warn_batch_coupled(self, trainer, step: int) -> None:
        """A batch-coupled loss run with more than one micro-batch per step: a ``batch_coupled`` event
        and a warning saying what the split does to it (at start, and after each OOM split)."""
        if trainer.grad_accum < 2:
            return
        if callable(self.batch_coupling):
            self.batch_coupling = self.batch_coupling()
        c = self.batch_coupling
        if c is None or c.status != "warn":
            return
        message = c.warning(trainer.micro_batch_size, trainer.grad_accum)
        self.log.event(step, "batch_coupled", message, kind=c.kind, micro_batch_size=trainer.micro_batch_size,
                       grad_accum=trainer.grad_accum)
        if trainer.world.is_main:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True, highlight=False).print(
                f"[yellow]warning[/yellow]: {message} (hint: {c.hint})")

    def state_dict(self) -> dict:
        return {"splits": self.splits}

    def load_state_dict(self, d: dict) -> None:
        self.splits = list(d["splits"])

    def after_restart(self, trainer) -> None:
        """Sharded: a restart after some rank left the job out of memory starts with the micro-batch it
        recorded (rank 0 reads the records; every rank takes the same decision from them). Called
        once the run is resumed, before the preflight's forward."""
        if not trainer.strategy.sharded or self.run_dir is None:
            return
        from trainguard.guards import consensus

        records = consensus.from_rank0(self._take_records() if trainer.world.is_main else [])
        fit = [r for r in records if r["micro_batch_size"] == trainer.micro_batch_size and r["step"] > trainer.state.step]
        if not fit:  # none, or stale (another micro-batch, or a step this run is already past)
            return
        smaller = min(r["new_micro_batch_size"] for r in fit)
        step, m = fit[0]["step"], trainer.micro_batch_size
        trainer.micro_batch_size = smaller
        self.splits.append({"step": step, "from": m, "to": smaller, "restart": True})
        self.log.event(trainer.state.step, "oom", f"{fit[0]['message']}; the job was restarted from step "
                       f"{trainer.state.step} with micro-batch {smaller}", micro_batch_size=m,
                       new_micro_batch_size=smaller, grad_accum=trainer.grad_accum, oom_step=step,
                       ranks=sorted({r["rank"] for r in fit}), action="restart")

    def _take_records(self) -> list[dict]:
        records = []
        for path in sorted(self.run_dir.glob(RECORD_GLOB)):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                pass
            path.unlink(missing_ok=True)
        return records

    def _leave_job(self, trainer, smaller: int) -> None:
        """Sharded: record the split for the restarted job, and end this process (see the module doc)."""
        from trainguard.callbacks.summary import write_json_atomic

        oom, rank = trainer.state.oom, trainer.world.rank
        where = f"out of device memory on rank {rank} at step {oom.step} with micro-batch {oom.micro_batch_size}"
        if self.on_oom == "stop" or smaller < 1:
            message, hint = (where + " (guard.on_oom: stop)",
                             f"set train.micro_batch_size below {oom.micro_batch_size}, or guard.on_oom: split"
                             ) if self.on_oom == "stop" else one_sample_does_not_fit(None, where)
            raise RunFailed(message, hint + "; re-running resumes from the last checkpoint")
        write_json_atomic(self.run_dir / f"oom_restart.rank{rank}.json", {
            "step": oom.step, "rank": rank, "micro_batch_size": trainer.micro_batch_size, "new_micro_batch_size": smaller,
            "message": oom.message, "in_use_bytes": oom.in_use, "limit_bytes": oom.limit})
        raise JobRestart(f"{where}; sharded, the ranks cannot undo the step together, so the job restarts from "
                         f"the last checkpoint with micro-batch {smaller}",
                         "trainguard train --nproc-per-node restarts it by itself; under torchrun give --max-restarts "
                         "(or re-run the same command)")

    def on_out_of_memory(self, trainer) -> None:
        st, oom = trainer.state, trainer.state.oom
        if oom is None:  # an earlier hook recovered (memory.sampled: an uncounted step redone counted)
            return
        if trainer.strategy.sharded:  # the others may be inside the forward's collectives: leave the job
            m = trainer.micro_batch_size
            self._leave_job(trainer, fewest_micro_batches(self.batch_size, m // 2) if m > 1 else 0)
        ranks = {"ranks": oom.ranks} if oom.ranks else {}  # in a process group: who ran out
        if self.on_oom == "stop":
            self.log.event(st.step + 1, "oom", oom.message, micro_batch_size=oom.micro_batch_size, action="stop",
                           **ranks)
            st.request_stop("failed", oom.describe() + " (guard.on_oom: stop)",
                            hint=f"set train.micro_batch_size below {oom.micro_batch_size}, or guard.on_oom: split; "
                                 "re-running resumes from the last checkpoint")
            return
        m = trainer.micro_batch_size
        smaller = fewest_micro_batches(self.batch_size, m // 2) if m > 1 else 0
        if smaller < 1:
            need = one_sample_need(trainer, trainer.batch)
            self.log.event(st.step + 1, "oom", oom.message, micro_batch_size=1, action="stop", one_sample_bytes=need,
                           **ranks)
            avail = f"{fmt_bytes(oom.limit)} available" if oom.limit else "more than the device has"
            message, hint = one_sample_does_not_fit(need, f"{avail} (step {oom.step})")
            st.request_stop("failed", message, hint=hint)
            return
        trainer.micro_batch_size = smaller
        st.oom = None
        self.splits.append({"step": oom.step, "from": m, "to": smaller})
        self.log.event(st.step + 1, "oom", f"{oom.message}; the step is redone with micro-batch {smaller}",
                       micro_batch_size=m, new_micro_batch_size=smaller, grad_accum=trainer.grad_accum,
                       sample_ids=trainer.batch.ids, in_use_bytes=oom.in_use, limit_bytes=oom.limit,
                       **ranks)
        self.warn_batch_coupled(trainer, st.step + 1)

    def on_fit_end(self, trainer) -> None:
        if self.splits and trainer.world.is_main:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True, highlight=False).print(
                f"[yellow]memory[/yellow]: out of memory {len(self.splits)}x; micro-batch "
                f"{self.splits[0]['from']} -> {trainer.micro_batch_size} (accumulation {trainer.grad_accum}); "
                f"set train.micro_batch_size: {trainer.micro_batch_size} to start there")
        trainer.state.report["oom"] = {"splits": len(self.splits), "configured_micro_batch_size": self.configured,
                                       "micro_batch_size": trainer.micro_batch_size, "history": self.splits}
