#!/usr/bin/env bash
# Fetch the benchmark-only competitors (liger-kernel, torchtune) as wheels for the GPU machine, which has no
# network (Python 3.12). They land in .whl/ (git-ignored through .git/info/exclude, never committed); name it in
# the device call's carry (carry=[".whl"]) and benchmarks/gpu_suite.sh installs them with --no-deps into /tmp/site.
# Both are pure-Python wheels; their needs (torch, triton) are on the GPU machine already. torchtune is loaded
# by its kd_losses.py file (its package __init__ needs torchao), see benchmarks/methods.py.
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER=${LIGER_VERSION:-0.8.5}
TORCHTUNE=${TORCHTUNE_VERSION:-0.6.1}
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
rm -f .whl/liger_kernel-*.whl .whl/torchtune-*.whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "liger-kernel==$LIGER" "torchtune==$TORCHTUNE"
ls -la .whl
