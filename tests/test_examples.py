"""Every example in examples/ runs through the CLI, at tiny sizes on a CPU (their configs are for
a GTX 1650 and an H100; `--set` shrinks them), and does what its README says."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, read_jsonl

EXAMPLES = REPO / "examples"
TINY = {  # example -> the --set overrides that make it a few seconds on a CPU
    "ctc_swipe": ["train.max_steps=40", "data.train.n=480", "data.val.n=64", "model.hidden=32", "train.eval_every=20",
                  "data.train.too_short=0.05"],
    "image_size": ["train.max_steps=12", "data.train.n=192", "data.val.n=32", "data.train.size=64", "data.val.size=64",
                   "model.input_size=64", "model.width=8", "train.eval_every=12"],
    "captioning": ["train.max_steps=30", "data.train.n=400", "data.val.n=64", "model.width=16", "model.hidden=64",
                   "train.eval_every=15"],
}


def test_every_example_has_its_readme_and_both_configs():
    from trainguard.config.load import resolve_config

    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders == sorted(TINY)
    for name in folders:
        readme = (EXAMPLES / name / "README.md").read_text()
        assert readme.count("\n- **") == 3 and f"examples/{name}/config_gtx1650.yaml" in readme
        for card, profile in (("gtx1650", "gtx1650"), ("h100", "h100-80gb")):
            cfg, prof, _ = resolve_config(EXAMPLES / name / f"config_{card}.yaml")
            assert prof.name == profile


def _train(cli, tmp_path, name, *extra):
    args = [a for kv in TINY[name] for a in ("--set", kv)] + ["--set", "data.num_workers=0"]
    code, out = cli("train", "--config", EXAMPLES / name / "config_gtx1650.yaml", "--run-dir", tmp_path / name, *args, *extra)
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    return code, out, summary, read_jsonl(tmp_path / name / "events.jsonl")


def test_ctc_swipe_drops_the_truncated_traces_and_keeps_every_step(cli, tmp_path):
    from examples.ctc_swipe.swipes import SwipeTraces

    code, out, summary, events = _train(cli, tmp_path, "ctc_swipe")
    assert code == 0, out
    data = SwipeTraces(n=480, too_short=0.05)
    truncated = {i for i, (word, frames, _) in enumerate(data.items) if frames < len(word)}
    dropped = {i for e in events if e["type"] == "skip" for i in e["sample_ids"]}
    assert dropped and dropped <= truncated  # only traces CTC cannot align
    assert summary["skipped_steps"] == 0 and summary["status"] == "completed"
    assert all("the step went on without these samples" in e["reason"] for e in events if e["type"] == "skip")
    assert "left out: word_id" in out


def test_image_size_mismatch_is_stopped_before_step_1_naming_the_module(cli, tmp_path):
    config = EXAMPLES / "image_size" / "config_gtx1650.yaml"
    wrong = ["--set", "model.input_size=64", "--set", "model.width=8", "--set", "data.train.size=128"]
    code, out = cli("diagnose", "--config", config, *wrong)
    assert code == 1 and "`head` (Linear): expected input (*, 32), got (2, 128)" in " ".join(out.split())
    code, out = cli("train", "--config", config, "--run-dir", tmp_path / "wrong", *wrong, "--set", "train.max_steps=5")
    assert code == 1 and "head" in out and "Traceback" not in out
    assert json.loads((tmp_path / "wrong" / "summary.json").read_text())["steps"] == 0
    code, out, summary, _ = _train(cli, tmp_path, "image_size")
    assert code == 0 and summary["steps"] == 12 and summary["eval"]["accuracy"] >= 0


def test_captioning_tokenizer_is_built_from_the_captions_and_the_model_trains(cli, tmp_path):
    from examples.captioning.captions import ShapeCaptions, WordTokenizer

    data = ShapeCaptions(n=50)
    tok = data.tokenizer
    item = data[3]
    assert tok.decode(item["caption"]) == item["text"]
    assert set(tok.itos[4:]) == {w for s in ShapeCaptions(n=3000).scenes for w in s[1].split()}
    tok.save(tmp_path / "vocab.json")
    assert WordTokenizer.load(tmp_path / "vocab.json").itos == tok.itos
    code, out, summary, _ = _train(cli, tmp_path, "captioning")
    assert code == 0, out
    metrics = [m for m in read_jsonl(tmp_path / "captioning" / "metrics.jsonl") if m["split"] == "train"]
    assert metrics[-1]["loss"] < metrics[0]["loss"] * 0.7 and "left out: text" in out
