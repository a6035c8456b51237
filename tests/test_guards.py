"""One test per failure class of the field reports, each injected for real into a run of the real CLI."""

import json

import pytest
import torch
import yaml

from tests.conftest import read_jsonl, toy_config



def train(cli, tmp_path, name="run", **sections):
    cfg = toy_config(**sections)
    cfg.setdefault("log", {"progress": False})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = tmp_path / name
    code, out = cli("train", "--config", path, "--run-dir", run)
    summary = json.loads((run / "summary.json").read_text())
    events = read_jsonl(run / "events.jsonl") if (run / "events.jsonl").exists() else []
    metrics = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    return code, out, summary, events, metrics


def final_params_finite(summary):
    from pathlib import Path

    state = torch.load(Path(summary["last_checkpoint"]) / "model.pt", weights_only=True)
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_extra_fields_and_int_lists_reach_an_explicit_forward(cli, tmp_path):
    """Report 000: `idx` reached a forward() that did not take it; lists were not cast to long."""
    code, out, summary, events, metrics = train(
        cli, tmp_path, model={"_target_": "tests.toys:BagOfTokens"},
        data={"train": {"_target_": "tests.toys:TokenRows"}, "val": None},
        train={"max_steps": 60, "batch_size": 16, "log_every": 10})
    assert code == 0, out
    assert "left out: idx, sentence" in out  # reported once, at start
    assert sum("left out" in line for line in out.splitlines()) == 1
    train_losses = [m["loss"] for m in metrics if m["split"] == "train"]
    assert train_losses[-1] < 0.8 * train_losses[0]


def test_a_kwargs_forward_gets_only_the_fields_it_names(cli, tmp_path):
    """A Hugging Face-style forward(input_ids, attention_mask=None, labels=None, **kwargs) gets what it
    names, not `idx` or raw strings (HF Trainer's remove_unused_columns); the rest is said once."""
    code, out, summary, events, metrics = train(
        cli, tmp_path, model={"_target_": "tests.toys:KwargsModel"},
        data={"train": {"_target_": "tests.toys:TokenRows"}, "val": None}, train={"max_steps": 20, "batch_size": 16})
    assert code == 0, out  # the model raises if anything else reaches its **kwargs
    assert "the model gets attention_mask, input_ids, labels; left out: idx, sentence" in out
    # a field listed in data.fields goes through **kwargs: here the model refuses it, and the run says so at once
    code, out, *_ = train(cli, tmp_path, "listed", model={"_target_": "tests.toys:KwargsModel"},
                          data={"train": {"_target_": "tests.toys:TokenRows"}, "val": None, "fields": ["idx"]},
                          train={"max_steps": 20, "batch_size": 16})
    assert code == 1 and "unexpected fields reached the model: ['idx']" in out and "Traceback" not in out


def test_a_module_that_makes_every_step_nonfinite_is_named_in_the_error(cli, tmp_path):
    """A layer that returns NaN from step 21 on: the run stops at its budget, and the final error line
    and summary.json name the module and say it looks like the model, not the data."""
    code, out, summary, events, _ = train(
        cli, tmp_path, model={"_target_": "tests.toys:BreaksAt", "at": 21}, data={"val": None},
        train={"max_steps": 60, "batch_size": 16}, guard={"max_skip_fraction": 0.2, "max_consecutive_bad_steps": 50})
    assert code == 1, out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "skip budget exceeded" in error[0] and "`body.1.1`" in error[0] and "model problem" in error[0], out
    assert "hint:" in out and "body.1.1" in out.split("hint:")[1]
    assert "`body.1.1`" in summary["error"] and "model problem" in summary["error"]
    assert summary["guard"]["nonfinite_places"] == {"output of module `body.1.1`": summary["skipped_steps"]}


def test_ctc_infeasible_samples_are_skipped_and_named(cli, tmp_path):
    """Report 001: CTC loss is inf for a few samples; those are skipped and named, the run completes."""
    code, out, summary, events, _ = train(
        cli, tmp_path, model={"_target_": "tests.toys:CTCModel"},
        data={"train": {"_target_": "tests.toys:Utterances"}, "val": None},
        train={"max_steps": 40, "batch_size": 16, "log_every": 10})
    assert code == 0, out
    assert summary["status"] == "completed"
    skips = [e for e in events if e["type"] == "skip"]
    named = {i for e in skips for i in e["sample_ids"]}
    assert skips and named <= {5, 77, 150} and len(named) >= 2
    assert summary["skipped_samples"] == sum(len(e["sample_ids"]) for e in skips)
    assert summary["skipped_steps"] == 0  # the steps went on without the bad samples
    assert final_params_finite(summary)
    assert "guards:" in out  # the end-of-run report


