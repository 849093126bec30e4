#!/usr/bin/env bash
# The one prepared GPU check (issue 3 / SPEC 4): under 6 minutes on an H100.
#   1. GPU parity tests at real sizes (N up to 16384, V in {32000, 128256, 262144}, bf16, fp32)
#      and the peak-memory contract (tests/test_gpu.py);
#   2. the benchmark grid: FKL/RKL/AKL forward and forward+backward against the memory floor
#      and the official-style reference (benchmarks/gpu_grid.py);
#   3. the CPU suite's tie, -inf, identical-model and strided-view cases on CUDA tensors.
# Writes logs, JSON and Markdown under $OUT (default benchmarks/results/local).
# Usage, from the repository root on a CUDA machine:  OUT=some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results/local}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

timeout 130 "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider -o addopts="" -rfE \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 190 "$PY" -m benchmarks.gpu_grid --out "$OUT" --budget-s 140 2>&1 | tee "$OUT/gpu_grid.log"
bench_rc=${PIPESTATUS[0]}

timeout 40 "$PY" -m pytest tests/test_edge_cases.py -q -p no:cacheprovider -o addopts="" -rfE \
  -k "ties or negative_infinity or identical or strided" 2>&1 | tee "$OUT/gpu_edge_tests.log"
edge_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, benchmark rc=$bench_rc, edge-case tests rc=$edge_rc (124 = timed out)"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$edge_rc" = 0 ]
