#!/usr/bin/env bash
# The whole GPU check of the kernels in one call, finished within DEADLINE seconds (default 500) on one H100:
#   1. environment (nvidia-smi, versions); peer-kernel wheels from .whl/ if carried
#   2. the GPU tests (pytest -m gpu tests/kernels/{test_gpu,test_kpacked,test_dense_prefill,test_cuda_gemv}.py) in the background,
#      while the suite compiles
#   3. benchmarks/gpu_suite.py, one process per step so that a CUDA fault in one step cannot lose the others
#      (each merges its sections into the same results.json):
#        warm      env + parallel Triton compile warm-up of every launch the later steps make, while nvcc builds
#                  the two CUDA libraries
#        check     SASS of the CUDA binary kernel + every kernel of ours against the float64 reference
#        kernels   ceilings (bandwidth, fp16/bf16/int8 peaks) + kernel timings with baselines, peers and the decode
#                  sweep, the targets' blocks first
#        e2e       end-to-end decode of a Llama-2-7B-shaped model (batch 1 first)
# Everything lands in $OUT (default out/gpu_suite): env.txt, pytest_gpu.txt, suite.log, results.json,
# results.md, and the derived dispatch table (dispatch_table.json, dispatch.md). Extra arguments go to every gpu_suite.py step (e.g. --quick, --layers 16).
# On the device machine:  bash benchmarks/gpu_suite.sh     (name .whl in carry for GemLite; timeout_s >= DEADLINE + 40)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_suite}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEADLINE="${DEADLINE:-500}"
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export ABQLLM_CACHE="${ABQLLM_CACHE:-/tmp/abqllm_cache}" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/abqllm_triton_cache}"
unset TRITON_INTERPRET

left() { echo $((DEADLINE - (SECONDS - START))); }

# step NAME CAP_SECONDS SECTIONS [extra gpu_suite.py args]: runs under min(CAP, time left); the step's own
# budgets (--budget-s, --kernel-budget-s) are set from that so it ends on its own before the timeout.
step() {
  local name=$1 cap=$2 sections=$3; shift 3
  local t; t=$(left); ((t > cap)) && t=$cap
  if ((t < 20)); then echo "step $name skipped: $(left)s left"; return; fi
  echo "== step $name ($sections), up to ${t}s, at $((SECONDS - START))s"
  timeout -k 10 "$t" "$PY" benchmarks/gpu_suite.py --out "$OUT" --only "$sections" \
    --budget-s $((t - 25)) --kernel-budget-s $((t - 30)) "$@" "${EXTRA[@]}" 2>&1 \
    | tee -a "$OUT/suite.log" | grep -v "^{" | tail -25
  echo "step $name: exit ${PIPESTATUS[0]} at $((SECONDS - START))s"
}
EXTRA=("$@")

if ls .whl/*.whl >/dev/null 2>&1; then  # optional peers (GemLite): benchmarks/gpu/fetch_peer_wheels.sh
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/abqllm_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/abqllm_site"
fi

{ date -u; nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2; nproc; } > "$OUT/env.txt" 2>&1
grep -E "H100|H200|torch|release" "$OUT/env.txt" | head -5

XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 4"
timeout -k 10 "${PYTEST_BUDGET:-150}" "$PY" -m pytest -v -p no:cacheprovider -m gpu $XDIST tests/kernels/test_gpu.py \
  tests/kernels/test_kpacked.py tests/kernels/test_dense_prefill.py tests/kernels/test_cuda_gemv.py tests/kernels/test_autotune.py \
  tests/kernels/test_dispatch_table.py \
  > "$OUT/pytest_gpu.txt" 2>&1 &
PYTEST_PID=$!

step warm 140 env,warmup --warmup-timeout-s 120  # parallel compiles: every second here saves ten later
step check 50 sass,correctness
wait "$PYTEST_PID"
echo "pytest -m gpu: exit $? at $((SECONDS - START))s ($(tail -1 "$OUT/pytest_gpu.txt"))"
grep -E "(FAILED|ERROR)" "$OUT/pytest_gpu.txt" | head -15
step kernels 170 ceilings,kernels
step e2e 400 e2e
"$PY" - "$OUT" <<'PYEOF'
import json, sys
sys.path.insert(0, ".")
from benchmarks.gpu.suite_report import render, _render_targets  # noqa: E402
out = sys.argv[1]
data = json.load(open(f"{out}/results.json"))
open(f"{out}/results.md", "w").write(render(data))
print("\n".join(_render_targets(data.get("kernels", {}).get("rows", []))))
PYEOF
# the measured dispatch table for `auto` on this GPU (abqllm/kernels/dispatch_table.py): review dispatch.md, then
# copy dispatch_table.json into abqllm/kernels/tables/ with the results it names
"$PY" benchmarks/gpu/derive_dispatch.py "$OUT/results.json" --out "$OUT/dispatch_table.json" --md "$OUT/dispatch.md" \
  > /dev/null 2> "$OUT/dispatch.err" && echo "dispatch table: $(grep -c '^| W' "$OUT/dispatch.md") rules in dispatch.md"
echo "done at $((SECONDS - START))s; results in $OUT"
