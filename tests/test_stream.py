"""Streams (IterableDataset) through the real CLI: 0 and N loader workers, kill -9 and exact resume
from the stream's state, replay without one, a `datasets` stream, and two ranks each on its own part."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO, read_jsonl, toy_config
from tests.test_resume import assert_bitwise_equal, final_weights, start, wait_for


def write(tmp_path, name: str, train_ds: dict, workers: int, hooks=(), **sections):
    sections = {"train": {"max_steps": 30, "batch_size": 16, "log_every": 5}, **sections}
    cfg = toy_config(data={"train": train_ds, "val": None, "num_workers": workers},
                     checkpoint={"every_steps": 5, "keep_last": 5}, log={"progress": False}, **sections)
    cfg["hooks"] = list(hooks)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def resume_event(run_dir) -> dict:
    return next(e for e in read_jsonl(run_dir / "events.jsonl") if e["type"] == "resume")


def starts(log) -> list[tuple[int, int]]:
    """(worker, position) of each iteration the stream began (worker -1: the training process)."""
    return [(int(w), int(p)) for _, w, p in (line.split() for line in log.read_text().splitlines())]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stateful_stream_killed_with_kill_9_resumes_bitwise_from_its_state(cli, tmp_path, workers):
    """The stream (None items, raising items, an epoch's end at step 25) is read by `workers`
    loader workers; after kill -9 the rerun continues each worker's part from its saved state
    (nothing replayed) and ends with the weights of an uninterrupted run."""
    log = tmp_path / "starts.txt"
    ds = {"_target_": "tests.stream_toys:BlobCursor", "n": 400, "log": str(log)}
    full = write(tmp_path, "full", ds, workers)
    code, out = cli("train", "--config", full, "--run-dir", tmp_path / "full")
    assert code == 0, out
    skips = [e for e in read_jsonl(tmp_path / "full" / "events.jsonl") if e["type"] == "skip"]
    reasons = " ".join(e["reason"] for e in skips)
    assert "returned None" in reasons and "the stream raised ValueError: item 60 is corrupt" in reasons
    ids = [i for e in skips for i in e["sample_ids"]]
    assert ids.count(49) == ids.count(60) == 2  # in both passes (480 items of 400), under their stream positions

    slow = write(tmp_path, "slow", ds, workers, hooks=[{"_target_": "tests.toys:Sleep", "seconds": 0.1}])
    run_dir = tmp_path / "run"
    proc = start(slow, run_dir)
    wait_for(run_dir / "checkpoints" / "step_0000015", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    log.write_text("")
    code, out = cli("train", "--config", full, "--run-dir", run_dir)
    assert code == 0, out
    event = resume_event(run_dir)
    assert "nothing replayed" in event["reason"] and event["stream_replayed"] == 0, event
    assert "nothing replayed" in out
    # each part's reader began where its saved state was, not from 0 (as a replay does)
    if workers:
        first: dict = {}
        for w, p in starts(log):
            if w >= 0:  # a worker's (the training process's reads are the preflight's)
                first.setdefault(w, p)
        assert set(first) == {0, 1} and all(p > 0 for p in first.values()), starts(log)
    else:
        assert any(p > 0 for _, p in starts(log)), starts(log)
    assert_bitwise_equal(final_weights(run_dir), final_weights(tmp_path / "full"))


@pytest.mark.parametrize("target, workers, at", [("tests.stream_toys:PlainCursor", 2, 15),
                                                  ("tests.stream_toys:hf_stream", 2, 10)])
def test_a_stream_resumes_bitwise_by_replay_without_state_and_from_a_datasets_streams_state(cli, tmp_path, target, workers, at):
    """A stream without state_dict() resumes by replaying and skipping what it consumed (said in the
    resume event, with how many items); a `datasets` stream (to_iterable_dataset, 4 shards over 2
    workers) resumes from its own state. Both end bitwise equal to an uninterrupted run."""
    cfg = write(tmp_path, "full", {"_target_": target}, workers)
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "full")
    assert code == 0, out
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / f"step_{at:07d}", part / "checkpoints" / f"step_{at:07d}")
    code, out = cli("train", "--config", cfg, "--run-dir", part)
    assert code == 0, out
    event = resume_event(part)
    if target.endswith("PlainCursor"):
        assert "replaying and skipping the 240 items" in event["reason"] and event["stream_replayed"] == 240, event
    else:
        assert "nothing replayed" in event["reason"] and event["stream_replayed"] == 0, event
    assert_bitwise_equal(final_weights(part), final_weights(tmp_path / "full"))


def test_a_stream_changing_its_workers_on_resume_is_refused_with_the_fix(cli, tmp_path):
    cfg = write(tmp_path, "two", {"_target_": "tests.stream_toys:BlobCursor"}, 2, train={"max_steps": 5, "batch_size": 16})
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert code == 0, out
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run", "--set", "train.max_steps=10",
                    "--set", "data.num_workers=0")
    assert code == 2 and "data.num_workers" in out and "--set data.num_workers=2" in out, out


def test_resumed_at_any_batch_near_the_end_of_uneven_worker_parts_the_batches_are_the_same():
    """A `datasets` stream of 4 shards over 3 workers: worker 0 reads 2 shards, so workers 1 and 2
    end first and the turns go on without them. Resumed (a new stream from the saved position) at
    each batch around those ends, the rest of the batches are those of one uninterrupted stream."""
    from tests.stream_toys import hf_stream
    from trainguard.engine.data import DataStream

    def batches(total: int, resume_at: int | None = None) -> list:
        ds, out = DataStream(hf_stream(n=70, shards=4), 8, seed=0, shuffle=False, num_workers=3, pin_memory=False), []
        for k in range(total):
            if k == resume_at:
                state = ds.stream_state(ds.epoch, ds.position)
                ds = DataStream(hf_stream(n=70, shards=4), 8, seed=0, shuffle=False, num_workers=3, pin_memory=False)
                ds.load_stream_state(state)
            b = next(ds)
            out.append((ds.epoch, b.ids))
        return out

    ref = batches(13)
    assert [len(ids) for _, ids in ref[:11]] == [8, 8, 8, 8, 8, 8, 8, 2, 1, 8, 3] and ref[11][0] == 1
    for k in (7, 8, 9, 10):
        assert batches(13, k) == ref, k


def test_a_stream_that_splits_itself_over_workers_is_only_numbered():
    """`data.stream_split: dataset`: each worker's own part whole (every item once a pass), under ids
    unique over the workers (`k * 2 + worker`)."""
    from tests.stream_toys import WorkerSplit
    from trainguard.engine.data import DataStream

    ds = DataStream(WorkerSplit(n=64), 8, seed=0, shuffle=False, num_workers=2, pin_memory=False, stream_split="dataset")
    batches = [next(ds) for _ in range(8)]
    items = sorted(x for b in batches for x in b.data["idx"].tolist())
    ids = sorted(i for b in batches for i in b.ids)
    assert items == list(range(64)) and ids == list(range(64)) and ds.epoch == 0


def test_a_datasets_stream_over_two_ranks_of_two_workers_gives_each_item_to_one_part_under_one_id():
    """Each rank's stream is `split_dataset_by_node` (2 of the 4 shards), split again over its 2
    workers by `datasets`: one pass of both ranks covers the stream once, under distinct ids."""
    from tests.stream_toys import hf_stream
    from trainguard.engine.data import DataStream

    items, ids = [], []
    for rank in (0, 1):
        ds = DataStream(hf_stream(n=64, shards=4), 16, seed=0, shuffle=False, num_workers=2, pin_memory=False,
                        rank=rank, world=2)
        while ds.epoch == 0:
            b = next(ds)
            if ds.epoch == 0:
                items += b.data["idx"].tolist()
                ids += b.ids
    assert sorted(items) == list(range(64)) and len(set(ids)) == 64


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_two_ranks_each_train_on_their_own_part_and_take_the_same_steps_past_uneven_ends(tmp_path):
    """33 items over 2 ranks: rank 0's part (17 items) ends after 5 batches of 4, rank 1's (16) after
    4, so the ranks start their next passes at different steps; both take all 12 steps (none waits
    in a collective), each on its own part only, and the checkpoint keeps each rank's position."""
    seen = tmp_path / "seen"
    seen.mkdir()
    cfg = toy_config(model={"_target_": "tests.stream_toys:RecordingMLP", "out": str(seen)},
                     data={"train": {"_target_": "tests.stream_toys:BlobCursor", "n": 33}, "val": None, "num_workers": 0},
                     train={"max_steps": 12, "batch_size": 8, "log_every": 4}, checkpoint={"every_steps": 6})
    path = tmp_path / "ranks.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "TRAINGUARD_DIST_TIMEOUT": "60"}  # a hang inside a collective fails within a minute
    proc = subprocess.run([sys.executable, "-m", "trainguard", "train", "--config", str(path), "--run-dir", str(tmp_path / "run"),
                           "--nproc-per-node", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = [int(v) for v in (seen / "rank0.txt").read_text().split()]
    rank1 = [int(v) for v in (seen / "rank1.txt").read_text().split()]
    assert set(rank0) == set(range(0, 33, 2)) and set(rank1) == set(range(1, 33, 2))  # part r: items r, r + 2, ...
    summary = yaml.safe_load((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    ts = torch.load(tmp_path / "run" / "checkpoints" / "step_0000012" / "trainer.pt", weights_only=True)
    (a, b) = ts["streams"]
    # 12 batches: rank 0 2 in its third pass (after 2 x 5), rank 1 at the end of its third (3 x 4)
    assert (a["epoch"], a["position"]) == (2, 8) and (b["epoch"], b["position"]) == (2, 16), (a, b)
