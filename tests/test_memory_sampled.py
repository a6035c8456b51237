"""--memory-budget's sampled counting (memory/sampled.py), through the real CLI: a step's operators are
counted only while its peak is not known, and a run gives the same peaks, out-of-memory errors,
splits, losses and weights as one that counts every step (TRAINGUARD_MEMORY_TRACK=every)."""

import json
import os

import pytest
import torch
import yaml

from tests.conftest import read_jsonl, toy_config

BASE = dict(data={"train": {"_target_": "tests.toys:Blobs", "n": 1024}, "val": None, "num_workers": 0, "shuffle": False},
            train={"max_steps": 40, "batch_size": 16, "log_every": 1}, checkpoint={"every_steps": 0}, log={"progress": False})

CASES = {
    # steps of one shape and one path: counted at steps 1 and 2, then only at each refresh
    "healthy": (dict(train={"max_steps": 70}), "32MB"),
    # a marked sample at step 30 makes the model allocate 64 MiB more: the uncounted step reads a new value
    # (bool of its marker test), is redone counted, runs out of the budget there and is split
    "heavy": (dict(model={"_target_": "tests.toys:Hog", "rows": 4, "mb": 64},
                   data={"train": {"_target_": "tests.toys:MarkedBlobs", "n": 1024, "heavy_ids": [29 * 16 + 3]}}), "32MB"),
    # a forward that keeps a tensor each step: every step is counted, the peak grows with it
    "leak": (dict(model={"_target_": "tests.toys:Keeps", "hidden": 2048}), "32MB"),
    # a boolean mask (a shape made from values): every step counted from the first, said in a note
    "routed": (dict(model={"_target_": "tests.toys:Routed"}), "32MB"),
    # a forward that branches on a value, with BatchNorm (a new path's redo puts its statistics back), and a
    # hook that reads the last loss at STEP_START (not part of any step's path)
    "branch": (dict(model={"_target_": "tests.toys:NormBranch"}, train={"micro_batch_size": 16},
                    data={"train": {"_target_": "tests.toys:MarkedBlobs", "n": 1024, "heavy_ids": [19 * 16 + 5]}}, hooks=[{"_target_": "tests.toys:ReadsAtStart"}]), "32MB"),
}


REFRESH = 30  # a known peak checked again after this many uncounted steps (128 in a run): within these runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case trained twice, sampled and counting every step; the same run dirs serve every assertion."""
    from typer.testing import CliRunner

    from trainguard.cli import app
    from trainguard.memory import sampled

    mp = pytest.MonkeyPatch()
    mp.setattr(sampled, "REFRESH", REFRESH)

    root = tmp_path_factory.mktemp("sampled")
    out = {}
    for name, (sections, budget) in CASES.items():
        for mode in ("sampled", "every"):
            run = root / f"{name}-{mode}"
            counted = root / f"{name}-{mode}.counted.json"
            cfg = toy_config(**{**BASE, **{k: ({**BASE.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in sections.items()}})
            cfg["hooks"] = [*cfg.get("hooks", []), {"_target_": "tests.toys:Counted", "path": str(counted)}]
            path = root / f"{name}-{mode}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            env = {"TRAINGUARD_MEMORY_TRACK": mode, "TRAINGUARD_CACHE_DIR": str(root / f"cache-{name}-{mode}")}
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                res = CliRunner().invoke(app, ["train", "--config", str(path), "--run-dir", str(run), "--memory-budget", budget])
            finally:
                for k, v in old.items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            assert res.exit_code == 0, res.output
            out[name, mode] = dict(
                metrics=[{k: r.get(k) for k in ("step", "loss", "peak_memory_bytes", "micro_batch_size")}
                         for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"],
                events=[json.loads(json.dumps({k: v for k, v in e.items() if k != "time"}).replace(str(run), "RUN"))
                        for e in read_jsonl(run / "events.jsonl")],
                counted=json.loads(counted.read_text()),
                weights=torch.load(run / "checkpoints" / f"step_{cfg['train']['max_steps']:07d}" / "model.pt", weights_only=True),
                summary=json.loads((run / "summary.json").read_text()))
    mp.undo()
    return out


def _same_run(a, b):
    assert a["metrics"] == b["metrics"]  # loss, peak and micro-batch of every step, to the byte
    assert [e for e in a["events"] if e["type"] != "note"] == [e for e in b["events"] if e["type"] != "note"]
    assert a["weights"].keys() == b["weights"].keys() and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["summary"]["peak_memory_bytes"] == b["summary"]["peak_memory_bytes"]


@pytest.mark.parametrize("name", list(CASES))
def test_a_sampled_run_is_the_run_that_counts_every_step(runs, name):
    _same_run(runs[name, "sampled"], runs[name, "every"])
    assert all(runs[name, "every"]["counted"]) and len(runs[name, "every"]["counted"]) >= 40


def test_steps_of_a_known_shape_and_path_are_not_counted(runs):
    counted = runs["healthy", "sampled"]["counted"]
    # step 1, and step 2 since step 1 kept more than it found (its loss, for the next; the optimizer's state
    # is made before step 1), then each refresh
    assert [i + 1 for i, c in enumerate(counted) if c] == [1, 2, REFRESH + 3, 2 * REFRESH + 4] and len(counted) == 70, counted
    assert not [e for e in runs["healthy", "sampled"]["events"] if e["type"] == "note" and "memory budget" in e["reason"]]


def test_a_new_path_is_redone_counted_and_its_out_of_memory_is_the_same(runs):
    sampled = runs["heavy", "sampled"]
    ooms = [e for e in sampled["events"] if e["type"] == "oom"]
    assert ooms and {e["step"] for e in ooms} == {30}, ooms  # where counting every step finds it too (_same_run)
    counted = sampled["counted"]
    assert sum(counted[:29]) == 2 and counted[29] and sum(counted) < 10, counted  # step 30 counted, the rest mostly not


def test_a_leak_and_a_shape_made_from_values_keep_every_step_counted(runs):
    assert all(runs["leak", "sampled"]["counted"])
    peaks = [r["peak_memory_bytes"] for r in runs["leak", "sampled"]["metrics"]]
    assert peaks[-1] > peaks[5] > peaks[1]  # the leak shows in the peaks, as when counting every step
    assert all(runs["routed", "sampled"]["counted"])
    notes = [e for e in runs["routed", "sampled"]["events"] if e["type"] == "note" and "memory budget" in e["reason"]]
    assert len(notes) == 1 and "makes a shape from tensor values" in notes[0]["reason"] and "aten.index" in notes[0]["reason"], notes


def test_a_branch_on_values_is_sampled_by_path_and_its_redo_leaves_the_batchnorm_statistics_alone(runs):
    counted = runs["branch", "sampled"]["counted"]  # the marked sample's step (20) takes a new path: redone counted
    assert [i + 1 for i, c in enumerate(counted) if c] == [1, 2, 20], counted
    assert any(k.endswith("running_mean") for k in runs["branch", "sampled"]["weights"])  # compared bitwise above
