"""Named events of the training loop, and the :class:`Hook` base class.

The loop, with the events and the strategy's calls marked (``fit()``, ``train_step()``,
``forward_backward()`` and ``evaluate()`` in ``engine/loop.py``; the strategy is chosen once, at
build time: one process, ddp or fsdp, :mod:`trainguard.engine.strategy`)::

    fire(FIT_START)                          # after setup and resume, before the first step
    while step < max_steps and not stop:
        batch = next(data)                   # engine-owned order: epoch, position (this rank's share)
        fire(STEP_START)
        strategy.begin_step()                # in a group: rank 0's buffers (BatchNorm statistics) everywhere
        loss = strategy.accumulate(batch)    # forward, backward(loss x share) per micro-batch (fsdp: stand-ins)
        loss, oom = strategy.agree(loss)     # in a group: the step's one exchange, then the gradients reduced
        while out of memory:                 # the attempt is undone (gradients, RNG)
            fire(OUT_OF_MEMORY)              # OomRecovery: halve micro_batch_size, or stop
            accumulate and agree again       # nobody recovered: the run ends before this step
        settle()                             # the previous step's deferred verdict, read now that this step's
                                             # work is queued: healthy, fire(VERDICT); bad, that step is
                                             # redone at once (replay) and this one starts again
        fire(AFTER_BACKWARD)                 # grads summed over micro-batches (and ranks), still scaled
        unscale; clip
        fire(BEFORE_OPTIMIZER_STEP)          # guards: the verdict now (state.skip_step, state.stop, or
                                             # retry_step(fewer samples): accumulate, agree, unscale, clip
                                             # again), or deferred: state.found_inf, a device flag
        optimizer.step(); scheduler.step()   # unless skipped; a set found_inf skips the update on the device
        zero_grad; step += 1
        samples += strategy.samples(batch)   # every rank's
        settle() if a hook reads this step's values at its end (needs_verdict: log line, checkpoint, ...)
        fire(STEP_END)                       # logging, evaluation, checkpoints (own cadence)
            evaluate:                        # the Evaluator
                strategy.begin_eval()        # rank 0's buffers
                forwards over data.val       # this rank's share of each batch, no_grad
                strategy.end_forwards()      # fsdp: reshard
                strategy.reduce_sums(sums)   # every rank gets the whole pass's metrics
            fire(EVAL_END)                   # after each evaluation
            save                             # the Checkpointer: the strategy's model state and optimizer
                                             # state (or shards), gathered or written by every rank
            fire(CHECKPOINT_SAVED)           # after each committed checkpoint
    settle()                                 # a step still deferred
    fire(FIT_END)                            # at every end: completed, failed, interrupted

A deferred step (engine/defer.py: one process, a fused optimizer, no fp16 scaler) costs no host sync:
its verdict is read one step later from a pinned copy. A bad one is then redone from its start (RNG,
BatchNorm statistics, scheduler and counters put back; its masked update changed nothing else), as
an undeferred step: its AFTER_BACKWARD, BEFORE_OPTIMIZER_STEP and STEP_END fire again, and so does
the next step's STEP_START, since that step starts again after it.

Hooks run in list order, each at the events it overrides. The order is declared where it matters:
a hook's ``after`` names the hooks it must run after (``"*"``: after every hook that does not say
``"*"`` itself), and :func:`order_hooks` sorts the run's hooks by it, keeping their order otherwise.
A hook's checkpointed state is keyed by :func:`state_keys`: its ``name``, or its class name,
numbered from the second instance on, so two instances of one class keep their own.

Hooks change the run only through explicit fields on :class:`~trainguard.engine.state.RunState`
(``skip_step``, ``stop``/``status``, ``oom``) and ``trainer.micro_batch_size``, never by raising
through the loop.
"""

from __future__ import annotations

from enum import Enum


class Event(str, Enum):
    """The events at which hooks are called, in loop order."""

    FIT_START = "fit_start"
    STEP_START = "step_start"
    OUT_OF_MEMORY = "out_of_memory"
    VERDICT = "verdict"
    AFTER_BACKWARD = "after_backward"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    STEP_END = "step_end"
    EVAL_END = "eval_end"
    CHECKPOINT_SAVED = "checkpoint_saved"
    FIT_END = "fit_end"


