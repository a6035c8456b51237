"""Every example in examples/ runs through the CLI, at tiny sizes on a CPU (their configs are for
a GTX 1650 and an H100; `--set` shrinks them), and does what its README says."""

import json
import os
import shutil
import subprocess
import sys
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
    "video_deblur": ["train.max_steps=10", "data.train.n=64", "data.val.n=16", "data.train.size=32", "data.val.size=32",
                     "data.train.frames=4", "data.val.frames=4", "model.width=8", "model.blocks=2", "train.eval_every=10",
                     "train.precision=fp32"],  # fp16 autocast on a CPU is ~30x slower for Conv3d
    "text_classification": ["train.max_steps=20", "model.hidden=32", "model.layers=1", "model.heads=2", "model.max_length=32",
                            "data.train.max_length=32", "data.val.max_length=32", "train.eval_every=10",
                            "train.precision=fp32", "data.train.sizes={train: 640, validation: 64}",
                            "data.val.sizes={train: 640, validation: 64}"],
}
NEEDS = {"text_classification": ("transformers", "datasets")}  # the `examples` extra


def _needs(name: str) -> None:
    """Skip, with the reason, where an example's library is not installed (or does not import)."""
    for module in NEEDS.get(name, ()):
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - a broken install skips with its own message
            pytest.skip(f"examples/{name} needs `{module}` (pip install -e '.[examples]'): {type(e).__name__}: {e}")


def test_every_example_has_its_readme_and_both_configs():
    from trainguard.config.load import resolve_config

    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders == sorted(TINY)
    for name in folders:
        readme = (EXAMPLES / name / "README.md").read_text()
        assert readme.count("\n- **") == 3 and f"examples/{name}/config_gtx1650.yaml" in readme
        for card, profile in (("gtx1650", "gtx1650"), ("h100", "h100-80gb")):  # resolving builds nothing
            cfg, prof, _ = resolve_config(EXAMPLES / name / f"config_{card}.yaml")
            assert prof.name == profile


def _args(tmp_path, name) -> list[str]:
    args = [a for kv in TINY[name] for a in ("--set", kv)] + ["--set", "data.num_workers=0"]
    if name == "video_deblur":  # its clips are written on first use
        args += ["--set", f"data.train.root={tmp_path / 'clips'}", "--set", f"data.val.root={tmp_path / 'clips'}"]
    if name == "text_classification":  # its JSON files and tokenizer too
        args += [a for key in ("data.train", "data.val", "model") for a in ("--set", f"{key}.root={tmp_path / 'reviews'}")]
    return args


def _train(cli, tmp_path, name, *extra):
    _needs(name)
    args = _args(tmp_path, name)
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
    # each truncated trace is found once (the step goes on without it), then left out up front
    found = [i for e in events if e["type"] == "skip" and "the step went on without these samples" in e["reason"]
             for i in e["sample_ids"]]
    assert found and len(found) == len(set(found))
    assert all("the step went on without" in e["reason"] or "known from an earlier step" in e["reason"]
               for e in events if e["type"] == "skip")
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


def test_video_deblur_compile_fallback_is_said_channels_last_is_named_and_a_wrong_split_stops(cli, tmp_path):
    config = EXAMPLES / "video_deblur" / "config_gtx1650.yaml"
    # a machine without a working C++ compiler (inductor's CPU backend needs one): the run says so, and trains eager
    cmd = [sys.executable, "-m", "trainguard", "train", "--config", str(config), "--run-dir", str(tmp_path / "eager"),
           "--profile", "cpu", *_args(tmp_path, "video_deblur")]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "CXX": "/nonexistent/g++"}, capture_output=True, text=True, timeout=300)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0, out
    assert "torch.compile failed (InductorError: InvalidCxxCompiler" in out and "training runs the eager model" in out
    events = read_jsonl(tmp_path / "eager" / "events.jsonl")
    assert [e["check"] for e in events if e["type"] == "preflight"] == ["model.compile"]
    eager = json.loads((tmp_path / "eager" / "summary.json").read_text())

    if shutil.which("g++") or shutil.which("c++"):  # where inductor can build, the compiled model trains, and says so
        code, out, summary, _ = _train(cli, tmp_path, "video_deblur", "--profile", "cpu")
        assert code == 0 and "note: torch.compile: the model compiled and ran one forward/backward" in out, out
        assert summary["steps"] == eager["steps"] == 10
        assert abs(summary["final_loss"] - eager["final_loss"]) < 1e-3 * eager["final_loss"]

    code, out = cli("diagnose", "--config", config, *_args(tmp_path, "video_deblur"))
    out = " ".join(out.split())
    assert code == 0 and "Conv3d layers take 5-D inputs: channels_last (4-D only) does not apply" in out
    assert "gradient checkpointing is on" in out

    code, out = cli("train", "--config", config, "--run-dir", tmp_path / "split", *_args(tmp_path, "video_deblur"),
                    "--set", "data.train.split=Train")
    out = " ".join(out.split())
    assert code == 1 and "data.train is empty (0 samples)" in out and "`train` vs `Train`" in out and "Traceback" not in out


