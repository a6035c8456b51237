"""Config-file faults (non-UTF-8 bytes, duplicate keys, non-finite numbers, seeds out of range, a batch
larger than the dataset) exit 2 naming the key; model and data faults (nothing to train, items of
mixed forms) are named too. Through the CLI, on real files and real runs."""

import json

import pytest
import yaml

from tests.conftest import read_jsonl, toy_config
from trainguard.errors import ConfigError
from trainguard.build import build_train_data
from trainguard.run import check_config, resolve_config


def _bad(cli, *args, code=2):
    rc, out = cli(*args)
    assert rc == code, out
    assert "error:" in out and "hint:" in out and "Traceback" not in out, out
    return " ".join(out.split())  # rich wraps long lines


def test_a_byte_that_is_not_utf8_names_the_file_and_line_even_in_a_comment_of_an_extended_file(cli, tmp_path, write_config):
    good = write_config("run")
    text = good.read_text().splitlines(keepends=True)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("".join(text[:4]).encode() + "# r\xe9glage du mod\xe8le\n".encode("latin-1") + "".join(text[4:]).encode())
    out = _bad(cli, "train", "--config", bad)
    assert f"{bad}:5:4: byte 0xe9 is not valid UTF-8" in out and "save the file as UTF-8" in out, out
    child = tmp_path / "child.yaml"
    child.write_text("extends: latin1.yaml\nseed: 1\n")
    out = _bad(cli, "train", "--config", child)
    assert "latin1.yaml:5:4" in out, out  # the parent that holds the byte, not the file on the command line