def test_a_bad_step_leaves_batchnorm_statistics_clean_and_its_sample_is_found_alone(cli, tmp_path):
    """One sample overflows to inf before a BatchNorm, which spreads it over its micro-batch: the
    halving finds it alone (a part of one sample runs BatchNorm on its running statistics, which
    in training mode cannot normalize one sample), and the running statistics are those of the
    healthy steps only. Before, the bad step's forward made them NaN for the rest of the run, and
    every evaluation after it NaN, though training itself went on."""
    code, out, summary, events, metrics = train(
        cli, tmp_path, model={"_target_": "tests.toys:NormBlocks"},
        data={"train": {"_target_": "tests.toys:MarkedBlobs", "n": 256, "heavy_ids": [26]},
              "val": {"_target_": "tests.toys:Blobs", "n": 64, "sample_seed": 1}, "shuffle": False},
        train={"max_steps": 6, "batch_size": 16, "micro_batch_size": 8, "log_every": 1, "eval_every": 3})
    assert code == 0, out
    skips = [e for e in events if e["type"] == "skip"]
    assert [(e["step"], e["sample_ids"], e["module"]) for e in skips] == [(2, [26], "blocks.0.0")]
    assert final_params_finite(summary)  # the running statistics are buffers in model.pt
    assert [r["step"] for r in metrics if r["split"] == "val" and r["loss"] < 10] == [3, 6]


def test_a_healed_sample_is_left_out_up_front_on_later_epochs_and_after_resume(cli, tmp_path):
    """guard.remember_bad_samples: the CTC samples found non-finite in epoch 1 are left out of
    their later batches before the forward (no bad step, no search again; the GPU measurement in
    docs/guards.md: a search per step made a step 20 times slower). Off, they are found anew every
    epoch. The memory is part of the checkpoint: a resumed run keeps leaving them out."""
    import shutil

    sections = dict(model={"_target_": "tests.toys:CTCModel"},
                    data={"train": {"_target_": "tests.toys:Utterances", "n": 64, "infeasible": [5, 40]}, "val": None},
                    train={"max_steps": 40, "batch_size": 16, "log_every": 10},  # 10 epochs
                    checkpoint={"every_steps": 10, "keep_last": 5})

    def kinds(events):
        found = [e for e in events if e["type"] == "skip" and "went on without" in e["reason"]]
        known = [e for e in events if e["type"] == "skip" and "known from an earlier step" in e["reason"]]
        return found, known

    code, out, summary, events, _ = train(cli, tmp_path, "remember", **sections)
    assert code == 0, out
    found, known = kinds(events)
    assert sorted(i for e in found for i in e["sample_ids"]) == [5, 40]  # each found once
    assert len(known) >= 8 and {i for e in known for i in e["sample_ids"]} == {5, 40}
    assert summary["skipped_steps"] == 0 and summary["skipped_samples"] == 20  # 2 samples x 10 epochs
    code, out, off, off_events, _ = train(cli, tmp_path, "forget", **{**sections, "guard": {"remember_bad_samples": False}})
    assert code == 0, out
    found, known = kinds(off_events)
    assert not known and sum(e["sample_ids"].count(5) for e in found) == 10 and off["skipped_samples"] == 20
    # resumed from step 20 (epoch 5): the two stay out, without being searched for again
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "remember" / "checkpoints" / "step_0000020", tmp_path / "part" / "checkpoints" / "step_0000020")
    code, out, part, part_events, _ = train(cli, tmp_path, "part", **sections)
    assert code == 0 and "resumed from" in out, out
    found, known = kinds([e for e in part_events if e["step"] > 20])
    assert not found and known and part["skipped_samples"] == 20
    a = torch.load(tmp_path / "remember" / "checkpoints" / "step_0000040" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "step_0000040" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_samples_that_raise_or_return_none_are_skipped(cli, tmp_path):
    """Report 004: one bad sample must not kill the run."""
    code, out, summary, events, _ = train(
        cli, tmp_path, data={"train": {"_target_": "tests.toys:Flaky", "broken_every": 101}, "val": None},
        train={"max_steps": 40, "batch_size": 16})
    assert code == 0, out
    skips = [e for e in events if e["type"] == "skip"]
    reasons = " ".join(e["reason"] for e in skips)
    assert "ValueError: cannot decode sample" in reasons and "returned None" in reasons
    named = {i for e in skips for i in e["sample_ids"]}
    assert named and named <= set(range(3, 512, 101))
    assert summary["skipped_samples"] == sum(len(e["sample_ids"]) for e in skips) > 0
    assert final_params_finite(summary)


def test_thirty_percent_broken_stops_at_the_budget(cli, tmp_path):
    code, out, summary, events, _ = train(
        cli, tmp_path, data={"train": {"_target_": "tests.toys:Flaky", "broken_fraction": 0.3}, "val": None},
        train={"max_steps": 100, "batch_size": 16})
    assert code == 1, out
    assert "error:" in out and "skip budget exceeded" in out and "max_skip_fraction" in out and "Traceback" not in out
    assert summary["status"] == "failed" and summary["steps"] < 100
    assert summary["skipped_samples"] > 0.05 * 100 * 16
    assert [e["type"] for e in events[-3:]] == ["stop", "checkpoint", "end"]  # the work up to the stop is kept
    # a user who accepts the broken data raises the budget and re-runs: it continues from the stop
    code, out = cli("train", "--config", tmp_path / "run.yaml", "--run-dir", tmp_path / "run",
                    "--set", "guard.max_skip_fraction=0.5")
    assert code == 0, out
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["steps"] == 100
    assert [e["step"] for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["type"] == "resume"] == [summary["steps"]]


DIVERGE = dict(model={"_target_": "tests.toys:Diverging"},
               data={"train": {"_target_": "tests.toys:Ones"}, "val": None},
               optim={"name": "sgd", "lr": 2.5, "momentum": 0.0},
               schedule={"name": "constant", "warmup_steps": 0},
               train={"max_steps": 40, "batch_size": 8, "grad_clip": 0.0, "log_every": 5},
               checkpoint={"every_steps": 5, "keep_last": 3})
BUDGET = {"max_skip_fraction": 0.5}  # these tests are about the non-finite policy, not the skip budget


def test_nan_module_stop(cli, tmp_path):
    code, out, summary, events, _ = train(cli, tmp_path, guard={"on_nonfinite": "stop", **BUDGET}, **DIVERGE)
    assert code == 1 and "encoder.1" in out and "Traceback" not in out
    assert summary["status"] == "failed" and "encoder.1" in summary["error"] and summary["steps"] == 29


def test_nan_module_skip_fails_when_every_step_is_bad(cli, tmp_path):
    code, out, summary, events, _ = train(cli, tmp_path, guard={"on_nonfinite": "skip", **BUDGET}, **DIVERGE)
    assert code == 1 and "bad steps in a row" in out and "encoder.1" in out
    assert summary["status"] == "failed" and "encoder.1" in summary["error"]
    assert summary["skipped_steps"] == 10
    assert final_params_finite({"last_checkpoint": sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]})