def test_text_classification_rows_reach_the_transformers_model_as_it_takes_them(cli, tmp_path):
    """Field report 000 on the real libraries: `datasets` rows with `idx`, `sentence`, `label` and
    token ids as lists of ints, into a transformers BERT, with no custom collate or filter."""
    _needs("text_classification")
    from examples.text_classification.reviews import reviews

    rows = reviews(root=str(tmp_path / "reviews"), split="train", max_length=32, sizes={"train": 640, "validation": 64})
    row = rows[0]
    assert isinstance(row["input_ids"], list) and isinstance(row["idx"], int) and isinstance(row["sentence"], str)
    assert rows.features["label"].dtype == "int64" and len(rows) == 640
    code, out, summary, events = _train(cli, tmp_path, "text_classification")
    assert code == 0, out
    assert "left out: idx, sentence (not named by BertForSequenceClassification.forward())" in " ".join(out.split())
    assert summary["steps"] == 20 and summary["skipped_steps"] == 0 and 0 <= summary["eval"]["accuracy"] <= 1
    assert not [e for e in events if e["type"] in ("skip", "oom", "stop")]


def test_image_size_with_torchvision_vit_stops_on_its_size_check(cli, tmp_path):
    """The optional torchvision variant: a VisionTransformer built for one size. Skips where torchvision
    is absent or does not import (the registry's wheels need the CUDA torch: "operator
    torchvision::nms does not exist" beside a CPU build)."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the import error is the reason
        pytest.skip(f"torchvision does not import here ({type(e).__name__}: {e}); pip install the build made for this torch")
    config = EXAMPLES / "image_size" / "config_torchvision.yaml"
    tiny = ["model.image_size=32", "model.num_layers=1", "model.num_heads=2", "model.hidden_dim=32", "model.mlp_dim=64",
            "data.train.n=128", "data.val.n=32", "data.train.size=32", "data.val.size=32", "train.max_steps=5",
            "train.eval_every=5", "train.precision=fp32", "data.num_workers=0"]
    args = [a for kv in tiny for a in ("--set", kv)]
    code, out = cli("diagnose", "--config", config, *args, "--set", "data.train.size=64")
    assert code == 1 and "Wrong image height! Expected 32 but got 64!" in " ".join(out.split())
    code, out = cli("train", "--config", config, "--run-dir", tmp_path / "vit", *args)
    assert code == 0, out


def test_text_classification_as_a_hugging_face_script_writes_it(cli, tmp_path, monkeypatch):
    """docs/your-model.md's walkthrough: unpadded rows, transformers' padding collator with a nested
    tokenizer, torch's AdamW and transformers' schedule by `_target_`, W&B offline."""
    _needs("text_classification")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = _args(tmp_path, "text_classification") + ["--set", "schedule.num_warmup_steps=2"]
    run_dir = tmp_path / "hf"
    code, out = cli("train", "--config", EXAMPLES / "text_classification" / "config_hf.yaml", "--run-dir", run_dir, *args)
    assert code == 0, out
    assert "left out: idx, sentence (not named by BertForSequenceClassification.forward())" in " ".join(out.split())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["skipped_steps"] == 0
    lrs = [r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert lrs[0] == 0.0 and max(lrs) > 0  # transformers' linear warmup from 0
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
