"""W&B and MLflow loggers, and safetensors weights, through real runs of the CLI (real packages, no network)."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO, read_jsonl, toy_config

FLAKY = dict(data={"train": {"_target_": "tests.toys:Flaky", "n": 256, "broken_ids": [4]},
                   "shuffle": False, "num_workers": 0},
             train={"max_steps": 10, "batch_size": 16, "log_every": 5, "eval_every": 5})
MLFLOW_RETRIES = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def wandb_history(path) -> list[dict]:
    """The history rows of an offline W&B run file. W&B ships no reader for it: the file is a LevelDB
    log (32 KiB blocks of records with a 7-byte header: crc32, length, type full/first/middle/last)
    after a 7-byte ``:W&B`` header, each record a ``wandb_internal_pb2.Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B run file"
    rows, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (2, 3):
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_and_mlflow_file_store_get_the_metrics_and_guard_events(cli, write_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true",
                        "MLFLOW_ALLOW_FILE_STORE": "true"}.items():  # MLflow 3 refuses a file store unless allowed
        monkeypatch.setenv(name, value)
    for name in MLFLOW_RETRIES:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "wandb").mkdir()
    uri = f"file:{tmp_path / 'mlruns'}"
    path = write_config("both", **FLAKY, log={"wandb": {"project": "tg-test", "mode": "offline", "tags": ["ci"]},
                                              "mlflow": {"tracking_uri": uri, "experiment": "tg"}})
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / "run")
    assert code == 0 and "warning" not in out, out
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train = [(m["step"], m["loss"]) for m in metrics if m["split"] == "train"]
    val = [(m["step"], m["loss"]) for m in metrics if m["split"] == "val"]
    skips = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["type"] == "skip"]
    assert [s for s, _ in train] == [1, 5, 10] and [s for s, _ in val] == [5, 10]
    assert [(e["step"], e["sample_ids"]) for e in skips] == [(1, [4])]  # sample 4 raises on load

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tg")
    (run,) = client.search_runs([exp.experiment_id])
    hist = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
            for k in ("train/loss", "val/loss", "guard/skips", "guard/skipped_samples")}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    guard_text = (tmp_path / "mlruns" / exp.experiment_id / run.info.run_id / "artifacts" / "guard_events.txt").read_text()
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert hist == {"train/loss": train, "val/loss": val, "guard/skips": [(1, 1.0)], "guard/skipped_samples": [(1, 1.0)]}
    assert {"config.yaml", "guard_events.txt"} <= artifacts and "samples [4]" in guard_text

    (run_file,) = (tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r] == train
    assert [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r] == val
    assert [(r["step"], r["guard/skips"], r["guard/skipped_samples"]) for r in rows if "guard/skips" in r] == [(1, 1, 1)]
    assert [r["step"] for r in rows if "samples [4]" in str(r.get("guard/skip"))] == [1]


