#!/usr/bin/env bash
# What a device call carries to the GPU machine (Python 3.12, no network, no ../shared beside the checkout):
# - .whl/: the wheels it lacks: the benchmark-only competitors (liger-kernel, torchtune) and the evaluation tests'
#   rouge-score (built here from its sdist; pure Python) with its need nltk;
# - .data/: a copy of ../shared/data (TOFU, its official logs, WikiText; ~10 MB) for the tests, found there through
#   RKLU_DATA_DIR (benchmarks/gpu_suite.sh sets it). Both folders are git-ignored (.git/info/exclude), never committed.
# Then: device run with carry=[".whl", ".data"] and command `bash benchmarks/gpu_suite.sh`, which installs the
# wheels with --no-deps into /tmp/site. They are pure Python; their needs (torch, triton) are on the GPU machine
# already. torchtune is loaded by its kd_losses.py file (its package __init__ needs torchao), see methods.py.
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER=${LIGER_VERSION:-0.8.5}
TORCHTUNE=${TORCHTUNE_VERSION:-0.6.1}
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
for d in /.whl/ /.data/; do grep -qxF "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >> "$EXCLUDE"; done
rm -f .whl/liger_kernel-*.whl .whl/torchtune-*.whl .whl/rouge_score-*.whl .whl/nltk-*.whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "liger-kernel==$LIGER" "torchtune==$TORCHTUNE" "nltk==${NLTK_VERSION:-3.10.4}"
python3 -m pip wheel --no-deps -q -w .whl "rouge-score==${ROUGE_VERSION:-0.1.2}"
ls -la .whl
SHARED_DATA=${SHARED_DATA:-../shared/data}
if [ -d "$SHARED_DATA" ]; then
  rm -rf .data && cp -r "$SHARED_DATA" .data && du -sh .data
else
  echo "no $SHARED_DATA here: the data-reading tests will skip or fail on the GPU machine" >&2
fi
