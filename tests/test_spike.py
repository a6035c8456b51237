"""Finite loss spikes (guard.on_spike), injected for real into runs of the real CLI: a sample whose
inputs are scaled by 1000 (its step's loss is thousands of times the median), and a bad update
(the last layer negated and scaled: every sample's loss far up until rolled back)."""

import json

import torch
import yaml

from tests.conftest import read_jsonl, toy_config

SPIKY = 963  # with shuffle off and batches of 16: met first at step 61 (after the 50 steps of warm-up)


def train(cli, tmp_path, name, **sections):
    cfg = toy_config(**sections)
    cfg["log"] = {"progress": False}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = tmp_path / name
    code, out = cli("train", "--config", path, "--run-dir", run)
    summary = json.loads((run / "summary.json").read_text())
    return code, out, summary, read_jsonl(run / "events.jsonl"), run


def spiky(every_steps=0, **guard):
    return dict(data={"train": {"_target_": "tests.spike_toys:SpikyAt", "n": 1024, "ids": [SPIKY]}, "val": None,
                      "shuffle": False},
                train={"max_steps": 70, "batch_size": 16, "log_every": 10}, checkpoint={"every_steps": every_steps},
                guard=guard)


def weights(summary) -> dict:
    return torch.load(f"{summary['last_checkpoint']}/model.pt", weights_only=True)


def test_warn_names_the_spike_and_its_sample_and_changes_nothing(cli, tmp_path):
    """warn (the default): a `spike` event with the step, the loss, the rule's numbers and the sample
    whose own loss spikes; the console says so; the weights are bitwise those of on_spike: off; the
    spike's loss stays out of the window (checkpointed); the report lists it. A run resumed from the
    checkpoint of step 60 judges step 61 as the uninterrupted one did (the window is in the
    checkpoint: without it the rule would be warming up again) and ends with the same weights."""
    import shutil

    code, out, summary, events, run = train(cli, tmp_path, "warn", **spiky(every_steps=60))
    assert code == 0, out
    spikes = [e for e in events if e["type"] == "spike"]
    assert [(e["step"], e["sample_ids"], e["action"]) for e in spikes] == [(61, [SPIKY], "warn")], spikes
    assert spikes[0]["ratio"] > 100 and spikes[0]["z"] > 6 and spikes[0]["loss"] > 100 * spikes[0]["median"]
    assert "spike: step 61: loss spike:" in out and f"samples [{SPIKY}]" in out
    assert summary["skipped_steps"] == 0 and summary["guard"]["spikes"] == 1
    guard = torch.load(f"{summary['last_checkpoint']}/trainer.pt", weights_only=True)["hooks"]["Guard"]
    assert len(guard["window"]) == 69 and max(guard["window"]) < spikes[0]["loss"] / 10  # 70 steps, less the spike

    code, out, off, events_off, _ = train(cli, tmp_path, "off", **spiky(on_spike="off"))
    assert code == 0, out
    assert not [e for e in events_off if e["type"] == "spike"]
    a, b = weights(summary), weights(off)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    part = tmp_path / "part"
    shutil.copytree(run / "checkpoints" / "step_0000060", part / "checkpoints" / "step_0000060")
    code, out = cli("train", "--config", tmp_path / "warn.yaml", "--run-dir", part)
    assert code == 0 and "resumed from" in out, out
    again = [e for e in read_jsonl(part / "events.jsonl") if e["type"] == "spike"]
    assert [(e["step"], e["sample_ids"], e["z"]) for e in again] == [(61, [SPIKY], spikes[0]["z"])]
    assert all(torch.equal(a[k], v) for k, v in weights(json.loads((part / "summary.json").read_text())).items())

    from trainguard.report import read_run, sparkline, summarize  # what `trainguard report` shows (no plot: no matplotlib import)

    report = read_run(run)
    assert [(k["step"], k["action"], k["sample_ids"]) for k in summarize(report)["spikes"]] == [(61, "warn", [SPIKY])]
    assert "!" in sparkline(report)[1]


def test_skip_redoes_the_step_without_the_culprit_and_the_old_spelling_still_works(cli, tmp_path):
    """skip, through the deprecated spelling `spike_factor` alone (it meant skip; it warns): the
    step that holds the spiky sample is redone without it (a `skip` event naming it, no step lost)."""
    code, out, summary, events, _ = train(cli, tmp_path, "skip", **spiky(spike_factor=3.0))
    assert code == 0, out
    assert "guard.spike_factor: 3.0 without guard.on_spike is deprecated" in out
    skips = [e for e in events if e["type"] == "skip"]
    assert [(e["step"], e["sample_ids"], e["action"]) for e in skips] == [(61, [SPIKY], "dropped")], skips
    assert skips[0]["reason"].startswith("loss spike:") and skips[0]["loss_without"] < skips[0]["median"] * 3
    assert summary["status"] == "completed" and summary["skipped_steps"] == 0 and summary["skipped_samples"] == 1
    assert summary["guard"]["skip_reasons"] == {"loss spike": 1}


def test_rollback_after_repeated_spikes_of_a_bad_update(cli, tmp_path):
    """A bad update at step 65 (no few samples stand out: each step is skipped whole); after
    rollback_after (3) spikes in a row the run rolls back to the checkpoint of step 60 at half the
    LR and completes with a healthy loss."""
    code, out, summary, events, run = train(
        cli, tmp_path, "rollback", data={"val": None}, train={"max_steps": 80, "batch_size": 16, "log_every": 10},
        guard={"on_spike": "rollback"}, hooks=[{"_target_": "tests.spike_toys:DamageAt", "at": 65}])
    assert code == 0, out
    skips = [e for e in events if e["type"] == "skip"]
    assert [(e["step"], e["action"], len(e["sample_ids"])) for e in skips] == [(66, "skip", 16), (67, "skip", 16), (68, "skip", 16)]
    assert all("no few samples stand out" in e["reason"] for e in skips)
    rollbacks = [e for e in events if e["type"] == "rollback"]
    assert [(e["from_step"], e["to_step"], e["lr_scale"]) for e in rollbacks] == [(68, 60, 0.5)]
    assert summary["status"] == "completed" and summary["steps"] == 80 and summary["final_loss"] < 1.0
    assert summary["guard"]["spikes"] == 3 and summary["guard"]["rollbacks"] == 1


def test_a_healthy_noisy_small_batch_run_raises_no_spike(cli, tmp_path):
    """Batches of 2 of overlapping blobs, with dropout: most batches' loss is near 0 and a few near 3
    (the log-loss spreads over decades). A rule on the loss itself (median and MAD) fires here on
    every second step; the default rule must not fire at all."""
    code, out, summary, events, _ = train(
        cli, tmp_path, "noisy", model={"_target_": "tests.toys:DropoutMLP"},
        data={"train": {"_target_": "tests.toys:Blobs", "n": 512, "noise": 1.5}, "val": None},
        train={"max_steps": 250, "batch_size": 2, "log_every": 50}, checkpoint={"every_steps": 0})
    assert code == 0, out
    assert summary["guard"]["spikes"] == 0, [e for e in events if e["type"] == "spike"][:3]
