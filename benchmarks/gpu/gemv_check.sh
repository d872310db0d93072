#!/usr/bin/env bash
# The GEMV decode kernel on a GPU in one call of about 4 minutes (benchmarks/gpu/gemv_check.py: correctness, M = 1
# timings against qlinear_kernel, torch fp16 and GemLite, a tile sweep, end-to-end decode), then its GPU tests.
# First run: 2026-11-28 (benchmarks/results/gpu_h100_2026-11-28_gemv). Name .whl in carry for GemLite.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out/gemv}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" TRITON_CACHE_DIR=/tmp/tc; unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
timeout -k 5 195 python3 benchmarks/gpu/gemv_check.py --out "$OUT" --budget-s 185 2>&1 | tee "$OUT/gemv.log"
timeout -k 5 50 python3 -m pytest -q -p no:cacheprovider -m gpu -n 4 tests/kernels/test_gpu.py -k "gemv or triton_configs" > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?: $(tail -1 "$OUT/pytest.txt")"; grep -E "^FAILED" "$OUT/pytest.txt" | head
