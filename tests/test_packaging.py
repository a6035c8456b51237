"""Packaging promises: the CLI's fast paths do not import torch; README and CI agree."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import sys
from trainguard.cli import app
try:
    app(args=sys.argv[1:], prog_name="trainguard")
except SystemExit as e:
    code = e.code
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", code)
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_help_does_not_import_torch():
    r = _run("--help")
    assert "NO_TORCH 0" in r.stdout, r.stdout + r.stderr
    assert "train" in r.stdout and "profiles" in r.stdout


def test_profiles_does_not_import_torch():
    r = _run("profiles")
    assert "NO_TORCH 0" in r.stdout, r.stdout + r.stderr
    r = _run("profiles", "h100-80gb")
    assert "NO_TORCH 0" in r.stdout


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "trainguard", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and "autoconfig" in r.stdout


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (REPO / "README.md").read_text(), "the README's test command and .ci/run must be the same line"


def test_no_deprecated_amp_spellings():
    bad = "torch.cuda" + ".amp"
    for p in (REPO / "trainguard").rglob("*.py"):
        assert bad not in p.read_text(), p
