"""The command line a newcomer expects: --version, -h, --print-config, help in words, tables that
are not cut, every usage error as `error:` + `hint:` (exit 2), and setup.sh's fast re-run."""

import json
import re
import subprocess
import sys
from importlib import metadata

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import REPO, toy_config

BOX = re.compile("[\u2500-\u257f]")  # box-drawing characters: typer's framed error panel


def test_version_without_importing_torch():
    probe = ("import sys; from trainguard.cli import main; sys.argv = ['trainguard', '--version']\n"
             "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    import trainguard

    assert r.stdout.startswith(f"trainguard {trainguard.__version__} (torch {metadata.version('torch')}"), r.stdout + r.stderr
    assert "exit 0 False" in r.stdout  # exit 0, torch not imported
    assert metadata.version("trainguard") == trainguard.__version__  # the package and its metadata agree


@pytest.mark.parametrize("columns", ["80", "120"])
def test_dash_h_everywhere_and_help_in_words(columns):
    runner = CliRunner()
    for command in ([], ["train"], ["diagnose"], ["autoconfig"], ["profiles"], ["report"]):
        short = runner.invoke(app(), [*command, "-h"], env={"COLUMNS": columns})
        assert short.exit_code == 0 and "Usage: trainguard" in short.output, short.output
        assert short.output == runner.invoke(app(), [*command, "--help"], env={"COLUMNS": columns}).output
        assert "<" not in short.output and ">" not in short.output, short.output  # no <bool>, <list[str]>, <path>
        assert not re.search(r"\b(TEXT|INTEGER|BOOLEAN|None)\b", short.output), short.output  # nor click's types, nor None
    train = runner.invoke(app(), ["train", "-h"], env={"COLUMNS": columns}).output
    for words in ("KEY=VALUE", "SIZE", "auto|never|PATH", "--print-config"):
        assert words in train


def app():
    from trainguard.cli import app

    return app


@pytest.mark.parametrize("args, error, hint", [
    (["train", "--config", "c.yaml", "--set", "train.max_steps", "50"], "unexpected extra argument",
     "--set takes KEY=VALUE as one word: --set train.max_steps=VALUE"),
    (["train", "--confg", "c.yaml"], "no such option: --confg", "did you mean --config?"),
    (["train"], "missing option '--config'", "usage: trainguard train --config PATH [OPTIONS]"),
    (["train", "--config", "c.yaml", "--resume", "bogus"], "'bogus' is not auto, never, or an existing directory",
     "--resume takes auto|never|PATH"),
    (["train", "--config", "c.yaml", "--nproc-per-node", "0"], "0 processes: give 1 or more", "--nproc-per-node takes N"),
    (["autoconfig", "--config", "c.yaml", "--nproc-per-node", "two"], "invalid value for '--nproc-per-node'", "takes N"),
    (["report"], "missing argument 'RUN_DIR'", "usage: trainguard report RUN_DIR... [OPTIONS]"),
    (["trian"], "no such command 'trian'", "the commands are autoconfig, diagnose, profiles, report, train"),
    ([], "no command given", "trainguard train --config configs/quickstart.yaml"),
    (["--verison"], "no such option: --verison", "did you mean --version?"),
])
def test_usage_errors_are_error_and_hint(cli, args, error, hint):
    code, out = cli(*args)
    assert code == 2, out
    lines = out.splitlines()
    assert lines[0].startswith("error: ") and error in lines[0], out
    assert lines[-1].startswith("hint: ") and hint in lines[-1], out
    assert not BOX.search(out) and "Traceback" not in out and "Usage:" not in out


def test_usage_error_from_the_real_process():
    """The console script's own process (main(), not the test runner): stderr only, exit 2."""
    r = subprocess.run([sys.executable, "-m", "trainguard", "train", "-c", "c.yaml", "--set", "train.max_steps", "50"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith("error: got unexpected extra argument") and "\nhint: --set takes KEY=VALUE" in r.stderr
    assert not BOX.search(r.stderr) and "Traceback" not in r.stderr


def test_usage_error_class_is_typers_own():
    """The one reach into typer's internals (cli/_errors.py): the base class of its BadParameter."""
    import typer

    from trainguard.cli._errors import UsageError

    assert UsageError.__name__ == "UsageError" and issubclass(typer.BadParameter, UsageError)


def test_print_config_resolves_without_building_and_round_trips(cli, tmp_path):
    from trainguard.config.load import resolve_config

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"optim": {"lr": 0.02, "weight_decay": 0.1}}))
    cfg = toy_config(model={"_target_": "tests.cli_toys:NotBuilt"}, hardware="auto")
    path = tmp_path / "printme.yaml"
    path.write_text(yaml.safe_dump({"extends": "base.yaml", **cfg}, sort_keys=False))
    run_dir = tmp_path / "rd"
    overrides = ["train.max_steps=7", "optim.lr=0.03"]
    code, out = cli("train", "--config", path, "--print-config", "--run-dir", run_dir, "--profile", "cpu",
                    *(a for o in overrides for a in ("--set", o)))
    assert code == 0, out
    assert out.startswith("# resolved by: trainguard train --config") and "# hardware profile cpu" in out
    assert "# resolved config: auto values are chosen at start from the device" in out
    printed = yaml.safe_load(out)
    assert printed["train"]["max_steps"] == 7 and printed["optim"]["lr"] == 0.03  # --set wins
    assert printed["optim"]["weight_decay"] == 0.1 and "extends" not in printed  # extends merged in
    assert printed["hardware"] == "cpu" and printed["guard"]["max_skip_fraction"] == 0.05  # profile, defaults
    assert not run_dir.exists() and not (REPO / "runs" / "printme").exists()  # nothing written, nothing built
    again = tmp_path / "printed.yaml"
    again.write_text(out)
    first = resolve_config(path, profile="cpu", overrides=overrides)[0]
    assert resolve_config(again)[0].model_dump() == first.model_dump()  # the printout trains the same run
    code, out = cli("train", "--config", path, "--print-config", "--set", "train.batch_size=0")
    assert code == 2 and "error:" in out and "train.batch_size" in out and "hint:" in out