def test_nan_module_rollback_recovers(cli, tmp_path):
    code, out, summary, events, metrics = train(cli, tmp_path, guard={"on_nonfinite": "rollback", **BUDGET}, **DIVERGE)
    assert code == 0, out
    assert summary["status"] == "completed" and summary["steps"] == 40
    rollbacks = [e for e in events if e["type"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["to_step"] == 25 and rollbacks[0]["lr_scale"] == 0.5
    assert "encoder.1" in rollbacks[0]["reason"]
    assert summary["guard"]["rollbacks"] == 1
    assert final_params_finite(summary)
    assert metrics[-1]["loss"] < 1.0 and metrics[-1]["lr"] == 1.25  # converged after the LR was halved


def test_rollback_gives_up_after_max_rollbacks(cli, tmp_path):
    cfg = {**DIVERGE, "optim": {"name": "sgd", "lr": 6.0, "momentum": 0.0}}  # diverges even at lr/8
    code, out, summary, events, _ = train(cli, tmp_path, guard={"on_nonfinite": "rollback", "max_rollbacks": 2, **BUDGET}, **cfg)
    assert code == 1 and "still diverging after 2 rollbacks" in out and "encoder.1" in out
    assert len([e for e in events if e["type"] == "rollback"]) == 2


def test_shape_mismatch_fails_in_preflight(cli, tmp_path):
    """Report 001: `mat1 and mat2 shapes cannot be multiplied`, found before the first step."""
    code, out, summary, events, _ = train(cli, tmp_path, model={"_target_": "tests.toys:WrongWidth"})
    assert code == 1 and "Traceback" not in out
    assert "preflight" in out and "`encoder.0` (Linear)" in out and "expected input (*, 10)" in out and "(16, 8)" in out
    assert "hint:" in out
    assert summary["status"] == "failed" and summary["steps"] == 0


def test_missing_forward_argument_fails_in_preflight(cli, tmp_path):
    code, out, summary, _, _ = train(cli, tmp_path, model={"_target_": "tests.toys:BagOfTokens"})
    assert code == 1 and "requires ['attention_mask', 'input_ids']" in out and "data.fields" in out


def test_empty_dataset_is_a_clear_error(cli, tmp_path):
    """Report 003: a wrong split name gave an empty dataset."""
    code, out, summary, _, _ = train(cli, tmp_path, data={"train": {"_target_": "tests.toys:Blobs", "n": 0}})
    assert code == 1 and "data.train is empty (0 samples)" in out and "split name" in out


def test_unstackable_field_names_field_and_shapes():
    from trainguard.engine.collate import collate_samples
    from trainguard.errors import RunFailed

    with pytest.raises(RunFailed, match=r"field `image`.*\(3, 224, 224\), \(3, 448, 448\)"):
        collate_samples([{"image": torch.zeros(3, 224, 224)}, {"image": torch.zeros(3, 448, 448)}])
    with pytest.raises(RunFailed, match=r"field `tokens`.*lengths"):
        collate_samples([{"tokens": [1, 2, 3]}, {"tokens": [1, 2]}])


def test_collate_dtype_rules():
    import numpy as np

    from trainguard.engine.collate import collate_samples

    b = collate_samples([{"i": 1, "n": np.int32(2), "f": 0.5, "l": [1, 2], "s": "a", "t": torch.zeros(2, dtype=torch.float64)},
                         {"i": 2, "n": np.int64(3), "f": 1.5, "l": [3, 4], "s": "b", "t": torch.ones(2, dtype=torch.float64)}])
    assert b["i"].dtype == torch.long and b["n"].dtype == torch.long and b["l"].dtype == torch.long
    assert b["f"].dtype == torch.float32 and b["t"].dtype == torch.float32 and b["s"] == ["a", "b"]


def test_fp16_overflow_is_the_scalers_business(cli, tmp_path):
    """fp16 autocast with a GradScaler (on CPU here, torch.amp): overflow steps are counted apart, not as bad data."""
    code, out, summary, events, _ = train(cli, tmp_path, model={"_target_": "tests.toys:LoudMLP"},
                                          train={"max_steps": 30, "batch_size": 16, "precision": "fp16"})
    assert code == 0, out
    overflows = [e for e in events if e["type"] == "overflow"]
    assert overflows and summary["guard"]["overflow_steps"] == len(overflows)
    assert summary["skipped_steps"] == 0 and summary["skipped_samples"] == 0
    assert summary["precision"] == "fp16" and final_params_finite(summary)


def test_tuple_items_with_a_loss_target(cli, tmp_path):
    """`(inputs, target)` items with `loss: {_target_}` are called as loss(model(inputs), target)."""
    code, out, summary, _, metrics = train(
        cli, tmp_path, model={"_target_": "torch.nn:Linear", "in_features": 8, "out_features": 4},
        loss={"_target_": "torch.nn:CrossEntropyLoss"},
        data={"train": {"_target_": "tests.toys:BlobPairs"}, "val": {"_target_": "tests.toys:BlobPairs", "n": 64, "sample_seed": 1}},
        train={"max_steps": 40, "batch_size": 16, "eval_every": 20})
    assert code == 0, out
    val = [m for m in metrics if m["split"] == "val"]
    assert val[-1]["accuracy"] > 0.5 and val[-1]["loss"] < val[0]["loss"] * 1.5


def test_loss_spikes_are_skipped_when_enabled(cli, tmp_path):
    code, out, summary, events, _ = train(
        cli, tmp_path, data={"train": {"_target_": "tests.toys:SpikyBlobs"}, "val": None},
        guard={"spike_factor": 5.0, "spike_window": 20, "max_skip_fraction": 0.2},
        train={"max_steps": 80, "batch_size": 16})
    assert code == 0, out
    spikes = [e for e in events if e["type"] == "skip" and "loss spike" in e["reason"]]
    assert spikes and all(set(e["sample_ids"]) & {40, 140, 240} for e in spikes)
    # the step that holds one is redone without it (action `dropped`); a step is skipped whole only where none stands out
    assert summary["skipped_steps"] == sum(e["action"] == "skip" for e in spikes) < len(spikes)


def test_unstackable_sample_in_a_worker_is_a_clean_error(cli, tmp_path):
    code, out, summary, _, _ = train(cli, tmp_path, data={"train": {"_target_": "tests.toys:OddShapes"}, "val": None,
                                                          "num_workers": 2, "shuffle": False},
                                     train={"max_steps": 40, "batch_size": 16})
    assert code == 1 and "Traceback" not in out and "worker" not in out
    assert "field `x` cannot be stacked" in out and "(16,), (8,)" in out and "hint:" in out
    assert summary["status"] == "failed" and summary["steps"] == 6
