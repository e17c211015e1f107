#!/usr/bin/env bash
# The package as `pip install` gives it, not the source tree (the editable install of `make install` would hide a file
# missing from the wheel): build a wheel, install it into a fresh venv that borrows the project venv's dependencies
# (a .pth line: no copies, no network), and run it from outside the repository:
#   .ci/wheel_smoke.py   the wheel's contents, its declared dependencies, the loss on every CPU backend vs float64;
#   `rklu --help`, and the tiny pipeline's first two optimizer steps.
# Usage: .ci/wheel_check.sh [PYTHON]   (default: .venv/bin/python; called by `make test`)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$REPO/.venv/bin/python}"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, not resolved: the venv's own interpreter
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH

echo "--- wheel check: building the wheel"
"$PY" -m pip wheel --no-build-isolation --no-deps -q -w "$WORK/dist" "$REPO" > "$WORK/build.log" 2>&1 \
    || { tail -60 "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/rklu_fast-*.whl)"

# A venv of the same interpreter, without pip; the project venv's site-packages follow it on sys.path (a .pth line
# adds the folder but runs none of its .pth files, so the editable install there stays out of sight).
"$PY" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib']); print(sysconfig.get_paths()['platlib'])" \
    | sort -u > "$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/project-venv.pth"
"$VPY" -m pip install --no-deps --no-index -q "$WHEEL" 2>&1 | { grep -v "outside environment" || true; }

cd "$WORK"  # never the repository: `import rklu_fast` must find the installed wheel
echo "--- wheel check: contents, dependencies, loss on every CPU backend"
TRITON_INTERPRET=1 "$VPY" "$REPO/.ci/wheel_smoke.py" --wheel "$WHEEL" --repo "$REPO" --venv "$WORK/venv"

echo "--- wheel check: rklu --help"
"$WORK/venv/bin/rklu" --help > help.txt
grep -q "^usage: rklu" help.txt || { cat help.txt; exit 1; }

echo "--- wheel check: the tiny pipeline's first steps"
set +e
RKLU_DATA_DIR="${RKLU_DATA_DIR:-$REPO/../shared/data}" "$WORK/venv/bin/rklu" run \
    --config "$REPO/configs/tiny-tofu.yaml" --stop-after-steps 2 run_dir="$WORK/run" > run.log 2>&1
rc=$?
set -e
# exit code 3: stopped early on request (--stop-after-steps), as rklu's CLI documents
[ "$rc" = 3 ] || { tail -40 run.log; echo "rklu run exited $rc, expected 3 (stopped after 2 steps)"; exit 1; }
"$VPY" - "$WORK/run" <<'EOF'
import json, math, sys
from pathlib import Path
logs = list(Path(sys.argv[1]).glob("*/log.jsonl"))
assert len(logs) == 1, f"expected the log of one stage, found {logs}"
steps = [json.loads(line) for line in logs[0].read_text().splitlines() if line.strip()]
assert [s["step"] for s in steps] == [1, 2], steps
assert all(math.isfinite(s["loss"]) for s in steps), steps
print(f"{logs[0].parent.name}: steps 1-2, loss {steps[0]['loss']:.4f} -> {steps[1]['loss']:.4f}")
EOF
echo "--- wheel check passed"
