#!/usr/bin/env bash
# The whole GPU check of the kernels in one call (planned for < 10 minutes on one H100):
#   1. environment (nvidia-smi, versions); peer-kernel wheels from .whl/ if carried
#   2. the GPU tests: pytest -m gpu tests/kernels/test_gpu.py (parallel with pytest-xdist when present)
#   3. benchmarks/gpu_suite.py: parallel compile warm-up, ceilings, SASS check, correctness sweep,
#      kernel timings with baselines, end-to-end decode
# Everything lands in $OUT (default out/gpu_suite): env.txt, pytest_gpu.txt, suite.log, results.json,
# results.md. Extra arguments go to gpu_suite.py (e.g. --quick, --skip e2e, --layers 16).
# On the device machine:  bash benchmarks/gpu_suite.sh            (name .whl in carry for GemLite)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_suite}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export ABQLLM_CACHE="${ABQLLM_CACHE:-/tmp/abqllm_cache}" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/abqllm_triton_cache}"
unset TRITON_INTERPRET

if ls .whl/*.whl >/dev/null 2>&1; then  # optional peers (GemLite): benchmarks/gpu/fetch_peer_wheels.sh
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/abqllm_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/abqllm_site"
fi

{ date -u; nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2; } > "$OUT/env.txt" 2>&1
head -20 "$OUT/env.txt"

XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
timeout "${PYTEST_BUDGET:-160}" "$PY" -m pytest -q -p no:cacheprovider -m gpu $XDIST tests/kernels/test_gpu.py \
  > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest -m gpu: exit $? ($(tail -1 "$OUT/pytest_gpu.txt"))"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.txt" | head -20

timeout "${SUITE_BUDGET:-420}" "$PY" benchmarks/gpu_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/suite.log" | grep -v "^{" | tail -60
echo "suite exit ${PIPESTATUS[0]}; results in $OUT"
