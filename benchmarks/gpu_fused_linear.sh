#!/usr/bin/env bash
# A short GPU check of the fused linear losses alone (about 2 minutes on an H100): their CUDA
# tests and benchmarks.fused_linear at the contract's fused linear shape. gpu_check.sh runs both as well.
# Writes gpu_tests.log and fused_linear.{json,md} under $OUT.
set -uo pipefail
OUT="${OUT:-benchmarks/results/local}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
timeout 90 "$PY" -m pytest tests/test_fused_linear.py -q -p no:cacheprovider -o addopts="" -rfE \
  2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 150 "$PY" -m benchmarks.fused_linear --device cuda --out "$OUT"
fused_rc=$?
echo "gpu_fused_linear: tests rc=$tests_rc, fused linear rc=$fused_rc (124 = timed out)"
[ "$tests_rc" = 0 ] && [ "$fused_rc" = 0 ]
