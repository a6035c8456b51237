"""Every bad-input case exits 2 with `error:` and `hint:`, and no traceback."""

import pytest


def _bad(cli, *args):
    code, out = cli(*args)
    assert code == 2, out
    assert "error:" in out and "hint:" in out, out
    assert "Traceback" not in out
    return out


def test_yaml_syntax_error_gives_line(cli, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  _target_: x:y\ntrain:\n  max_steps: [1, 2\n  batch_size: 3\n")
    out = _bad(cli, "train", "--config", p)
    assert "YAML syntax error" in out and "bad.yaml:" in out
    assert ":5:" in out or ":4:" in out  # the line of the problem


def test_unknown_key_did_you_mean(cli, write_config):
    p = write_config(train={"max_step": 5})
    out = _bad(cli, "train", "--config", p)
    assert "train.max_step" in out and "did you mean `train.max_steps`" in out


def test_unknown_top_level_key(cli, write_config):
    p = write_config(optimizer={"lr": 1})
    out = _bad(cli, "train", "--config", p)
    assert "unknown key `optimizer`" in out and "did you mean `optim`" in out


def test_wrong_type_gives_key_path(cli, write_config):
    p = write_config(train={"batch_size": "lots"})
    out = _bad(cli, "train", "--config", p)
    assert "`train.batch_size`" in out and "integer" in out


def test_missing_file(cli, tmp_path):
    out = _bad(cli, "train", "--config", tmp_path / "nope.yaml")
    assert "not found" in out and "nope.yaml" in out


def test_unimportable_module(cli, write_config):
    p = write_config(model={"_target_": "no_such_pkg.models:Net"})
    out = _bad(cli, "train", "--config", p)
    assert "cannot import module `no_such_pkg.models`" in out


def test_missing_attribute(cli, write_config):
    p = write_config(model={"_target_": "tests.toys:MLPP"})
    out = _bad(cli, "train", "--config", p)
    assert "has no attribute `MLPP`" in out and "did you mean `tests.toys:MLP`" in out


def test_bad_constructor_arguments(cli, write_config):
    p = write_config(model={"_target_": "tests.toys:MLP", "width": 3})
    out = _bad(cli, "train", "--config", p)
    assert "tests.toys:MLP" in out and "width" in out


def test_unknown_profile_lists_known(cli, write_config):
    p = write_config(hardware="gtx1660")
    out = _bad(cli, "train", "--config", p)
    assert "unknown hardware profile `gtx1660`" in out and "gtx1650" in out and "h100-80gb" in out
    out = _bad(cli, "train", "--config", p, "--profile", "tpu")
    assert "unknown hardware profile `tpu`" in out


@pytest.mark.parametrize("value", ["0", "-4"])
def test_nonpositive_batch_size(cli, write_config, value):
    out = _bad(cli, "train", "--config", write_config(), "--set", f"train.batch_size={value}")
    assert "train.batch_size" in out and "greater than 0" in out


def test_set_without_equals(cli, write_config):
    out = _bad(cli, "train", "--config", write_config(), "--set", "train.max_steps")
    assert "KEY=VALUE" in out


def test_debug_shows_traceback(cli, write_config):
    code, out = cli("train", "--config", write_config(model={"_target_": "no_such_pkg:Net"}), "--debug")
    assert code == 2 and "Traceback" in out


def test_profiles_command(cli):
    code, out = cli("profiles")
    assert code == 0 and "gtx1650" in out and "h100-80gb" in out
    code, out = cli("profiles", "gtx1650")
    assert code == 0 and "7, 5" in out
    code, out = cli("profiles", "nope")
    assert code == 2 and "error:" in out and "hint:" in out


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused_before_any_starts(cli, tmp_path):
    code, out = cli("train", "--config", "configs/quickstart.yaml", "--nproc-per-node", "2", "--set", "train.batch_size=33",
                    "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "does not split evenly over 2 processes" in out and "hint: set train.batch_size to 32 or 34" in out
    assert not (tmp_path / "run").exists()


def test_autoconfig_needs_a_config(cli):
    code, out = cli("autoconfig")  # built: it needs a config
    assert code == 2 and "--config" in out
