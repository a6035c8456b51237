"""The Guard's bad steps: redo one without the samples that made it bad, or skip it and count it;
stop or roll back when the budgets say so.

:class:`BadSteps` is a part of :class:`~trainguard.guards.guard.Guard` (its counters, ``cfg``,
``log`` and ``checkpointer`` are the Guard's); it runs only when a step is bad, never on a
healthy one.
"""

from __future__ import annotations

from trainguard import distributed
from trainguard.checkpoint import store
from trainguard.guards.consensus import verdict
from trainguard.guards.localize import Finding

# Per rank, on a bad step: (its finding or None, its samples present, their ids). One process: one entry.
Found = list[tuple[Finding | None, int, list[int]]]


def _first(found: Found | None) -> Finding | None:
    return next((f for f, _, _ in found if f is not None), None) if found else None


def _culprits(found: Found) -> list[int]:
    """The sample ids every rank's finding named, sorted."""
    return sorted({i for f, _, _ in found if f is not None for i in f.sample_ids})


class BadSteps:
    """The Guard's decisions on a bad step (see the module doc)."""

    def _drop_culprits(self, trainer, found: Found) -> bool:
        """If only some samples make the step non-finite, redo the step without them (on every
        rank together: each drops its own culprits).

        Returns True when the step is healthy without them (they are recorded as skipped).
        Not under an fp16 GradScaler (one unscale per step), nor when a parameter is bad, nor
        when some bad rank could not name its culprits or would be left with no sample.
        """
        st, batch, agreed = trainer.state, trainer.batch, trainer.state.agreed
        bad_ranks = agreed.bad_ranks if agreed is not None else [0]
        if trainer.scaler.is_enabled() or not bad_ranks:
            return False
        for f, n, _ in (found[r] for r in bad_ranks):
            if f is None or f.kind == "parameter" or not 0 < len(set(f.sample_ids)) < n:
                return False
        mine = found[distributed.rank()][0]
        if not trainer.retry_step(batch.without(set(mine.sample_ids) if mine is not None else set())):
            st.skip_step = True  # out of memory and the run stops: nothing of this step is applied
            return True
        bad, loss = verdict(trainer)
        if bad:  # a skipped step after all: it counts the whole batch, as agreed before the retry
            st.agreed = agreed
            return False
        finding = _first(found)
        culprits = _culprits(found)
        reason = "non-finite loss"
        self.reasons[reason] += len(culprits)
        self.reason_steps[reason] += 1
        st.skipped_samples += len(culprits)
        self.last_finding = finding
        self.places[finding.place()] += 1
        self.log.event(st.step + 1, "skip", f"{reason}: {finding.describe()}; the step went on without these samples",
                       sample_ids=culprits, module=finding.where, **self._ranks(found))
        if self.cfg.remember_bad_samples and not trainer.data.iterable:  # an iterable's ids are stream positions
            self.known_bad.update(culprits)
        self.spike.add(loss)
        self.consecutive = 0
        return True

    @staticmethod
    def _ranks(found: Found | None) -> dict:
        """``{"ranks": [...]}``: the ranks a finding came from, in a process group."""
        if not found or len(found) == 1:
            return {}
        return {"ranks": [r for r, (f, _, _) in enumerate(found) if f is not None]}

    def _reason_text(self) -> str:
        return "; ".join(f"{n} x {r}" for r, n in self.reasons.most_common(3))

    def _source(self) -> tuple[str, str | None]:
        """Where the non-finite values came from, and whether that looks like the model or the data."""
        if not self.places:
            return "", None
        place, n = self.places.most_common(1)[0]
        total = sum(self.places.values())
        if n == total and self.every_sample[place] == n and not place.startswith("input"):
            return (f"; every one of the {n} bad steps was first non-finite at the {place}, for every sample: "
                    "this looks like a model problem, not bad data",
                    f"look at the {place}: its weights, an op that overflows (fp16), a log or division of zero; "
                    "skipping samples cannot fix it")
        return (f"; first non-finite at the {place} in {n} of {total} bad steps",
                "the sample ids are in events.jsonl: if the same samples recur, fix or drop them in the dataset")

    def _stop(self, trainer, error: str, hint: str | None = None) -> None:
        source, hint = ("", hint) if hint else self._source()
        trainer.state.request_stop("failed", error + source + "; details in events.jsonl", exit_code=1, hint=hint)
        self.log.event(trainer.state.step, "stop", error + source)

    def _bad_step(self, trainer, reason: str, found: Found | None, policy: str | None = None, detail: str = "",
                  hint: str | None = None, culprits: list[int] | None = None, batch_ids: list[int] | None = None,
                  **fields) -> None:
        """A skipped step (counted by ``reason``; ``detail`` only in the texts). ``policy``: what repeats
        of it do (default ``guard.on_nonfinite``); the spike path names its samples and rule."""
        st, batch, agreed = trainer.state, trainer.batch, trainer.state.agreed
        policy = policy or self.cfg.on_nonfinite
        finding = _first(found)
        samples = agreed.samples if agreed is not None else len(batch)
        st.skip_step = True
        st.skipped_steps += 1
        st.skipped_samples += samples
        self.consecutive += 1
        self.reasons[reason] += samples
        self.reason_steps[reason] += 1
        if finding is not None:
            self.last_finding = finding
            self.places[finding.place()] += 1
            self.every_sample[finding.place()] += finding.every_sample
        where = f"; {finding.describe()}" if finding else detail
        batch_ids = batch_ids or ([i for _, _, ids in found for i in ids] if found else batch.ids)
        culprits = culprits or (_culprits(found) if found else [])
        self.log.event(st.step + 1, "skip", reason + where, sample_ids=culprits or batch_ids, batch_ids=batch_ids[:1000],
                       samples=len(batch_ids),
                       module=finding.where if finding else None, **self._ranks(found), **fields)
        step = st.step + 1
        if policy == "stop":
            return self._stop(trainer, f"step {step}: {reason}{where} (guard.on_nonfinite=stop)")
        if policy == "rollback" and (self.consecutive >= self.cfg.rollback_after
                                     or (finding is not None and finding.kind == "parameter")):
            self._rollback_pending = f"{reason}{where}"
            return
        if self.consecutive >= self.cfg.max_consecutive_bad_steps:
            self._stop(trainer, f"{self.consecutive} bad steps in a row (guard.max_consecutive_bad_steps="
                                f"{self.cfg.max_consecutive_bad_steps}), last at step {step}: {reason}{where}", hint=hint)

    def _rollback(self, trainer, why: str) -> None:
        from trainguard.checkpoint.checkpointer import restore_weights_and_optimizer

        self._rollback_pending = None
        st = trainer.state
        if self.rollbacks >= self.cfg.max_rollbacks:
            return self._stop(trainer, f"still diverging after {self.rollbacks} rollbacks (guard.max_rollbacks): {why}")
        streak_start = st.step - self.consecutive + 1  # a checkpoint from inside the bad streak is not good
        ckpt = store.latest_valid(self.checkpointer.root, before=streak_start)[0] if self.checkpointer else None
        ckpt = distributed.broadcast_object(ckpt)  # rank 0's choice: every rank loads the same one
        if ckpt is None:
            return self._stop(trainer, f"cannot roll back: no valid checkpoint: {why}")
        from_step = st.step
        to_step = int(restore_weights_and_optimizer(trainer, ckpt)["counters"]["step"])
        self.rollbacks += 1
        self.lr_scale *= self.cfg.rollback_lr_factor
        trainer.scheduler.set_lr_scale(self.lr_scale)  # any scheduler (engine.optim.Schedule); the loop reads the groups' LR
        st.step, self.consecutive = to_step, 0
        self.checkpointer.last_saved = to_step  # that checkpoint is on disk already
        self.log.event(st.step, "rollback", why, from_step=from_step, to_step=to_step, checkpoint=str(ckpt),
                       lr_scale=self.lr_scale, skipped_window=f"the data of steps {to_step + 1}..{from_step} is not replayed")
