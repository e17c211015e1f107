#!/usr/bin/env bash
# The GPU suite of the GPU-validation issue, for ONE call on a lent H100/H200 (Python 3.12, torch 2.11, triton 3.6,
# no network): build the extension, run the GPU tests, compute-sanitizer memcheck on the CUDA kernel, the full
# launch-shape sweep (benchmarks/tune_kernels.py), the loss benchmark, the fused linear loss benchmark and the
# training-step benchmark, within SUITE_BUDGET_S seconds (default 540). Everything lands in $OUT (default ./out):
# suite.log, suite.json, tune_kernels_*.json, bench_loss_*.{json,md,png}, bench_fused_linear_*.{json,md,png},
# train_step_*.{json,md}.
#
#   bash benchmarks/gpu_suite.sh                        # all steps: build,test,errpath,sanitize,tune,bench,train
#   bash benchmarks/gpu_suite.sh --steps build,whole,bench   # whole 7B + Phi-1.5 RKLU runs, then the loss bench
#       (with BENCH_ARGS="--n 16384 --v 32000": the one-call plan when the kernels did not change)
#   bash benchmarks/gpu_suite.sh --steps build,bench    # a second call for the benchmark rows a budget cut
#   bash benchmarks/gpu_suite.sh --steps build,fused    # the fused linear benchmark in a call of its own
#   bash benchmarks/gpu_suite.sh --dry-run              # anywhere, on CPU: tiny shapes, same JSON schema
#
# BENCH_ARGS (environment) is appended to bench_loss.py's arguments, e.g. BENCH_ARGS="--n 16384 --v 32000";
# FUSED_ARGS to bench_fused_linear.py's, e.g. FUSED_ARGS="--dv 4096:128256 --n 16384".
# Missing wheels travel in .whl/ and the test data in .data/ (benchmarks/prepare_gpu_carry.sh; carry=[".whl", ".data"]).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
BUDGET=${SUITE_BUDGET_S:-540}
PY=${PYTHON:-python3}
STEPS=build,test,errpath,sanitize,tune,bench,train
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --steps) STEPS=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "usage: $0 [--dry-run] [--steps build,test,errpath,sanitize,tune,whole,bench,fused,train] [--budget SECONDS]" >&2
       exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
LOG=$OUT/suite.log
STEPS_TSV=$(mktemp)
START=$(date +%s)
export PYTHONUNBUFFERED=1
: > "$LOG"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

# step NAME TIMEOUT_S CMD...: run with a time limit, output to the log and the terminal, record rc and seconds.
step() {
  local name=$1 limit=$2; shift 2
  if ! wanted "$name"; then printf '%s\tnot requested\t\t0\n' "$name" >> "$STEPS_TSV"; return 0; fi
  if [ "$DRY" = 1 ] && [ "$name" != bench ] && [ "$name" != fused ]; then
    echo "[dry-run] would run ($name, <= ${limit}s): $*" | tee -a "$LOG"
    printf '%s\tskipped (dry-run)\t\t0\n' "$name" >> "$STEPS_TSV"; return 0
  fi
  if [ "$limit" -le 10 ]; then
    echo "=== $name: skipped, suite budget used up" | tee -a "$LOG"
    printf '%s\tskipped (budget)\t\t0\n' "$name" >> "$STEPS_TSV"; return 0
  fi
  echo "=== $name (<= ${limit}s): $*" | tee -a "$LOG"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local status=ok; [ "$rc" != 0 ] && status=failed; [ "$rc" = 124 ] && status=timeout
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS_TSV"
  echo "=== $name: $status (rc=$rc, $(( $(date +%s) - t0 ))s)" | tee -a "$LOG"
}

if [ "$DRY" = 0 ]; then
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true; } | tee -a "$LOG"
  if [ -d .data ]; then export RKLU_DATA_DIR=$PWD/.data; fi  # ../shared does not travel to the GPU machine
  if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels: benchmark-only competitors, never runtime deps
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      2>&1 | tee -a "$LOG" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/ wheels carried: liger-kernel/torchtune rows will say 'not installed'" | tee -a "$LOG"
  fi
fi

build() {
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} $PY -m pip install --no-build-isolation --no-deps -v -e . \
    > /tmp/rklu_build.log 2>&1
  local rc=$?
  grep -E "registers|spill|error" /tmp/rklu_build.log | tail -40
  [ "$rc" = 0 ] || tail -40 /tmp/rklu_build.log
  $PY -c "import json, rklu_fast; print('backends:', json.dumps(rklu_fast.backends()))"
  return $rc
}

