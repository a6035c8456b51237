"""Config loading: every shipped YAML validates, precedence, extends, --set, and profiles."""

from pathlib import Path

import pytest
import yaml

from trainguard.config.load import parse_override, resolve_config
from trainguard.errors import ConfigError
from trainguard.hardware.profiles import bundled_profiles, get_profile

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"quickstart.yaml", "config_gtx1650.yaml", "config_h100.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path):
    cfg, prof, why = resolve_config(path)
    assert cfg.model and cfg.data.train
    first = path.read_text().splitlines()[0]
    assert first.startswith("# trainguard train --config configs/"), "each config starts with the command that runs it"
    assert why


@pytest.mark.parametrize("name", ["cpu", "apple-mps", "gtx1650", "t4", "rtx3060-12gb", "rtx3090", "rtx4090",
                                  "l4", "a100-40gb", "a100-80gb", "h100-80gb"])
def test_required_profiles_are_bundled(name):
    p = bundled_profiles()[name]
    assert p.memory_gb > 0 and p.precision in ("fp32", "fp16", "bf16")


def test_gtx1650_profile_facts():
    p = get_profile("gtx1650")
    assert p.memory_gb == 3.81 and "3.81 GiB" in p.memory_source and p.compute_capability == (7, 5) and p.fp16 and not p.bf16 and p.precision == "fp16"


def test_precedence_defaults_profile_yaml_set(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"optim": {"lr": 0.5}, "train": {"max_steps": 7}}))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"extends": "base.yaml", "hardware": "gtx1650", "train": {"max_steps": 9, "compile": True}}))
    cfg, prof, _ = resolve_config(run, overrides=["train.log_every=3", "optim.weight_decay=0.1"])
    assert prof.name == "gtx1650"
    assert cfg.train.precision == "fp16"          # from the profile (no YAML value)
    assert cfg.train.compile is True              # YAML beats the profile (gtx1650 says false)
    assert cfg.optim.lr == 0.5                    # from the extended file
    assert cfg.train.max_steps == 9               # the file beats what it extends
    assert cfg.train.log_every == 3 and cfg.optim.weight_decay == 0.1   # --set beats all
    assert cfg.checkpoint.keep_last == 3          # default
    cfg2, prof2, _ = resolve_config(run, profile="h100-80gb", overrides=["train.max_steps=11"])
    assert prof2.name == "h100-80gb" and cfg2.train.precision == "bf16" and cfg2.train.max_steps == 11


def test_set_splits_on_first_equals_and_parses_yaml_scalars():
    assert parse_override("a.b=c=d") == {"a": {"b": "c=d"}}
    assert parse_override("train.max_steps=50") == {"train": {"max_steps": 50}}
    assert parse_override("optim.lr=1e-4") == {"optim": {"lr": 1e-4}}
    assert parse_override("x=null") == {"x": None}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_auto_picks_cpu_profile_here():
    from trainguard.hardware.probe import probe
    from trainguard.hardware.profiles import match_profile

    info = probe()
    if info.type != "cpu":
        pytest.skip("a GPU is present")
    prof, why = match_profile(info)
    assert prof.name == "cpu" and "no GPU" in why


def test_cuda_matching_by_name_and_memory():
    from trainguard.hardware.probe import DeviceInfo
    from trainguard.hardware.profiles import match_profile

    def dev(name, mem, bf16=True):
        return DeviceInfo("cuda", name, mem, mem, (8, 0), bf16, True, 8, 64, "x")

    assert match_profile(dev("NVIDIA GeForce GTX 1650", 3.8, bf16=False))[0].name == "gtx1650"
    assert match_profile(dev("NVIDIA A100-SXM4-80GB", 79.2))[0].name == "a100-80gb"
    assert match_profile(dev("NVIDIA A100-PCIE-40GB", 39.4))[0].name == "a100-40gb"
    assert match_profile(dev("NVIDIA H100 80GB HBM3", 79.1))[0].name == "h100-80gb"
    prof, why = match_profile(dev("Some Future GPU", 48))
    assert prof.device == "cuda" and prof.memory_gb <= 48 and "no profile names" in why


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from trainguard.config.schema import Config

    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                walk(f.annotation)
    walk(Config)


def test_config_reference_is_current():
    from scripts.gen_config_reference import render

    assert (REPO / "docs" / "config.md").read_text() == render(), "run: python scripts/gen_config_reference.py"


def test_epochs_set_max_steps_from_the_dataset_and_exclude_it(cli, write_config, tmp_path):
    """train.epochs: whole batches per epoch (Blobs n=200, batch 16: 12 a pass), rounded up; never with max_steps."""
    import json

    cfg = write_config("ep", train={"epochs": 1.5, "batch_size": 16}, data={"train": {"_target_": "tests.toys:Blobs", "n": 200},
                                                                             "num_workers": 0})
    raw = yaml.safe_load(cfg.read_text())
    raw["train"].pop("max_steps", None)  # the toy config names max_steps; epochs replaces it
    cfg.write_text(yaml.safe_dump(raw))
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "ep")
    assert code == 0, out
    assert json.loads((tmp_path / "ep" / "summary.json").read_text())["steps"] == 18  # ceil(1.5 x 12)
    code, out = cli("diagnose", "--config", cfg)
    assert "train.epochs 1.5 = 18 steps" in " ".join(out.split())

    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "both", "--set", "train.max_steps=5")
    assert code == 2 and "both train.max_steps (5) and train.epochs (1.5) are set" in out and "--set train.epochs=null" in out
    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "steps", "--set", "train.epochs=null",
                    "--set", "train.max_steps=5")
    assert code == 0 and json.loads((tmp_path / "steps" / "summary.json").read_text())["steps"] == 5

    code, out = cli("train", "--config", cfg, "--run-dir", tmp_path / "stream", "--set", "data.train={_target_: tests.toys:BlobStream}")
    assert code == 2 and "train.epochs needs a dataset with a length" in out and "Traceback" not in out
