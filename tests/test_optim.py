"""The user's own optimizer and schedule (`_target_`), through real runs: exact resume after kill -9,
the weight-decay groups, the start-up state allocation, config errors, and rollback's lower LR."""

import copy
import json

import pytest
import torch
import yaml

from tests.conftest import read_jsonl, toy_config
from tests.test_resume import assert_bitwise_equal, final_weights, kill9_at, run

# RMSprop (weight decay, momentum) + OneCycleLR (total_steps filled from train.max_steps), with
# accumulation and dropout: the optimizer's and the schedule's state must both survive kill -9.
CUSTOM = dict(
    model={"_target_": "tests.toys:DropoutMLP"},
    data={"train": {"_target_": "tests.toys:Blobs", "n": 256}, "val": None, "num_workers": 0},
    optim={"_target_": "torch.optim.RMSprop", "lr": 0.01, "weight_decay": 0.01, "momentum": 0.5},
    schedule={"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.02},
    train={"max_steps": 30, "batch_size": 16, "micro_batch_size": 4, "log_every": 5},
    checkpoint={"every_steps": 5, "keep_last": 3},
    log={"progress": False},
)


def write(tmp_path, name, hooks=(), **sections):
    cfg = toy_config(**{**CUSTOM, **sections})
    cfg["optim"], cfg["schedule"] = sections.get("optim", CUSTOM["optim"]), sections.get("schedule", CUSTOM["schedule"])
    cfg["hooks"] = list(hooks)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_custom_optimizer_and_schedule_resume_bitwise_after_kill9(tmp_path):
    code, out = run(write(tmp_path, "ref"), tmp_path / "ref")
    assert code == 0, out
    reference = final_weights(tmp_path / "ref")

    cfg = write(tmp_path, "custom", hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.05}])
    run_dir = tmp_path / "run"
    kill9_at(cfg, run_dir)
    code, out = run(cfg, run_dir)  # the same command: config.yaml read back and compared, then resumed
    assert code == 0, out
    assert "resumed from" in out
    assert_bitwise_equal(final_weights(run_dir), reference)

    # the written config round-trips: the optimizer's own keys beside _target_, trainguard's `fused`
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["optim"] == {**CUSTOM["optim"], "fused": "auto"} and written["schedule"] == CUSTOM["schedule"]

    # the weight-decay rule holds for RMSprop: decay on the 2-dim weights only
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    ts = torch.load(last / "trainer.pt", weights_only=True)
    model = torch.load(last / "model.pt", weights_only=True)
    groups = ts["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert len(groups[0]["params"]) == sum(t.dim() >= 2 for t in model.values())
    assert len(groups[1]["params"]) == sum(t.dim() < 2 for t in model.values())
    assert ts["scheduler"]["schedule"]["total_steps"] == 30  # OneCycleLR's total_steps = train.max_steps
    lrs = [m["lr"] for m in read_jsonl(run_dir / "metrics.jsonl") if m["split"] == "train"]
    assert lrs[1] > lrs[0] and lrs[-1] < lrs[1]  # one cycle: up, then down


def _adafactor(params):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=None, relative_step=True, scale_parameter=True, warmup_init=False, weight_decay=0.01)


@pytest.mark.parametrize("make", [_adafactor, lambda ps: __import__("tests.optim_toys").optim_toys.DecayingRelativeStep(ps)],
                         ids=["adafactor", "lr-ignoring-toy"])
def test_materialize_state_leaves_weights_and_a_fresh_state(make):
    """The start-up allocation step leaves the weights bitwise as they were, and the next steps equal
    a fresh optimizer's, for optimizers that ignore `lr` (the toy moves the weights even at lr 0)."""
    from trainguard.engine.optim import materialize_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt, fresh = make(list(model.parameters())), make(list(twin.parameters()))
    assert materialize_state(opt, verify=True)
    assert opt.state, "the state is allocated"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for _ in range(3):
        for a, b in zip(model.parameters(), twin.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        fresh.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_adafactor_trains_and_the_run_says_what_it_cannot(cli, tmp_path):
    """Adafactor under the built-in schedule; `optim.fused: true` for an optimizer without a fused
    kernel is said at start (console, events). With relative steps (lr: null) the built-in schedule,
    which cannot scale a null LR, is a config error that names the fix."""
    ada = {"_target_": "transformers.optimization.Adafactor", "lr": None, "relative_step": True, "warmup_init": True}
    sections = dict(optim={**ada, "lr": 0.01, "relative_step": False, "warmup_init": False, "fused": True}, schedule={"name": "cosine"},
                    train={"max_steps": 12, "batch_size": 16, "log_every": 1}, checkpoint={"every_steps": 0})
    code, out = cli("train", "--config", write(tmp_path, "ada", **sections), "--run-dir", tmp_path / "run")
    assert code == 0, out
    assert "optim.fused: true" in out and "takes no `fused` argument" in out
    notes = [e["reason"] for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["type"] == "note"]
    assert any("fused" in n for n in notes)
    metrics = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m["split"] == "train"]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 12

    code, out = cli("train", "--config", write(tmp_path, "ada2", **{**sections, "optim": ada}), "--run-dir", tmp_path / "run2")
    assert code == 2 and "sets its own learning rate" in out and "relative_step: false" in out and "Traceback" not in out