sanitize() {  # one small CUDA-kernel run (forward + backward, ignored rows, both vocab sizes) under memcheck
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found: skipped"; return 0; }
  compute-sanitizer --tool memcheck --error-exitcode 3 $PY - <<'EOF'
import torch, rklu_fast
assert rklu_fast.backends()["cuda"]["usable"], rklu_fast.backends()["cuda"]
for v in (32000, 51200):
    s, o, a = (torch.randn(64, v, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    s.requires_grad_(True)
    labels = torch.randint(0, v, (64,), device="cuda"); labels[::3] = -100
    loss = rklu_fast.reverse_kl_loss(s, o, a, alpha=8.0, labels=labels, backend="cuda")
    loss.backward()
    torch.cuda.synchronize()
    print(f"V={v}: loss {loss.item():.4f}, grad finite: {bool(s.grad.isfinite().all())}")
EOF
}

train_step() {
  if [ -f benchmarks/bench_train_step.py ]; then
    $PY benchmarks/bench_train_step.py --device cuda --out "$OUT"
  else
    echo "benchmarks/bench_train_step.py does not exist yet: skipped"
  fi
}

whole() {  # the whole RKLU run, timed from process start (benchmarks/whole_run.py), 7B then Phi-1.5
  local rc=0
  $PY benchmarks/whole_run.py --arch llama2-7b --run-dir /tmp/whole-7b --out "$OUT" || rc=$?
  rm -rf /tmp/whole-7b  # 3 x 13.5 GB: the machine has 64 GiB of disk
  $PY benchmarks/whole_run.py --arch phi-1.5 --run-dir /tmp/whole-phi --out "$OUT" || rc=$?
  rm -rf /tmp/whole-phi
  return $rc
}

export -f build sanitize train_step whole
export PY OUT
errpath() {  # on the H100 image (torch 2.11) the CPU op's error path crashed the test process: probe it alone
  $PY -X faulthandler -m pytest -q -p no:cacheprovider "$ERRPATH_TEST" 2>&1 | tail -15
  return "${PIPESTATUS[0]}"
}

export -f errpath
export ERRPATH_TEST=tests/test_cpp_extension.py::test_bad_arguments_name_the_argument
step build 240 bash -c build
step test "$(( $(left) < 200 ? $(left) : 200 ))" $PY -m pytest -q -m "not slow" -p no:cacheprovider tests \
  --deselect "$ERRPATH_TEST"
step errpath 60 bash -c errpath
step sanitize "$(( $(left) < 150 ? $(left) : 150 ))" bash -c sanitize
step tune "$(( $(left) < 120 ? $(left) : 120 ))" $PY benchmarks/tune_kernels.py --out "$OUT"
step whole "$(( $(left) < 420 ? $(left) : 420 ))" bash -c whole
TRAIN_RESERVE=0; wanted train && [ -f benchmarks/bench_train_step.py ] && [ "$DRY" = 0 ] && TRAIN_RESERVE=130
# The fused linear benchmark takes what is left (a call of its own: --steps build,fused), or 150 s after bench
FUSED_RESERVE=0; wanted fused && [ "$DRY" = 0 ] && FUSED_RESERVE=150
if [ "$DRY" = 1 ]; then
  step bench 300 $PY benchmarks/bench_loss.py --dry-run --out "$OUT" ${BENCH_ARGS:-}
  if wanted fused; then step fused 120 $PY benchmarks/bench_fused_linear.py --dry-run --out "$OUT" ${FUSED_ARGS:-}; fi
else  # the benchmarks cut their own lowest-priority rows (reported "skipped") to end 30 s before their step limit
  BENCH_LIMIT=$(( $(left) - TRAIN_RESERVE - FUSED_RESERVE ))
  step bench "$BENCH_LIMIT" $PY benchmarks/bench_loss.py --device cuda --out "$OUT" --time-budget $(( BENCH_LIMIT - 30 )) \
    ${BENCH_ARGS:-}
  if wanted fused; then
    FUSED_LIMIT=$(( $(left) - TRAIN_RESERVE ))
    step fused "$FUSED_LIMIT" $PY benchmarks/bench_fused_linear.py --device cuda --out "$OUT" \
      --time-budget $(( FUSED_LIMIT - 30 )) ${FUSED_ARGS:-}
  fi
fi
step train "$(left)" bash -c train_step

$PY - "$STEPS_TSV" "$OUT" "$DRY" "$BUDGET" "$START" <<'EOF'
import datetime, glob, json, os, sys, time
tsv, out, dry, budget, start = sys.argv[1:]
steps = []
for line in open(tsv):
    name, status, rc, secs = line.rstrip("\n").split("\t")
    steps.append({"name": name, "status": status, "rc": int(rc) if rc else None, "seconds": int(secs)})
json.dump({"schema": "rklu_fast.gpu_suite/1", "dry_run": dry == "1",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "budget_s": int(budget), "wall_s": round(time.time() - int(start)), "steps": steps,
           "bench_json": sorted(glob.glob(os.path.join(out, "bench_loss_*.json"))
                                + glob.glob(os.path.join(out, "bench_fused_linear_*.json")))},
          open(os.path.join(out, "suite.json"), "w"), indent=1)
print("suite:", ", ".join(f"{s['name']}={s['status']}" for s in steps), f"({round(time.time() - int(start))}s)")
EOF
FAILED=$(cut -f2 "$STEPS_TSV" | grep -cE '^(failed|timeout)$')
rm -f "$STEPS_TSV"
# The reply carries the end of the output: finish with the benchmark's verdicts and table head.
for md in "$OUT"/bench_loss_*.md "$OUT"/bench_fused_linear_*.md; do [ -f "$md" ] && head -30 "$md"; done
[ "$FAILED" = 0 ]
