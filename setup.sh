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
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3

if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
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

extra=""
if [ "${1:-}" = "dev" ]; then extra="[dev]"; fi
"$PY" -m pip install -e ".${extra}"
echo "setup: done ($("$PY" -m trainguard --help >/dev/null && echo 'trainguard CLI works'))"
