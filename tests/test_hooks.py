"""The hook contract: one method per event, the docstring's pseudocode matches the loop."""

import inspect
import re

import pytest

from trainguard.engine import events, loop
from trainguard.engine.events import Event, Hook


def test_one_noop_method_per_event():
    methods = {n for n, _ in inspect.getmembers(Hook, inspect.isfunction) if n.startswith("on_")}
    assert methods == {f"on_{e.value}" for e in Event}
    for name in methods:
        assert getattr(Hook(), name)(None) is None


def _fires(text: str) -> list[str]:
    return re.findall(r"fire\((?:Event\.)?([A-Z_]+)\)", text)


def test_docstring_pseudocode_lists_every_event_in_loop_order():
    doc = _fires(events.__doc__)
    assert doc == [e.name for e in Event], "the pseudocode names every event once, in enum order"


def test_loop_source_fires_events_in_the_docstring_order():
    src = _fires(inspect.getsource(loop.Trainer.fit))
    step_src = inspect.getsource(loop.Trainer.train_step)
    assert step_src.count("self.gradients(") == 1 and step_src.count("self.settle(") == 1
    step_src = step_src.replace("self.gradients(", inspect.getsource(loop.Trainer.gradients))
    step = _fires(step_src.replace("self.settle(", inspect.getsource(loop.Trainer.settle)))
    expected = [e for e in _fires(events.__doc__) if e not in ("EVAL_END", "CHECKPOINT_SAVED")]
    at = src.index("STEP_START")
    assert src[:at + 1] + step + src[at + 1:] == expected


def test_yaml_hook_receives_events_in_order(cli, write_config, tmp_path):
    rec = tmp_path / "events.txt"
    cfg = write_config(train={"max_steps": 4, "batch_size": 16, "eval_every": 2},
                       checkpoint={"every_steps": 2, "keep_last": 2},
                       hooks=[{"_target_": "tests.toys:Recorder", "path": str(rec)}])
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 0, out
    got = [line.split()[0] for line in rec.read_text().splitlines()]
    pre = ["step_start", "after_backward", "before_optimizer_step", "verdict"]
    # EVAL_END and CHECKPOINT_SAVED fire from inside STEP_END (the Evaluator and Checkpointer run
    # before user hooks), and the final checkpoint from inside FIT_END. The hook reads every step's
    # values at its end (needs_verdict, by default), so each step's deferred verdict is read there.
    assert got == (["fit_start"] + pre + ["step_end"]
                   + pre + ["eval_end", "checkpoint_saved", "step_end"]
                   + pre + ["step_end"]
                   + pre + ["eval_end", "step_end"]
                   + ["checkpoint_saved", "fit_end"]), got
    assert rec.read_text().splitlines()[-1] == "fit_end 4"


def _strategy_calls(text: str) -> list[str]:
    return re.findall(r"strategy\.([a-z_]+)\(", text)


def test_loop_source_calls_the_strategy_where_the_docstring_says():
    """The pseudocode's strategy calls, in order, are those of the step (train_step with gradients and
    forward_backward inlined) and then those of an evaluation."""
    src = inspect.getsource
    step = src(loop.Trainer.train_step).replace("self.gradients(", src(loop.Trainer.gradients), 1)
    step = step.replace("self.forward_backward(", src(loop.Trainer.forward_backward), 1)
    expected = _strategy_calls(step) + _strategy_calls(src(loop.Trainer.evaluate))
    assert _strategy_calls(events.__doc__) == expected
    assert expected == ["begin_step", "accumulate", "agree", "samples", "begin_eval", "end_forwards", "reduce_sums"]


def test_hooks_are_ordered_by_what_each_must_run_after():
    """A built-in hook names the hooks it must run after; the rest keep the order given, user hooks
    included. Two instances of one class get their own checkpoint state keys."""
    from trainguard.callbacks.evaluate import Evaluator
    from trainguard.callbacks.logging import ConsoleProgress, MetricsLogger
    from trainguard.callbacks.signals import SignalHandler
    from trainguard.callbacks.summary import SummaryWriter
    from trainguard.callbacks.timing import Timing
    from trainguard.checkpoint.checkpointer import Checkpointer
    from trainguard.engine.events import HookOrderError, order_hooks, state_keys
    from trainguard.guards.guard import Guard
    from trainguard.guards.oom import OomRecovery
    from trainguard.guards.stall import StallWatchdog

    def bare(cls):  # ordering reads only the class's `after` and the hook's name
        return cls.__new__(cls)

    class Mine(Hook):
        pass

    builtin = [Timing, MetricsLogger, ConsoleProgress, Guard, OomRecovery, Evaluator, Checkpointer, StallWatchdog]
    hooks = [bare(c) for c in [SignalHandler, SummaryWriter, *reversed(builtin)]] + [Mine(), Mine()]
    ordered = [type(h).__name__ for h in order_hooks(hooks)]
    before = lambda a, b: ordered.index(a) < ordered.index(b)  # noqa: E731
    assert before("Guard", "Checkpointer") and before("Evaluator", "Checkpointer") and before("Guard", "Evaluator")
    assert before("Checkpointer", "StallWatchdog") and before("Timing", "MetricsLogger")
    assert before("MetricsLogger", "ConsoleProgress")
    assert ordered[-2:] == ["SummaryWriter", "SignalHandler"] and ordered[-4:-2] == ["Mine", "Mine"]
    assert state_keys(order_hooks(hooks))[-4:-2] == ["Mine", "Mine#2"]

    a, b = Mine(), Mine()
    a.name, b.name, a.after, b.after = "a", "b", ("b",), ("a",)
    with pytest.raises(HookOrderError, match="a, b"):
        order_hooks([a, b])


def test_two_hooks_of_one_class_resume_each_with_its_own_state(cli, write_config, tmp_path):
    """Checkpointed hook state is keyed per instance: two StepCounters, one from 0 and one from 100,
    resume with their own counts (keyed by class name alone, the second's state overwrote the first's)."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    hooks = [{"_target_": "tests.toys:StepCounter", "path": str(a)},
             {"_target_": "tests.toys:StepCounter", "path": str(b), "start": 100}]
    for steps in (2, 4):  # the second run resumes from the first's final checkpoint
        cfg = write_config(train={"max_steps": steps, "batch_size": 16}, hooks=hooks)
        code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
        assert code == 0, out
    assert "resumed from" in out
    assert (a.read_text(), b.read_text()) == ("4", "104")
