#!/usr/bin/env bash
# The decode and prefill kernels on a GPU in one call of about 8 minutes (benchmarks/gpu/kp_check.py: correctness,
# M = 1 timings against torch fp16, GemLite and the older qlinear_kernel, sweeps, small and large M, end-to-end
# decode at batch 1), its report against the targets (kp.md), then the k-packed, dense and CUDA-GEMV GPU tests.
# Name .whl in carry for GemLite (benchmarks/gpu/fetch_peer_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/out/kp}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" TRITON_CACHE_DIR=/tmp/tc; unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv > "$OUT/env.txt" 2>&1
# KP_BUDGET: seconds for kp_check.py; KP_ARGS: e.g. --lean; KP_PYTEST=0 skips the pytest step (about a minute).
timeout -k 5 "${KP_BUDGET:-430}" python3 benchmarks/gpu/kp_check.py --out "$OUT" --budget-s "$(( ${KP_BUDGET:-430} - 10 ))" ${KP_ARGS:-} 2>&1 | tee "$OUT/kp.log"
# the markdown report against issue 4's targets (benchmarks/gpu/kp_report.py), from whatever kp.json holds
python3 benchmarks/gpu/kp_report.py "$OUT/kp.json" > "$OUT/kp.md" 2> "$OUT/kp_report.err" && sed -n '/## Targets/,/^## M = 1/p' "$OUT/kp.md"
[ "${KP_PYTEST:-1}" = 0 ] && exit 0
timeout -k 5 90 python3 -m pytest -q -p no:cacheprovider -m gpu -n 12 tests/kernels/test_kpacked.py tests/kernels/test_dense_prefill.py tests/kernels/test_cuda_gemv.py > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?: $(tail -1 "$OUT/pytest.txt")"; grep -E "^FAILED" "$OUT/pytest.txt" | head