def test_a_transformers_schedule_gets_the_run_length(cli, tmp_path):
    """transformers' cosine schedule with warmup: num_training_steps is train.max_steps when not given."""
    from transformers import get_cosine_schedule_with_warmup

    cfg = write(tmp_path, "hf", schedule={"_target_": "transformers.get_cosine_schedule_with_warmup", "num_warmup_steps": 3},
                train={"max_steps": 10, "batch_size": 16, "log_every": 1}, checkpoint={"every_steps": 0})
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 0, out
    lrs = [m["lr"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m["split"] == "train"]
    p = torch.nn.Parameter(torch.zeros(1))
    ref = get_cosine_schedule_with_warmup(torch.optim.RMSprop([p], lr=0.01), num_warmup_steps=3, num_training_steps=10)
    expected = []
    for _ in range(10):
        expected.append(ref.get_last_lr()[0])
        ref.optimizer.step()
        ref.step()
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("optim,schedule,words", [
    ({"name": "sgd", "_target_": "torch.optim.RMSprop"}, None, ["optim.name", "optim._target_", "keep one"]),
    (None, {"name": "cosine", "_target_": "torch.optim.lr_scheduler.OneCycleLR"}, ["schedule.name", "schedule._target_"]),
    ({"name": "adamw", "betaz": [0.9, 0.99]}, None, ["optim.betaz", "did you mean `optim.betas`"]),
    ({"_target_": "torch.optim.RMSprop", "lr": 0.01, "betas": [0.9, 0.99]}, None, ["cannot call `torch.optim.RMSprop`", "betas"]),
    ({"_target_": "torch.optim.RMSprop", "lr": -1.0}, None, ["Invalid learning rate"]),
    (None, {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau"}, ["needs an argument (metrics)"]),
], ids=["optim-name-and-target", "schedule-name-and-target", "builtin-typo", "target-unknown-key", "target-refuses", "plateau"])
def test_bad_optimizer_or_schedule_is_a_config_error(cli, tmp_path, optim, schedule, words):
    cfg = toy_config(log={"progress": False})
    if optim is not None:
        cfg["optim"] = optim
    if schedule is not None:
        cfg["schedule"] = schedule
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / "run")
    assert code == 2, out
    assert "error:" in out and "hint:" in out and "Traceback" not in out
    for w in words:
        assert w in out, w


def test_set_reaches_the_optimizers_own_keys_and_the_dump_round_trips(tmp_path):
    from trainguard.config.load import resolve_config, validate

    path = write(tmp_path, "set")
    cfg, _, _ = resolve_config(path, overrides=["optim.lr=0.5", "optim.alpha=0.9", "optim.fused=false", "schedule.max_lr=0.7"])
    dumped = cfg.model_dump(mode="json")
    assert dumped["optim"] == {**CUSTOM["optim"], "lr": 0.5, "alpha": 0.9, "fused": False}
    assert dumped["schedule"] == {**CUSTOM["schedule"], "max_lr": 0.7}
    assert validate(yaml.safe_load(yaml.safe_dump(dumped)), "config.yaml") == cfg  # what resume reads back
    from trainguard.run_dir import config_diff  # resume: the optimizer's own keys count, trainguard's `fused` may change

    changed, _, _ = resolve_config(path, overrides=["optim.lr=0.25", "optim.alpha=0.9", "optim.fused=true", "schedule.max_lr=0.7"])
    assert config_diff(dumped, changed.model_dump(mode="json")) == ["optim.lr: 0.5 in the checkpoint, 0.25 now"]
    builtin = tmp_path / "builtin.yaml"
    builtin.write_text(yaml.safe_dump(toy_config(), sort_keys=False))
    cfg, _, _ = resolve_config(builtin, overrides=["optim.lr=0.25"])
    assert cfg.optim.lr == 0.25 and cfg.optim.target is None


def test_rollback_lowers_the_lr_of_a_custom_chained_scheduler(cli, tmp_path):
    """ExponentialLR updates the groups' LR from their last value (a chained scheduler, no
    base_lrs/lr_lambdas to rescale): after the rollback the run goes on at half its LR and converges."""
    from tests.test_guards import BUDGET, DIVERGE

    cfg = toy_config(**{**DIVERGE, "checkpoint": {"every_steps": 4, "keep_last": 3}},  # the slower LR diverges later
                     guard={"on_nonfinite": "rollback", **BUDGET}, log={"progress": False})
    cfg["optim"] = {"_target_": "torch.optim.SGD", "lr": 2.5}
    cfg["schedule"] = {"_target_": "torch.optim.lr_scheduler.ExponentialLR", "gamma": 0.999}
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / "run")
    assert code == 0, out
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    metrics = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m["split"] == "train"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rollbacks = [e for e in events if e["type"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["lr_scale"] == 0.5
    assert summary["status"] == "completed" and summary["steps"] == 40
    # the schedule resumed from the checkpoint's position, chained on its own (unscaled) LR, stepped
    # once per applied step (the skipped ones not): the step counter went back with it
    lr = 2.5
    for _ in range(metrics[-1]["step"] - 1):
        lr *= 0.999
    assert metrics[-1]["lr"] == pytest.approx(0.5 * lr, rel=1e-12)
    assert metrics[-1]["loss"] < 1.0