class Hook:
    """Base class for hooks: one no-op method per :class:`Event`, named ``on_<event>``.

    Subclass it and override the events you need. Every method receives the trainer
    (``trainer.state`` is the :class:`RunState`; ``trainer.model``, ``trainer.optimizer`` ...).
    A hook with ``state_dict()``/``load_state_dict()`` is checkpointed and restored on resume.

    ``after``: names of hooks (``name``, else class name) this one must run after at every event, or
    ``"*"`` for after all others; ``name``: what others call it, and its checkpoint state's key.
    """

    after: tuple[str, ...] = ()
    name: str | None = None

    def on_fit_start(self, trainer) -> None:
        """After setup and resume, before the first step."""

    def on_step_start(self, trainer) -> None:
        """A batch has been drawn; ``trainer.state.batch_ids`` names its samples."""

    def on_out_of_memory(self, trainer) -> None:
        """The forward/backward ran out of device memory; ``trainer.state.oom`` says where. Its
        gradients and RNG draws are undone. Lower ``trainer.micro_batch_size`` and set
        ``state.oom = None`` to redo it; otherwise the run ends before this step."""

    def on_verdict(self, trainer) -> None:
        """A deferred step's verdict reached the host, healthy: ``trainer.state.verdict`` holds its step,
        loss and gradient norm (one step late, or at its own STEP_END; see engine/defer.py)."""

    def on_after_backward(self, trainer) -> None:
        """Gradients of all micro-batches are accumulated (still loss-scaled under fp16)."""

    def on_before_optimizer_step(self, trainer) -> None:
        """Gradients are unscaled and clipped; set ``state.skip_step`` to skip the update."""

    def on_step_end(self, trainer) -> None:
        """The optimizer step is done (or skipped) and ``state.step`` counts it."""

    def needs_verdict(self, trainer) -> bool:
        """Whether this step's ``on_step_end`` reads the step's values (``state.loss``, ``skip_step``):
        asked before STEP_END of a deferred step. True (the default, for a hook that overrides
        ``on_step_end``) makes the host read the step's verdict first, one host sync; a hook that reads
        values only on some steps (a log line) says so, and the others stay free of syncs. A hook
        told False sees ``skip_step`` unset and the loss still on the device: a bad step is redone
        later, and its STEP_END fires again."""
        return True

    def on_eval_end(self, trainer) -> None:
        """An evaluation finished; ``trainer.state.eval_metrics`` holds its results."""

    def on_checkpoint_saved(self, trainer) -> None:
        """A checkpoint was committed at ``trainer.state.last_checkpoint``."""

    def on_fit_end(self, trainer) -> None:
        """The run ended; ``trainer.state.status`` says how."""


def hook_method(event: Event) -> str:
    """The :class:`Hook` method name for an event."""
    return f"on_{event.value}"


class HookOrderError(ValueError):
    """Hooks whose ``after`` cannot all hold (a cycle)."""


def hook_name(hook: Hook) -> str:
    """What ``after`` refers to: the hook's ``name``, or its class name."""
    name = getattr(hook, "name", None)
    return name if isinstance(name, str) and name else type(hook).__name__


def _after(hook: Hook) -> tuple[str, ...]:
    after = getattr(hook, "after", ())
    return tuple(a for a in after if isinstance(a, str)) if isinstance(after, (tuple, list)) else ()


def order_hooks(hooks: list[Hook]) -> list[Hook]:
    """``hooks`` in an order where each runs after every hook its ``after`` names (those present),
    otherwise in the order given (a stable topological sort)."""
    names = [hook_name(h) for h in hooks]

    def needs(i: int) -> set[int]:
        after = _after(hooks[i])
        return {j for j, n in enumerate(names) if j != i and (n in after or "*" in after and "*" not in _after(hooks[j]))}

    wait = {i: needs(i) for i in range(len(hooks))}
    placed: list[int] = []
    while len(placed) < len(hooks):
        ready = next((i for i in range(len(hooks)) if i not in placed and wait[i] <= set(placed)), None)
        if ready is None:
            stuck = [names[i] for i in range(len(hooks)) if i not in placed]
            raise HookOrderError(f"hooks {', '.join(stuck)} name each other in `after`: no order satisfies them")
        placed.append(ready)
    return [hooks[i] for i in placed]


def state_keys(hooks: list[Hook]) -> list[str]:
    """Per hook, the key of its state in a checkpoint: :func:`hook_name`, then ``#2``, ``#3`` ... for
    later hooks of the same name (the first keeps the plain name, as checkpoints had it)."""
    seen: dict[str, int] = {}
    keys = []
    for h in hooks:
        n = hook_name(h)
        seen[n] = seen.get(n, 0) + 1
        keys.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return keys
