"""The user's collator (data.collate_fn), mapping batches (BatchEncoding, UserDict) and tuple outputs, through real runs."""

import json
import signal

from tests.conftest import read_jsonl, toy_config
from tests.test_resume import assert_bitwise_equal, final_weights, run, start, wait_for

PADDING = {"_target_": "transformers.DataCollatorWithPadding",
           "tokenizer": {"_target_": "tests.collate_toys:tiny_tokenizer"}}


def ragged(workers: int, **data) -> dict:
    """A tiny classifier on ragged token lists (beside a raw `text` string), padded per batch by
    DataCollatorWithPadding, trained by the user's own optimizer (torch's RMSprop) and schedule
    (transformers' cosine with warmup), all named by `_target_`."""
    cfg = toy_config(
        model={"_target_": "tests.collate_toys:BagClassifier"},
        data={"train": {"_target_": "tests.collate_toys:RaggedTokens", "n": 96},
              "val": {"_target_": "tests.collate_toys:RaggedTokens", "n": 16},
              "collate_fn": PADDING, "num_workers": workers, **data},
        optim={"_target_": "torch.optim.RMSprop", "lr": 0.1, "alpha": 0.9, "weight_decay": 0.01},
        train={"max_steps": 24, "batch_size": 8, "micro_batch_size": 4, "log_every": 1, "eval_every": 12},
        checkpoint={"every_steps": 4, "keep_last": 2},
        log={"progress": False},
    )
    cfg["schedule"] = {"_target_": "transformers.get_cosine_schedule_with_warmup", "num_warmup_steps": 4}
    return cfg


def dump(tmp_path, name: str, cfg: dict):
    import yaml

    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]


def falls(curve: list[tuple[int, float]]) -> bool:
    """The mean loss of the last 5 steps is below that of the first 5."""
    first, last = [v for _, v in curve[:5]], [v for _, v in curve[-5:]]
    return sum(last) < sum(first)


def test_padding_collator_same_with_0_and_2_workers_and_resumes_bitwise(tmp_path, cli):
    ref_dir = tmp_path / "ref"
    code, out = cli("train", "--config", dump(tmp_path, "w0", ragged(0)), "--run-dir", ref_dir)
    assert code == 0, out
    ref = losses(ref_dir)
    assert len(ref) == 24 and falls(ref), ref
    assert "left out: text" in out  # before the collator, as HF's Trainer removes unused columns

    # 2 workers, slowed down, kill -9 after the checkpoint of step 12, then the same command again
    cfg = ragged(2)
    cfg["hooks"] = [{"_target_": "tests.toys:Sleep", "seconds": 0.1}]
    config, run_dir = dump(tmp_path, "w2", cfg), tmp_path / "run"
    proc = start(config, run_dir)
    wait_for(run_dir / "checkpoints" / "step_0000012", proc, timeout=240)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    code, out = run(config, run_dir)
    assert code == 0, out
    assert "resumed from" in out
    assert losses(run_dir) == ref, "0 and 2 workers (killed and resumed) give different losses"
    assert_bitwise_equal(final_weights(run_dir), final_weights(ref_dir))


def test_a_sample_the_collator_raises_on_is_skipped_and_named(tmp_path, cli):
    cfg = ragged(2, train={"_target_": "tests.collate_toys:RaggedTokens", "n": 96, "bad": [13, 50]})  # found in the workers
    cfg["train"].update(max_steps=12, eval_every=0)
    code, out = cli("train", "--config", dump(tmp_path, "bad", cfg), "--run-dir", tmp_path / "run")
    assert code == 0, out
    skips = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["type"] == "skip"]
    assert sorted(i for e in skips for i in e["sample_ids"]) == [13, 50], skips
    assert all("data.collate_fn `transformers.DataCollatorWithPadding` raised" in e["reason"] for e in skips), skips
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"

    # a collator that fails without any one sample: a clear error naming it, not a skip of everything
    cfg["data"]["collate_fn"] = {"_target_": "tests.collate_toys:Broken"}
    code, out = cli("train", "--config", dump(tmp_path, "broken", cfg), "--run-dir", tmp_path / "run2")
    assert code == 1, out
    assert "data.collate_fn `tests.collate_toys:Broken` raised RuntimeError" in out and "hint:" in out
    assert "Traceback" not in out


