#!/usr/bin/env bash
# The CPU decode benchmark (issue: fast CPU inference): abqllm's engines against llama.cpp on the default model,
# batch 1, 128-token prompt, 128 new tokens, 2 threads, every configuration in a fresh process.
# Needs llama-cpp-python for the llama.cpp rows (see README, "CPU inference"). Run it on an idle machine:
# two OpenMP threads on a loaded 2-core machine measure the scheduler, not the kernels.
# Usage: bash benchmarks/cpu_bench.sh [OUT_DIR]   (default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
COMMON=(--model smollm2-135m --prompt-len 128 --new-tokens 128 --threads 2 --runs 3)
uptime
# Four interleaved rounds (every configuration, ours and llama.cpp's, once per round; medians of the rounds):
# single passes on this VM drifted by up to 15% within an hour, which moved the verdict.
abq bench cpu "${COMMON[@]}" --rounds 4 \
  --configs 'float,W8A8,W4A16,W4A8,W3A8,W2*A8,W4A8+head8,W4A16+head8,W2*A8+head8' \
  --gguf-formats Q4_1,Q8_0,Q4_0,Q2_K --json "$OUT/cpu_bench_smollm2-135m.json"
uptime
# What the native step buys: the same packed models on the bit-exact engines.
for engine in exact python; do
  abq bench cpu "${COMMON[@]}" --configs 'W4A8,W4A8+head8' --engine $engine --llama-cpp off \
    --json "$OUT/cpu_bench_smollm2-135m_$engine.json"
done
uptime