def test_a_logger_that_fails_warns_once_and_the_run_completes(cli, write_config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    for name in MLFLOW_RETRIES:  # the logger sets short defaults in the environment: undone after the test
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    small = dict(data={**FLAKY["data"], "val": None}, train={"max_steps": 6, "batch_size": 16, "log_every": 1})

    # no server on port 9: MLflow fails to start (after its shortened retries)
    path = write_config("dead", **small, log={"mlflow": {"tracking_uri": "http://127.0.0.1:9"}})
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / "dead")
    assert code == 0, out
    assert out.count("warning: log.mlflow could not start") == 1 and "127.0.0.1" in out, out
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    failed = [e for e in read_jsonl(tmp_path / "dead" / "events.jsonl") if e["type"] == "logger_failed"]
    assert [(e["step"], e["logger"]) for e in failed] == [(0, "mlflow")]
    assert json.loads((tmp_path / "dead" / "summary.json").read_text())["status"] == "completed"

    # a store that breaks mid-run: the hook replaces it with a file at step 3, the write at step 4 fails
    store = tmp_path / "mlruns"
    path = write_config("broken", **small, log={"mlflow": {"tracking_uri": f"file:{store}"}},
                        hooks=[{"_target_": "tests.loggers_toys:BreakStore", "path": str(store), "at": 3}])
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / "broken")
    assert code == 0, out
    assert out.count("warning: log.mlflow failed") == 1, out
    events = read_jsonl(tmp_path / "broken" / "events.jsonl")
    assert [(e["step"], e["logger"]) for e in events if e["type"] == "logger_failed"] == [(4, "mlflow")]
    assert [m["step"] for m in read_jsonl(tmp_path / "broken" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert events[-1]["type"] == "end" and events[-1]["status"] == "completed"


def test_logger_config_errors_name_the_fix(cli, write_config, tmp_path):
    pytest.importorskip("wandb")
    code, out = cli("train", "--config", write_config("typo", log={"wandb": {"projct": "x", "mode": "offline"}}),
                    "--run-dir", tmp_path / "typo")
    assert code == 2 and "log.wandb.projct is not an argument of wandb.init" in out and "did you mean `project`" in out, out
    code, out = cli("train", "--config", write_config("mode", log={"wandb": {"mode": "ofline"}}), "--run-dir", tmp_path / "mode")
    assert code == 2 and "log.wandb.mode must be online, offline or disabled" in out, out
    code, out = cli("train", "--config", write_config("ml", log={"mlflow": {"experimnt": "x"}}), "--run-dir", tmp_path / "ml")
    assert code == 2 and "unknown key `log.mlflow.experimnt`" in out and "did you mean `log.mlflow.experiment`" in out, out


def _safetensors_run(cli, write_config, tmp_path, name, model, train_n=64):
    path = write_config(name, model=model, data={"train": {"_target_": "tests.loggers_toys:LmRows", "n": train_n},
                                                 "val": None, "num_workers": 0},
                        train={"max_steps": 4, "batch_size": 8, "log_every": 2},
                        checkpoint={"every_steps": 2, "keep_last": 3, "safetensors": True})
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / name)
    assert code == 0, out
    return path, out


def test_safetensors_weights_equal_model_pt_with_tied_weights_and_are_verified(cli, write_config, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model

    from tests.loggers_toys import TiedLM

    path, _ = _safetensors_run(cli, write_config, tmp_path, "tied", {"_target_": "tests.loggers_toys:TiedLM"})
    ckpts = tmp_path / "tied" / "checkpoints"
    for step in (2, 4):
        ckpt = ckpts / f"step_{step:07d}"
        assert "model.safetensors" in json.loads((ckpt / "manifest.json").read_text())["files"]
        pt = torch.load(ckpt / "model.pt", weights_only=True)
        flat = load_file(ckpt / "model.safetensors")
        # the tied weight is stored once, under its first name; the metadata says which
        assert set(pt) - set(flat) == {"head.weight"} and all(torch.equal(flat[k], pt[k]) for k in flat)
        with safe_open(ckpt / "model.safetensors", "pt") as f:
            assert f.metadata() == {"format": "pt", "tied": json.dumps({"head.weight": "embed.weight"})}
        model = TiedLM()
        load_model(model, ckpt / "model.safetensors")  # safetensors' own loader knows the shared tensor
        assert model.head.weight is model.embed.weight
        assert all(torch.equal(v, pt[k]) for k, v in model.state_dict().items())
    assert not torch.equal(load_file(ckpts / "step_0000002" / "model.safetensors")["embed.weight"],
                           load_file(ckpts / "step_0000004" / "model.safetensors")["embed.weight"])

    # a corrupt model.safetensors makes its checkpoint be skipped on resume like any corrupt file
    bad = ckpts / "step_0000004" / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    code, out = cli("train", "--config", path, "--run-dir", tmp_path / "tied")
    assert code == 0, out
    assert "model.safetensors does not match its checksum" in out and "resumed from" in out and "step_0000002" in out, out
    events = read_jsonl(tmp_path / "tied" / "events.jsonl")
    assert [e["step"] for e in events if e["type"] == "checkpoint_corrupt"] == [4]
    pt = torch.load(ckpts / "step_0000004" / "model.pt", weights_only=True)
    assert all(torch.equal(v, pt[k]) for k, v in load_file(bad).items())  # written again, whole


def test_safetensors_checkpoint_loads_with_transformers_from_pretrained(cli, write_config, tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    from tests.loggers_toys import gpt2_config

    _safetensors_run(cli, write_config, tmp_path, "gpt2", {"_target_": "tests.loggers_toys:tiny_gpt2"})
    ckpt = tmp_path / "gpt2" / "checkpoints" / "step_0000004"
    pt = torch.load(ckpt / "model.pt", weights_only=True)
    assert set(pt) - set(load_file(ckpt / "model.safetensors")) == {"lm_head.weight"}
    # a Hugging Face directory: the model's config.json beside the checkpoint's model.safetensors
    hf = tmp_path / "hf"
    gpt2_config().save_pretrained(hf)
    (hf / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    model = GPT2LMHeadModel.from_pretrained(hf)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert all(torch.equal(v, pt[k]) for k, v in model.state_dict().items())
