#!/usr/bin/env bash
# The one prepared GPU check: at most 8 minutes on an H100 or H200 (its timeouts add up to
# 475 s).
#   1. GPU parity tests at real sizes (N up to 16384, V in {32000, 128256, 262144}, bf16, fp32)
#      and the peak-memory contract (tests/test_gpu.py), the fused linear losses at a real
#      vocabulary (tests/test_fused_linear.py), the divergence family's, distillation_loss's and
#      the sparse teachers' parity suites and the head split's bounded-reads suite on CUDA
#      tensors, then the CPU
#      suite's tie, -inf, identical-model and strided-view cases on CUDA tensors;
#   2. the fused linear benchmark (N = 8192, H = 4096, V = 128256, bf16): both fused
#      strategies (forward_gradient, recompute) against the unfused path and Liger-Kernel's
#      fused linear JSD (when installed);
#   3. the benchmark CLI's GPU grid (N = 16384, V in {32000, 128256, 151936, 262144}, bf16 and fp32,
#      flat and peaked teachers): Triton against the floor, the official-style reference eager
#      and under torch.compile (AKL), Liger-Kernel (when installed) and F.kl_div, in that
#      priority within a time budget (the torch backend, CUDA's slow fallback, is left out:
#      run python -m benchmarks --impls triton torch for it);
#   4. the two exact head searches side by side (benchmarks/head_search.py: AKL with the pivot
#      search and with the radix select against FKL and the floor, N = 16384, V in {32000,
#      128256, 262144}, bf16, flat and peaked, with the reads of the teacher row each made);
#   5. sparse teachers (benchmarks/sparse_teacher.py: N = 16384, V = 128256, k = 64, bf16,
#      FKL and AKL against the floor and a plain PyTorch FKL).
# Writes 12 files under $OUT (default benchmarks/results/local): device.txt, gpu_tests.log,
# fused_linear.{json,md}, bench_cuda.{json,md}, a PNG per dtype, head_search.{json,md} and
# sparse_teacher.{json,md}.
# Usage, from the repository root on a CUDA machine:  OUT=some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results/local}"
PY="${PYTHON:-python3}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-50}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  "$PY" -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" \
    || echo "liger-kernel not installed: its rows are skipped"
} 2>&1 | tee "$OUT/device.txt"

timeout 140 "$PY" -m pytest tests/test_gpu.py tests/test_fused_linear.py \
  tests/test_divergence_family.py tests/test_distillation.py tests/test_head_split.py \
  tests/test_topk_teacher.py \
  -q -p no:cacheprovider \
  -o addopts="" -rfE 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 30 "$PY" -m pytest tests/test_edge_cases.py -q -p no:cacheprovider -o addopts="" -rfE \
  -k "ties or negative_infinity or identical or strided" 2>&1 | tee -a "$OUT/gpu_tests.log"
edge_rc=${PIPESTATUS[0]}

timeout 95 "$PY" -m benchmarks.fused_linear --device cuda --out "$OUT" \
  --impls fused fused_recompute unfused liger_fljsd liger_fljsd_loss
fused_rc=$?

# Budget: no new case starts after BENCH_BUDGET_S; JSON is written after every case, so a
# timeout still leaves the measured cases (redraw with: python -m benchmarks --render FILE).
timeout $((BENCH_BUDGET_S + 40)) "$PY" -m benchmarks --out "$OUT" --budget-s "$BENCH_BUDGET_S" \
  --compile-losses akl --impls triton official official+compile liger_jsd liger_kldiv kl_div
bench_rc=$?

timeout 75 "$PY" -m benchmarks.head_search --out "$OUT"
search_rc=$?

timeout 45 "$PY" -m benchmarks.sparse_teacher --device cuda --out "$OUT"
sparse_rc=$?

echo "gpu_check: tests rc=$tests_rc, edge-case tests rc=$edge_rc, fused linear rc=$fused_rc," \
  "benchmark rc=$bench_rc, head search rc=$search_rc, sparse teacher rc=$sparse_rc" \
  "(124 = timed out)"
[ "$tests_rc" = 0 ] && [ "$edge_rc" = 0 ] && [ "$fused_rc" = 0 ] && [ "$bench_rc" = 0 ] \
  && [ "$search_rc" = 0 ] && [ "$sparse_rc" = 0 ]