def test_profiles_table_is_not_cut_when_piped(cli):
    from trainguard.hardware.profiles import bundled_profiles

    code, out = cli("profiles")  # the test runner's output is not a terminal, as a pipe
    assert code == 0 and "\u2026" not in out, out  # no cell ends in an ellipsis
    for p in bundled_profiles().values():
        row = next((line for line in out.splitlines() if line.split()[:1] == [p.name]), None)
        assert row is not None, (p.name, out)
        assert f"{p.memory_gb:g} GiB" in row and f"{p.memory_headroom:.0%}" in row and p.description in row, row


def test_setup_reruns_without_pip_only_when_nothing_changed(tmp_path):
    """scripts/setup_check.py, the decision behind ./setup.sh's fast re-run, against this environment."""
    from scripts import setup_check

    stamp, pyproject = tmp_path / "stamp.json", tmp_path / "pyproject.toml"
    pyproject.write_bytes((REPO / "pyproject.toml").read_bytes())
    if setup_check.not_ready(stamp=stamp, pyproject=pyproject) != "no record of a ./setup.sh install in this environment":
        pytest.skip("trainguard is not installed editable from this checkout here")
    setup_check.record(stamp=stamp, pyproject=pyproject)
    assert setup_check.not_ready(stamp=stamp, pyproject=pyproject) is None  # the runtime requirements: these tests run on them
    pyproject.write_text(pyproject.read_text() + "\n# a changed pyproject\n")
    assert setup_check.not_ready(stamp=stamp, pyproject=pyproject) == "pyproject.toml changed since the last install"
    missing = setup_check.unmet(["pytest>=8", "no-such-dist-here>=1", "torch>=999", "lightning>=2; extra == 'bench'"], ("dev",))
    assert missing[0] == "no-such-dist-here is not installed" and missing[1].startswith("torch ") and len(missing) == 2
    r = subprocess.run(["bash", "-n", str(REPO / "setup.sh")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(stamp.read_text())["project"] == str(REPO)
