"""The preflight's model checks on models nobody here wrote the way we would (issue 21): the
embedding check judges only real lookups, and batch-coupled losses are seen. Through the real CLI;
the models and data are plain torch (tests/zoo.py), so these run without transformers."""

import json

import yaml

from tests.conftest import read_jsonl, toy_config

TOKENS = {"train": {"_target_": "tests.zoo:Tokens", "n": 32, "pad": 4}, "val": None}
PAIRS = dict(model={"_target_": "tests.zoo:Contrastive"}, data={"train": {"_target_": "tests.zoo:Pairs"}, "val": None})


def diagnose(cli, tmp_path, name, **sections) -> dict:
    """`trainguard diagnose --json` on a toy config with ``sections``: {check name: check}."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(toy_config(**sections), sort_keys=False))
    code, out = cli("diagnose", "--json", "--config", path, "--run-dir", tmp_path / name)
    report = json.loads(out[out.index("{"):])
    checks = {c["name"]: c for c in report["checks"]}
    assert code == (1 if any(c["status"] == "fail" for c in checks.values()) else 0), out
    return checks


def train(cli, write_config, tmp_path, name, *args, **sections):
    """`trainguard train`: (exit code, output, events)."""
    code, out = cli("train", "--config", write_config(name, **sections), "--run-dir", tmp_path / name, *args)
    events = tmp_path / name / "events.jsonl"
    return code, out, read_jsonl(events) if events.exists() else []


def test_a_positional_embedding_subclass_is_judged_by_its_lookup_not_its_argument(cli, tmp_path):
    # OPT-style: the nn.Embedding subclass's forward takes the (float) attention mask and looks up
    # the positions it derives; the old check took the mask for float indices and refused the model
    checks = diagnose(cli, tmp_path, "opt_style", model={"_target_": "tests.zoo:PositionalLM"}, data=TOKENS)
    assert checks["model.forward"]["status"] == "pass", checks
    idx = checks["data.indices"]
    assert idx["status"] == "pass" and "2 embedding lookups" in idx["message"], idx


def test_positions_past_the_table_fail_with_the_model_not_the_tokenizer_as_the_cause(cli, tmp_path):
    checks = diagnose(cli, tmp_path, "long", model={"_target_": "tests.zoo:PositionalLM", "max_positions": 8}, data=TOKENS)
    idx = checks["data.indices"]
    assert idx["status"] == "fail" and "LearnedPositions `positions` (10 rows)" in idx["message"], idx
    assert "field" not in idx["message"] and "positions past its maximum length" in idx["hint"], idx


def test_float_token_ids_fail_naming_the_dataset_field(cli, tmp_path, write_config):
    sections = dict(model={"_target_": "tests.toys:BagOfTokens", "vocab": 64},
                    data={"train": {"_target_": "tests.zoo:FloatIds", "n": 32}, "val": None,
                          "fields": {"tokens": "input_ids", "labels": "labels"}})
    code, out, _ = train(cli, write_config, tmp_path, "floats", **sections)
    assert code == 1, out
    assert "error: preflight: Embedding `embed` (64 rows) receives float32 indices from the dataset field `tokens` " \
           "(forward() argument `input_ids`)" in out, out
    assert "hint: cast `tokens` to int" in out, out


def test_an_id_past_the_vocabulary_fails_naming_the_field(cli, tmp_path):
    checks = diagnose(cli, tmp_path, "vocab", model={"_target_": "tests.toys:BagOfTokens", "vocab": 20},
                      data={"train": {"_target_": "tests.toys:TokenRows"}, "val": None})
    idx = checks["data.indices"]
    assert idx["status"] == "fail" and "outside [0, 20)" in idx["message"] and "field `input_ids`" in idx["message"], idx
    assert "vocab size" in idx["hint"], idx


def test_a_contrastive_loss_is_batch_coupled_in_diagnose_and_train_says_so_with_two_micro_batches(cli, tmp_path, write_config):
    c = diagnose(cli, tmp_path, "clip_style", **PAIRS)["model.batch_coupling"]
    assert c["status"] == "warn" and "couples the samples" in c["message"] and "train.micro_batch_size" in c["hint"], c

    code, out, events = train(cli, write_config, tmp_path, "two", **PAIRS,
                              train={"max_steps": 3, "batch_size": 16, "micro_batch_size": 8})
    assert code == 0, out
    coupled = [e for e in events if e["type"] == "batch_coupled"]
    assert len(coupled) == 1 and coupled[0]["kind"] == "coupled" and coupled[0]["grad_accum"] == 2, events
    assert "7 others of its micro-batch" in coupled[0]["reason"]
    assert "warning:" in out and "2 micro-batches of 8" in out, out

    code, out, events = train(cli, write_config, tmp_path, "one", **PAIRS,  # one micro-batch per step: nothing to say
                              train={"max_steps": 3, "batch_size": 16, "micro_batch_size": 16})
    assert code == 0 and not [e for e in events if e["type"] in ("batch_coupled", "preflight")], events
    assert "couples" not in out, out


def test_an_oom_split_of_a_batch_coupled_model_is_said(cli, tmp_path, write_config):
    # one micro-batch per step at the start (nothing to say, nothing checked), until the budget splits it
    wide = dict(PAIRS, model={"_target_": "tests.zoo:Contrastive", "out": 512})  # ~385 KB at 16, ~291 KB at 8
    code, out, events = train(cli, write_config, tmp_path, "split", "--memory-budget", "340KB", **wide,
                              train={"max_steps": 2, "batch_size": 16, "micro_batch_size": 16})
    assert code == 0, out
    kinds = [e["type"] for e in events if e["type"] in ("oom", "batch_coupled")]
    assert kinds == ["oom", "batch_coupled"], events
    coupled = next(e for e in events if e["type"] == "batch_coupled")
    assert coupled["kind"] == "coupled" and coupled["micro_batch_size"] == 8 and coupled["grad_accum"] == 2, coupled
    assert "2 micro-batches of 8" in out and "hint:" in out, out


def test_a_sum_over_samples_is_reported_as_such(cli, tmp_path):
    c = diagnose(cli, tmp_path, "sum", model={"_target_": "tests.zoo:SumLoss"}, data=PAIRS["data"])["model.batch_coupling"]
    assert c["status"] == "warn" and "sum over samples" in c["message"], c


def test_a_mean_over_samples_passes_and_one_sample_is_a_skip(cli, tmp_path):
    checks = diagnose(cli, tmp_path, "mlp")
    c = checks["model.batch_coupling"]
    assert c["status"] == "pass" and "mean over samples" in c["message"], c
    assert "data.indices" not in checks  # no embedding: nothing to say
    c = diagnose(cli, tmp_path, "single", train={"batch_size": 1, "micro_batch_size": 1})["model.batch_coupling"]
    assert c["status"] == "skip" and "1 sample" in c["message"], c


def test_a_token_mean_over_padded_labels_is_not_batch_coupled(cli, tmp_path, write_config):
    # the halves have different numbers of label tokens (padding -100 in the first half only): the
    # batch's loss is their token-weighted mean, not the sample-weighted one
    sections = dict(model={"_target_": "tests.zoo:PositionalLM"}, data={"train": {"_target_": "tests.zoo:UnevenTokens"}, "val": None})
    c = diagnose(cli, tmp_path, "tokens", **sections)["model.batch_coupling"]
    assert c["status"] == "pass" and "mean over label tokens" in c["message"] and "weighted by their" in c["message"], c
    code, out, events = train(cli, write_config, tmp_path, "tokens_run", **sections,
                              train={"max_steps": 2, "batch_size": 16, "micro_batch_size": 8})
    assert code == 0 and not [e for e in events if e["type"] == "batch_coupled"], events

