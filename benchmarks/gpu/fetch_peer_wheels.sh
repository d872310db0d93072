#!/usr/bin/env bash
# Build the optional peer-kernel wheel (GemLite, pure Python + Triton) into .whl/ so a GPU run can carry it
# (the GPU machine has no package registry). Run here, in the repository root, then name .whl in `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
tmp=$(mktemp -d)
python3 -m pip download --no-deps --no-binary=:all: -d "$tmp" "gemlite==${GEMLITE_VERSION:-0.6.0.post2}"
python3 -m pip wheel --no-deps --no-build-isolation -w .whl "$tmp"/gemlite-*.tar.gz
ls -la .whl