def test_a_duplicate_key_at_any_depth_names_both_lines(cli, tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("hardware: cpu\nseed: 1\ntrain:\n  max_steps: 3\nseed: 2\n")
    out = _bad(cli, "train", "--config", top)
    assert "duplicate key `seed` at lines 2 and 5" in out and "keep one of the two" in out, out
    nested = tmp_path / "nested.yaml"
    nested.write_text("hardware: cpu\ntrain:\n  max_steps: 3\n  batch_size: 8\n  log_every: 1\n  batch_size: 16\n"
                      "hooks:\n  - {_target_: a:b, x: 1, x: 2}\n")
    out = _bad(cli, "train", "--config", nested)
    assert "duplicate key `train.batch_size` at lines 4 and 6" in out, out
    nested.write_text("hardware: cpu\nhooks:\n  - {_target_: a:b, x: 1, x: 2}\n")
    with pytest.raises(ConfigError, match=r"duplicate key `hooks\[0\]\.x` at lines 3 and 3"):
        resolve_config(nested)
    anchors = tmp_path / "anchors.yaml"  # an alias and a merge key are no duplicates
    anchors.write_text("hardware: cpu\nbase: &b {lr: 0.1}\noptim:\n  <<: *b\n  name: sgd\n")
    with pytest.raises(ConfigError, match="unknown key `base`"):
        resolve_config(anchors)


def test_a_hardware_profile_file_gets_the_same_utf8_and_duplicate_key_checks(cli, tmp_path, write_config):
    from trainguard.hardware.profiles import PROFILE_DIR

    run = write_config("run")
    text = (PROFILE_DIR / "cpu.yaml").read_text()
    dup = tmp_path / "dup-profile.yaml"
    dup.write_text(text + "name: cpu-again\n")
    out = _bad(cli, "train", "--config", run, "--profile", dup, "--print-config")
    assert f"{dup}: duplicate key `name` at lines" in out, out
    latin = tmp_path / "latin-profile.yaml"
    latin.write_bytes(b"# r\xe9glage\n" + text.encode())
    out = _bad(cli, "train", "--config", run, "--profile", latin, "--print-config")
    assert f"{latin}:1:4: byte 0xe9 is not valid UTF-8" in out, out


@pytest.mark.parametrize("key, value", [("optim.lr", ".inf"), ("guard.max_skip_fraction", ".nan"),
                                        ("memory.headroom", "-.inf"), ("train.grad_clip", "inf"),
                                        ("optim.betas", "[0.9, .nan]"), ("schedule.min_lr_ratio", ".nan")])
def test_non_finite_numbers_are_refused_naming_the_key(write_config, key, value):
    with pytest.raises(ConfigError) as e:
        check_config(write_config(), [f"{key}={value}"])
    shown = key + ("[1]" if key == "optim.betas" else "")
    assert f"`{shown}`: Input should be a finite number" in e.value.message and f"--set {key}=" in e.value.hint


def test_a_seed_outside_numpys_range_is_a_config_error(cli, write_config):
    out = _bad(cli, "train", "--config", write_config(seed=-1))
    assert "`seed`: Input should be greater than or equal to 0 (got -1)" in out, out
    with pytest.raises(ConfigError, match="less than or equal to 4294967295"):
        check_config(write_config(), ["seed=4294967296"])
    check_config(write_config(), ["seed=4294967295"])  # the largest: trained below (test_items_of_mixed_forms...)


@pytest.mark.parametrize("batch", [1_000_000_000, 257])
def test_a_batch_larger_than_the_dataset_is_a_config_error_in_train_and_diagnose(cli, write_config, tmp_path, batch):
    cfg = write_config(train={"max_steps": 3, "batch_size": batch})
    out = _bad(cli, "train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert f"train.batch_size {batch} is larger than data.train, which has 256 samples" in out, out
    assert "set train.batch_size to at most 256" in out, out
    if batch == 257:
        rc, out = cli("diagnose", "--json", "--config", cfg)
        check = {c["name"]: c for c in json.loads(out[out.index("{"):])["checks"]}["data.build"]
        assert rc == 1 and check["status"] == "fail" and "257 is larger than data.train, which has 256" in check["message"], out


def test_a_stream_has_no_length_to_check_the_batch_against(write_config):
    cfg, _, _ = resolve_config(write_config(data={"train": {"_target_": "tests.toys:BlobStream", "n": 64}, "num_workers": 0},
                                            train={"batch_size": 128, "max_steps": 1}))
    assert build_train_data(cfg).iterable


@pytest.mark.parametrize("model, what", [("ZeroWidth", "has 2 parameter tensors, all of size 0 (shapes (0, 8), (0,))"),
                                         ("Frozen", "has 420 parameter elements, all frozen (requires_grad=False)"),
                                         ("NoParams", "has no parameters at all")])
def test_a_model_with_nothing_to_train_fails_the_preflight_with_its_name(cli, write_config, tmp_path, model, what):
    cfg = write_config(model={"_target_": f"tests.config_toys:{model}"}, data={"val": None, "num_workers": 0},
                       train={"max_steps": 2, "batch_size": 8})
    if model == "NoParams":  # diagnose runs the same preflight
        rc, out = cli("diagnose", "--json", "--config", cfg)
        check = {c["name"]: c for c in json.loads(out[out.index("{"):])["checks"]}["model.parameters"]
        assert rc == 1 and check["status"] == "fail" and f"the model {model} {what}" in check["message"], out
        return
    out = _bad(cli, "train", "--config", cfg, "--run-dir", tmp_path / "run", code=1)
    assert f"error: preflight: the model {model} {what}: nothing to train" in out, out
    assert ("unfreeze" if model == "Frozen" else "a layer width of 0") in out, out


def test_a_frozen_backbone_with_a_trainable_head_trains(cli, write_config, tmp_path):
    cfg = write_config(model={"_target_": "tests.config_toys:FrozenBackbone"}, data={"val": None, "num_workers": 0},
                       train={"max_steps": 2, "batch_size": 8}, checkpoint={"every_steps": 0})
    rc, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "run")
    assert rc == 0 and json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed", out


def test_items_of_mixed_forms_skip_the_odd_ones_by_id_and_all_triples_train(cli, tmp_path):
    def run(name, triples):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(toy_config(
            seed=4294967295, model={"_target_": "tests.config_toys:PairNet"}, loss={"_target_": "tests.config_toys:cross_entropy"},
            data={"train": {"_target_": "tests.config_toys:SomeTriples", "n": 64, "triples": triples}, "val": None, "num_workers": 0},
            train={"max_steps": 4, "batch_size": 16, "log_every": 1}, checkpoint={"every_steps": 0})))
        rc, out = cli("train", "--config", path, "--run-dir", tmp_path / name)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert rc == 0 and summary["status"] == "completed", out
        return summary, [e for e in read_jsonl(tmp_path / name / "events.jsonl") if e["type"] == "skip"]

    summary, skips = run("mixed", [4, 9])  # one epoch: every sample seen once
    assert sorted(i for e in skips for i in e["sample_ids"]) == [4, 9] and summary["skipped_samples"] == 2, skips
    assert all("3-tuples among 2-tuples" in e["reason"] for e in skips), skips
    summary, skips = run("triples", "all")  # (x, w, y) everywhere: a valid dataset, as before
    assert skips == [] and summary["skipped_samples"] == 0
