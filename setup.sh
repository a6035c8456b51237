#!/usr/bin/env bash
# Install trainguard into the active Python environment (a virtualenv is recommended).
#
#   ./setup.sh        runtime only
#   ./setup.sh dev    plus the test tools
#
# torch: an importable torch is kept as it is (CPU, CUDA or ROCm build). Without one, this
# installs torch 2.13.0: on Linux without an NVIDIA driver it asks for the CPU build
# (torch==2.13.0+cpu), so a CPU-only machine never pulls the multi-GB CUDA build. Where no CPU
# build is reachable, set TORCH_INDEX_URL to PyTorch's CPU wheel index and run this again.
#
# Re-run in an environment it already set up, it takes seconds: pip is skipped while trainguard is
# installed editable from this checkout, pyproject.toml is unchanged since that install, and every
# requirement (of the extras asked for) is met (scripts/setup_check.py decides; pip runs otherwise).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3

if torch_version=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "setup: keeping the installed torch $torch_version"
else
    spec="torch==2.13.0"
    if [ "$(uname -s)" = "Linux" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
        spec="torch==2.13.0+cpu"
    fi
    echo "setup: torch not found; installing $spec"
    if ! "$PY" -m pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$spec"; then
        echo "error: could not install $spec" >&2
        echo "hint: install torch yourself (any build >= 2.4) and re-run, or set TORCH_INDEX_URL to PyTorch's CPU wheel index" >&2
        exit 1
    fi
fi

extra="" extras=""
if [ "${1:-}" = "dev" ]; then extra="[dev]" extras="dev"; fi
if why=$("$PY" scripts/setup_check.py $extras); then
    echo "setup: trainguard${extra} is installed from this checkout and up to date; skipping pip"
else
    echo "setup: installing trainguard${extra} (${why})"
    "$PY" -m pip install -e ".${extra}"
    "$PY" scripts/setup_check.py --record
fi
echo "setup: done ($("$PY" -m trainguard --help >/dev/null && echo 'trainguard CLI works'))"