def test_ragged_lists_without_collate_fn_name_it_in_the_hint(tmp_path, cli):
    cfg = ragged(0)
    del cfg["data"]["collate_fn"]
    code, out = cli("train", "--config", dump(tmp_path, "ragged", cfg), "--run-dir", tmp_path / "run")
    assert code == 1, out
    assert "field `input_ids` cannot be stacked" in out
    hint = out[out.index("hint:"):]
    assert "data.collate_fn" in hint and "DataCollatorWithPadding" in hint
    assert "Traceback" not in out


def train_30(tmp_path, cli, model: str, dataset: str) -> tuple[str, list]:
    """30 steps of a collate_toys model on a collate_toys dataset: the output and the loss curve."""
    cfg = toy_config(model={"_target_": f"tests.collate_toys:{model}"},
                     data={"train": {"_target_": f"tests.collate_toys:{dataset}"}, "val": None},
                     train={"max_steps": 30, "batch_size": 8, "log_every": 1}, optim={"lr": 0.05},
                     log={"progress": False})
    code, out = cli("train", "--config", dump(tmp_path, model, cfg), "--run-dir", tmp_path / model)
    assert code == 0, out
    return out, losses(tmp_path / model)


def test_batch_encoding_items_and_userdict_output_train(tmp_path, cli):
    _, curve = train_30(tmp_path, cli, "UserDictOutput", "EncodedItems")
    assert len(curve) == 30 and falls(curve), curve


def test_logits_loss_tuple_trains_and_says_so_once(tmp_path, cli):
    out, curve = train_30(tmp_path, cli, "TupleGPT", "NextToken")
    assert out.count("element 1, is the loss") == 1, out
    assert len(curve) == 30 and falls(curve), curve
    code, out = cli("diagnose", "--config", tmp_path / "TupleGPT.yaml", "--json")  # the config train_30 wrote
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["model.output"]["status"] == "pass" and "element 1, is the loss" in checks["model.output"]["message"]
    assert not [c for c in checks.values() if c["status"] == "fail"], out


def test_dotted_targets_reach_class_methods():
    """`transformers.AutoTokenizer.from_pretrained` (how configs name a tokenizer) is the classmethod."""
    from transformers import AutoTokenizer

    from trainguard.config.instantiate import locate

    assert locate("transformers.AutoTokenizer.from_pretrained") == AutoTokenizer.from_pretrained


def test_an_unpicklable_collator_is_refused_where_workers_are_spawned(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    cfg = ragged(2, collate_fn={"_target_": "tests.collate_toys:lambda_collator"})
    code = ("import multiprocessing, sys; multiprocessing.set_start_method('spawn')\n"
            "from trainguard.cli import app\n"
            f"app(['train', '--config', {str(dump(tmp_path, 'spawn', cfg))!r}, '--run-dir', {str(tmp_path / 'run')!r}])")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "data.collate_fn `tests.collate_toys:lambda_collator` cannot be sent to the 2 loader workers" in p.stderr
    assert "not picklable" in p.stderr and "data.num_workers: 0" in p.stderr and "Traceback" not in p.stderr


def test_a_collator_that_draws_at_random_gives_the_same_batches_with_0_and_2_workers(tmp_path, cli):
    curves = []
    for workers in (0, 2):
        cfg = ragged(workers, collate_fn={"_target_": "tests.collate_toys:MaskingCollator"})
        cfg["train"].update(max_steps=8, eval_every=0)
        code, out = cli("train", "--config", dump(tmp_path, f"mask{workers}", cfg), "--run-dir", tmp_path / f"m{workers}")
        assert code == 0, out
        curves.append(losses(tmp_path / f"m{workers}"))
    assert curves[0] == curves[1]


def test_a_collator_that_reads_raw_fields_gets_them_with_filter_fields_false(tmp_path, cli):
    cfg = ragged(0, collate_fn={"_target_": "tests.collate_toys:TokenizingCollator"}, filter_fields=False)
    cfg["train"].update(max_steps=4, eval_every=0)
    code, out = cli("train", "--config", dump(tmp_path, "raw", cfg), "--run-dir", tmp_path / "raw")
    assert code == 0, out
    cfg["data"]["filter_fields"] = True  # `text` is not forward()'s: filtered out before the collator, which then fails
    code, out = cli("train", "--config", dump(tmp_path, "filtered", cfg), "--run-dir", tmp_path / "filtered")
    assert code == 1 and "data.collate_fn `tests.collate_toys:TokenizingCollator` raised KeyError" in out, out
