#!/usr/bin/env bash
# Everything a lent card must show (issue 24), in one run of under 8 minutes of device time:
#   scripts/gpu_check.sh [OUT_DIR]        (on the device machine: OUT_DIR=$OUT)
# Prints, and writes into OUT_DIR: the card and torch, the profile `hardware: auto` matches, the GPU
# tests (AMP paths, exact resume, no CUDA sync on a healthy step), scripts/bench.py on the card at 0
# and 4 loader workers (tiny, medium, large MLPs, the quickstart transformer), the TF32-off row,
# torch.compile against eager, and the memory forecast against max_memory_allocated for the
# examples. (Not in it yet: a channels_last row, which needs a convolutional workload in bench.py.) Each part has its own time limit; one failing does
# not stop the others. Record the figures with the date and the card in docs/benchmarks.md and
# docs/memory.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
part() {  # part NAME SECONDS COMMAND...: run with a limit, tee its output into OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}
part card 60 bash -c "nvidia-smi; $PY -c 'import torch; p = torch.cuda.get_device_properties(0); print(torch.__version__, torch.version.cuda, p.name, p.total_memory, round(p.total_memory / 2**30, 2), \"GiB\", torch.cuda.get_device_capability(0))'; $PY -m trainguard profiles; $PY -c 'from trainguard.hardware.profiles import match_profile; from trainguard.hardware.probe import probe; print(match_profile(probe()))'"
part gpu_tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
part bench_w0 150 $PY scripts/bench.py --device cuda --rounds 3
part bench_w4 90 $PY scripts/bench.py --device cuda --rounds 2 --workers 4 --only medium,large,quickstart
part bench_tf32_off 60 $PY scripts/bench.py --device cuda --rounds 2 --only medium --tf32 off
part bench_compile 90 $PY scripts/bench.py --device cuda --rounds 2 --only medium,quickstart --compile on
part memory 110 $PY scripts/memory_accuracy.py --profile h200
echo "=== done $(date -u +%H:%M:%S); outputs in $OUT"
