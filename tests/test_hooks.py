"""The hook contract: one method per event, the docstring's pseudocode matches the loop."""

import inspect
import re

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
    assert step_src.count("self.gradients(") == 1
    step = _fires(step_src.replace("self.gradients(", inspect.getsource(loop.Trainer.gradients)))
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
    pre = ["step_start", "after_backward", "before_optimizer_step"]
    # EVAL_END and CHECKPOINT_SAVED fire from inside STEP_END (the Evaluator and Checkpointer run
    # before user hooks), and the final checkpoint from inside FIT_END.
    assert got == (["fit_start"] + pre + ["step_end"]
                   + pre + ["eval_end", "checkpoint_saved", "step_end"]
                   + pre + ["step_end"]
                   + pre + ["eval_end", "step_end"]
                   + ["checkpoint_saved", "fit_end"]), got
    assert rec.read_text().splitlines()[-1] == "fit_end 4"
