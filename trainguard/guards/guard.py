"""The Guard hook: bad samples, non-finite steps, loss spikes, budgets and rollback.

Where the step's verdict can be deferred (one process, a fused optimizer: engine/defer.py), a healthy
step costs no host sync: the Guard gives it a device flag (non-finite loss or gradient norm, or a loss
above the spike bound) that skips its update on the device, and learns the values one step later
(VERDICT). A flagged step is redone at once, undeferred, and judged as below. Otherwise the step costs
one host read (the fused finite check of loss and gradient norm, through
:func:`~trainguard.guards.consensus.agree`); everything else runs only when something is wrong.
What a bad step does (culprits dropped, the step skipped and counted, a stop or a rollback) is in
:mod:`trainguard.guards.bad_steps`.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter

import numpy as np
import torch

from trainguard import distributed
from trainguard.checkpoint import store
from trainguard.config.schema import GuardConfig
from trainguard.engine.data import BadSample
from trainguard.engine.defer import DEFER
from trainguard.engine.events import Hook
from trainguard.guards.bad_steps import BadSteps
from trainguard.guards.consensus import verdict
from trainguard.guards.localize import Finding, find_nonfinite, find_nonfinite_together
from trainguard.guards.spike import Spike, SpikeRule, culprits, sample_losses

KNOWN_BAD = "non-finite loss, sample known from an earlier step"
SPIKE = "loss spike"
SPIKE_HINT = ("the sample ids are in events.jsonl: look at those samples; if the loss level changed for a reason "
              "(new data, the schedule), set guard.on_spike: warn, or raise guard.spike_factor / guard.spike_zscore")
SPIKE_LINES = 10  # console lines for spikes (warn); the rest are in events.jsonl only


def _below(bound: float) -> float:
    """The largest finite float32 at most ``bound``: a float32 loss is above ``bound`` exactly when it is
    above this (and every finite loss is at most it when the bound is infinite)."""
    b = np.float32(min(bound, float(np.finfo(np.float32).max)))
    return float(b if b <= bound else np.nextafter(b, np.float32(-np.inf)))


class Guard(BadSteps, Hook):
    """Decides, per step, whether to skip, roll back or stop; keeps the budgets."""

    def __init__(self, cfg: GuardConfig, planned_samples: int, log, checkpointer=None):
        self.cfg, self.planned, self.log, self.checkpointer = cfg, planned_samples, log, checkpointer
        self.consecutive = 0
        self.rollbacks = 0
        self._step_batch = lambda: None  # this step's batch (a weakref), and its failed samples already recorded (STEP_START
        self._logged_bad: list = []  # fires again when the step before it is redone)
        self._failures_at = -1  # the step whose samples that failed to load (every rank's) are recorded
        self._bound: tuple = (None,) * 5  # the spike bound: (bound, as float32, on the device, 0, 1), made at the first use
        self.lr_scale = 1.0
        self.overflow_steps = 0
        self.spike_on = cfg.on_spike != "off"
        self.spike = SpikeRule(cfg.spike_factor, cfg.spike_zscore, cfg.spike_window, cfg.spike_warmup)
        self.spikes = 0        # spikes seen, any mode
        self.spike_streak = 0  # warn: spikes in a row (a new level of the loss after max_consecutive_bad_steps)
        self.reasons: Counter[str] = Counter()      # reason -> samples skipped
        self.reason_steps: Counter[str] = Counter()  # reason -> steps involved
        self.last_finding: Finding | None = None
        self.places: Counter[str] = Counter()        # where the first non-finite value was -> bad steps
        self.every_sample: Counter[str] = Counter()  # ... of which every sample was non-finite there
        self._rollback_pending: str | None = None
        self.known_bad: set[int] = set()             # samples found non-finite alone: dropped up front later

    # ---- checkpointed state ------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
                "overflow_steps": self.overflow_steps, **self.spike.state_dict(), "spikes": self.spikes,
                "spike_streak": self.spike_streak,
                "reasons": dict(self.reasons), "reason_steps": dict(self.reason_steps),
                "places": dict(self.places), "every_sample": dict(self.every_sample),
                "known_bad": sorted(self.known_bad)}

    def load_state_dict(self, d: dict) -> None:
        self.consecutive, self.rollbacks, self.lr_scale = d["consecutive"], d["rollbacks"], d["lr_scale"]
        self.overflow_steps = d["overflow_steps"]
        self.spike.load_state_dict(d)
        self.spikes, self.spike_streak = d.get("spikes", 0), d.get("spike_streak", 0)
        self.reasons, self.reason_steps = Counter(d["reasons"]), Counter(d["reason_steps"])
        self.places, self.every_sample = Counter(d.get("places", {})), Counter(d.get("every_sample", {}))
        self.known_bad = set(d.get("known_bad", []))

    # ---- events --------------------------------------------------------------------------
    def on_fit_start(self, trainer) -> None:
        if trainer.device.type == "cuda" and trainer.world.is_main and trainer.strategy.defers and DEFER \
                and not trainer.defers:  # said once: each step then waits for the device before the next is queued
            from rich.console import Console

            why = ("under fp16 the GradScaler decides its own skips; bf16 (train.precision) avoids it"
                   if trainer.scaler.is_enabled() else
                   f"{type(trainer.optimizer).__name__} takes no found_inf (torch's fused AdamW, Adam, SGD and Adagrad "
                   "do: optim.fused: auto or true)")
            Console(stderr=True, soft_wrap=True, highlight=False).print(
                f"note: the guards read each step's verdict at once (one host sync a step): {why}")
        for note in self.cfg._notes:  # deprecated spellings in the config
            self.log.event(trainer.state.step, "deprecated", note)
            if trainer.world.is_main:
                from rich.console import Console

                Console(stderr=True, soft_wrap=True, highlight=False).print(f"[yellow]warning[/yellow]: {note}")
        if "rollback" in (self.cfg.on_nonfinite, self.cfg.on_spike) and self.checkpointer is not None \
                and distributed.broadcast_object(not store.list_checkpoints(self.checkpointer.root)):
            self.checkpointer.save(trainer)  # something to roll back to before step 1 (rank 0 decides)

    def on_step_start(self, trainer) -> None:
        again = self._step_batch() is trainer.batch  # the step starts again (the one before it was redone)
        if self.known_bad:
            self._drop_known_bad(trainer)
        if trainer.world.size == 1:
            bad = trainer.batch.bad
            self._load_failures(trainer, bad[len(self._logged_bad):] if again else bad, trainer.state.step + 1)
            self._logged_bad = list(bad)
        self._step_batch = weakref.ref(trainer.batch)  # not kept alive: a budget counts it

    def needs_verdict(self, trainer) -> bool:
        return False  # its STEP_END reads counters only

    def on_verdict(self, trainer) -> None:
        """A deferred step was healthy: its loss joins the spike window, as on a healthy step below."""
        if self.spike_on:
            self.spike.add(trainer.state.verdict.loss)
            self.spike_streak = 0
        self.consecutive = 0

    def _defer(self, trainer) -> None:
        """The verdict as a device flag (1.0: the update is skipped on the device): the loss or the
        gradient norm is not finite, or the loss is above the spike bound; judged in full when the step
        is redone, so a flag too many costs a redo, never a result. Five small ops, no host read."""
        st = trainer.state
        bound = self.spike.bound if self.spike_on else math.inf
        if self._bound[0] != bound or self._bound[2] is None or self._bound[2].device != st.loss.device:
            ones = torch.ones(3, device=st.loss.device)
            self._bound = (bound, _below(bound), ones[0] * _below(bound), ones[1] * 0, ones[2])
        _, _, thr, zero, one = self._bound
        norm = st.grad_norm if st.agreed is None else st.grad_norm + st.agreed.norms  # and any rank's own norm
        x = st.loss + (st.loss + norm) * 0  # NaN where the loss or the norm is not finite
        st.found_inf = torch.where(x <= thr, zero, one)  # NaN compares False

    def _drop_known_bad(self, trainer) -> None:
        """Samples a step was already healed of (guard.remember_bad_samples) leave the batch before
        the forward, as samples that failed to load do (and are reported the same way, every
        rank's together): the step is not made bad again, nor searched again, on a later epoch.
        Each rank drops its own; all ranks know the same ids. Never a rank's whole batch."""
        batch = trainer.batch
        drop = [i for i in batch.ids if i in self.known_bad]
        if not drop or len(drop) == len(batch):
            return
        kept = batch.without(set(drop))
        kept.bad = batch.bad + [BadSample(i, KNOWN_BAD) for i in drop]
        trainer.batch = kept
        trainer.state.batch_ids = kept.ids

    def _load_failures(self, trainer, bad, step: int) -> None:
        """Record samples that failed to load, and known bad samples left out (every rank's, in a
        process group)."""
        if not bad:
            return
        by_reason: dict[str, list[int]] = {}
        for b in bad:
            by_reason.setdefault(b.reason, []).append(b.sample_id)
        for reason, ids in by_reason.items():
            if reason == KNOWN_BAD:
                text = kind = KNOWN_BAD
                text += ": left out before the forward (guard.remember_bad_samples)"
            else:
                text = f"sample failed to load: {reason}"
                kind = f"sample failed to load: {reason.split(':')[0]}"  # e.g. the exception type, for the report
            self.log.event(step, "skip", text, sample_ids=ids)
            self.reasons[kind] += len(ids)
            self.reason_steps[kind] += 1
        trainer.state.skipped_samples += len(bad)

    def on_before_optimizer_step(self, trainer) -> None:
        st, batch, agreed = trainer.state, trainer.batch, trainer.state.agreed
        if (agreed.samples if agreed is not None else len(batch)) == 0:
            return self._bad_step(trainer, "every sample of the batch failed to load", None)
        if trainer.defers:
            return self._defer(trainer)
        bad, loss = verdict(trainer)
        if bad and trainer.scaler.is_enabled() and math.isfinite(loss):
            # fp16 overflow in the backward: the GradScaler skips the step and lowers its scale
            self.overflow_steps += 1
            st.skip_step = True
            scale = trainer.scaler.get_scale()
            self.log.event(st.step + 1, "overflow", f"fp16 gradient overflow at loss scale {scale:g}; the GradScaler lowers it")
            if scale >= 1e-3:
                return
            return self._bad_step(trainer, "the fp16 loss scale collapsed (gradients overflow at any scale)", None)
        if bad:
            # the forward's inf/NaN went into BatchNorm's running statistics too (and from there into
            # every later evaluation): they are put back before the search and the retry or skip
            trainer.kept.put_back(trainer.kept.before)
            # a rank whose own step was finite has nothing to find. Sharded (FSDP2), a forward is a
            # collective, so every rank takes part in the forwards of those that search; and the
            # gradients were reduced in the backward, so a rank is bad by its loss alone: when no
            # rank's loss is, every rank looks (at its own gradient shards, in the end)
            here = agreed is None or agreed.local_bad
            if trainer.strategy.sharded:
                mine = find_nonfinite_together(trainer, batch, here or not agreed.bad_ranks)
            else:
                mine = find_nonfinite(trainer.model, trainer.adapter, batch, trainer.micro_batch_size, trainer.device,
                                      trainer.precision) if here else None
            found = distributed.gather_objects((mine, len(batch), batch.ids))
            if self._drop_culprits(trainer, found):
                return
            return self._bad_step(trainer, "non-finite loss or gradient", found)
        if self.spike_on:  # a healthy step: one comparison and an append (guards/spike.py)
            if loss > self.spike.bound and (spike := self.spike.judge(loss)) is not None:
                return self._on_spike(trainer, spike)
            self.spike.add(loss)
            self.spike_streak = 0
        self.consecutive = 0

    def on_step_end(self, trainer) -> None:
        agreed = trainer.state.agreed
        if agreed is not None and agreed.failed_to_load and self._failures_at != trainer.state.step:
            # every rank's, named in rank 0's events, at the step's end: the step that held them has just
            # been counted (once: a deferred step found bad and redone comes to its end again)
            self._failures_at = trainer.state.step
            self._load_failures(trainer, [b for bad in distributed.gather_objects(trainer.batch.bad) for b in bad],
                                trainer.state.step)
        if self._rollback_pending is not None:
            self._rollback(trainer, self._rollback_pending)
        st = trainer.state
        limit = self.cfg.max_skip_fraction * self.planned
        if st.skipped_samples > limit and not st.stop:
            self._stop(trainer, f"skip budget exceeded: {st.skipped_samples} samples skipped, more than "
                                f"guard.max_skip_fraction={self.cfg.max_skip_fraction:g} of the {self.planned} planned "
                                f"({self._reason_text()})",
                       hint=SPIKE_HINT if self.reasons and self.reasons.most_common(1)[0][0] == SPIKE else None)

    def on_fit_end(self, trainer) -> None:
        st = trainer.state
        if (self.reasons or self.overflow_steps or self.rollbacks or self.spikes) and trainer.world.is_main:
            from rich.console import Console
            from rich.table import Table

            t = Table(title=f"guards: {st.skipped_samples} samples and {st.skipped_steps} steps skipped, "
                            f"{self.rollbacks} rollbacks, {self.overflow_steps} fp16 overflow steps, "
                            f"{self.spikes} loss spikes (guard.on_spike={self.cfg.on_spike})")
            for col in ("why", "samples", "steps"):
                t.add_column(col)
            for reason, n in self.reasons.most_common():
                t.add_row(reason, str(n), str(self.reason_steps[reason]))
            t.caption = f"details (sample ids, modules): {self.log.events_path}"
            Console(stderr=True, soft_wrap=True).print(t)
        trainer.state.report["guard"] = {
            "skip_reasons": dict(self.reasons), "overflow_steps": self.overflow_steps,
            "rollbacks": self.rollbacks, "lr_scale": self.lr_scale,
            "first_nonfinite": self.last_finding.describe() if self.last_finding else None,
            "nonfinite_places": dict(self.places), "spikes": self.spikes,
        }

    # ---- loss spikes ---------------------------------------------------------------------
    def _on_spike(self, trainer, spike: Spike) -> None:
        """A finite loss spike (guard.on_spike): say so (warn), or skip the step, redone without the
        samples whose own loss spikes where a few stand out (skip, rollback). Every rank alike."""
        st, step = trainer.state, trainer.state.step + 1
        self.spikes += 1
        ids, batch_ids, why = self._spike_samples(trainer)
        named = (f"; samples {ids[:10]}{'...' if len(ids) > 10 else ''} spike by their own loss" if ids else
                 f"; its samples were not examined ({why})" if why else "; no few samples stand out")
        if ids and why:
            named += f" ({why})"
        if self.cfg.on_spike == "warn":  # training unchanged: the step is applied, its loss kept out of the window
            self.spike_streak += 1
            self.consecutive = 0
            self.log.event(step, "spike", spike.describe() + named, sample_ids=ids, batch_ids=batch_ids[:1000],
                           action="warn", **spike.fields())
            self._say(trainer, f"step {step}: {spike.describe()}{named} (guard.on_spike=warn: training goes on)")
            if self.spike_streak >= self.cfg.max_consecutive_bad_steps:  # not a spike: the loss moved
                self.spike.restart()
                self.spike_streak = 0
                self.log.event(step, "spike", f"{self.cfg.max_consecutive_bad_steps} spikes in a row: the loss has moved "
                               f"to a new level; the spike window starts again ({self.cfg.spike_warmup} steps to warm up)",
                               action="restart")
            return
        trainer.kept.put_back(trainer.kept.before)  # the spiking forward's BatchNorm statistics go, as for a non-finite step
        if ids and not why and self._spike_retry(trainer, spike, ids, batch_ids, named):
            return
        trainer.kept.put_back(trainer.kept.before)
        self._say(trainer, f"step {step}: {spike.describe()}{named}: the step is skipped (guard.on_spike={self.cfg.on_spike})")
        self._bad_step(trainer, SPIKE, None, policy=self.cfg.on_spike, detail=": " + spike.describe().removeprefix(SPIKE + ": ") + named,
                       hint=SPIKE_HINT, culprits=ids, batch_ids=batch_ids, action="skip", **spike.fields())

    def _spike_samples(self, trainer) -> tuple[list[int], list[int], str | None]:
        """``(culprits, the batch's ids, why they were not looked for or the step cannot go on without
        them)``, every rank's together, the same on every rank."""
        batch = trainer.batch
        if trainer.strategy.sharded:  # a forward is a collective there: one sample alone on one rank cannot run
            mine, why = None, "not examined under train.strategy: fsdp"
        else:
            mine, why = sample_losses(trainer, batch)
        found = distributed.gather_objects((batch.ids, mine, why))
        batch_ids = [i for ids, _, _ in found for i in ids]
        whys = [w for _, _, w in found if w]
        if whys:
            return [], batch_ids, whys[0]
        ids = culprits(self.spike, batch_ids, [v for _, losses, _ in found for v in losses])
        if any(ranks_ids and set(ranks_ids) <= set(ids) for ranks_ids, _, _ in found):
            return ids, batch_ids, "they are all of one rank's samples"
        return ids, batch_ids, None

    def _spike_retry(self, trainer, spike: Spike, ids: list[int], batch_ids: list[int], named: str) -> bool:
        """Redo the step without the samples whose own loss spikes (not under an fp16 GradScaler:
        one unscale per step). True when it went on without them."""
        st, agreed = trainer.state, trainer.state.agreed
        if trainer.scaler.is_enabled():
            return False
        if not trainer.retry_step(trainer.batch.without(set(ids))):
            st.skip_step = True  # out of memory and the run stops: nothing of this step is applied
            return True
        bad, loss = verdict(trainer)
        if bad or self.spike.judge(loss) is not None:  # still one (or worse): the step is skipped whole
            st.agreed = agreed
            return False
        self.reasons[SPIKE] += len(ids)
        self.reason_steps[SPIKE] += 1
        st.skipped_samples += len(ids)
        self.log.event(st.step + 1, "skip", f"{spike.describe()}{named}; the step went on without them (loss {loss:.4g})",
                       sample_ids=ids, batch_ids=batch_ids[:1000], action="dropped", loss_without=loss, **spike.fields())
        self._say(trainer, f"step {st.step + 1}: {spike.describe()}{named}: the step went on without them (loss {loss:.4g})")
        self.spike.add(loss)
        self.consecutive = 0
        return True

    def _say(self, trainer, text: str) -> None:
        """A console line for a spike (the first SPIKE_LINES of them; all are in events.jsonl)."""
        if not trainer.world.is_main or self.spikes > SPIKE_LINES:
            return
        from rich.console import Console
        from rich.markup import escape

        more = f" (further spikes: {self.log.events_path} only)" if self.spikes == SPIKE_LINES else ""
        Console(stderr=True, soft_wrap=True, highlight=False).print(f"[yellow]spike[/yellow]: {escape(text + more)}")

