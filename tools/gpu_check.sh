#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA (or ROCm) GPU, from a plain working
# tree (nothing installed but torch + triton; no network needed):
#
#   1. make kernelforge importable (editable install, else a shadow package)
#   2. the test suite's Triton cases, run natively on the GPU
#   3. kernelforge aot-check
#   4. tools/gpu_bench.py: copy bandwidth, Triton RMSNorm vs torch peers (table last)
#
#   bash tools/gpu_check.sh          (or: make gpu-check)
#
# Each step has a timeout; the whole script stays under 10 minutes. Output is
# also written to $OUT/gpu_report.txt when $OUT is set (gpu_bench.py writes
# its table to $OUT/gpu_bench.txt as well). Exit status: 0 when every step
# that ran passed; a skipped step (no pytest, no GPU) does not fail it.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
TOTAL_BUDGET_S=540          # hard cap for all steps together (< 10 min with start-up)
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
    # kernels/ is the package kernelforge.kernels (setuptools package-dir), so the
    # repo root on PYTHONPATH is not enough: build a shadow package of symlinks.
    SHADOW=$(mktemp -d -t kernelforge-shadow.XXXXXX)
    CLEANUP+=("$SHADOW")
    mkdir -p "$SHADOW/kernelforge"
    for f in "$REPO"/kernelforge/*; do ln -s "$f" "$SHADOW/kernelforge/"; done
    ln -s "$REPO/kernels" "$SHADOW/kernelforge/kernels"
    export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
    echo "using a shadow package on PYTHONPATH: $SHADOW"
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

if ! $PY -c "import pytest, hypothesis" 2>/dev/null; then
    echo "pytest/hypothesis missing: trying pip (works only if an index or wheel cache is reachable)"
    timeout 45 $PY -m pip install -q --retries 0 --timeout 5 pytest hypothesis pytest-benchmark \
        || echo "pip could not install them"
fi

# -- 2. tests on the GPU ---------------------------------------------------------------
step "2. pytest tests -k triton (HYPOTHESIS_PROFILE=ci; DEVICE is cuda on a GPU)"
export HYPOTHESIS_PROFILE=ci
[ "$HAVE_GPU" = 1 ] || echo "note: no GPU here, so the Triton cases run in the Triton interpreter on CPU"
if $PY -c "import pytest, hypothesis" 2>/dev/null; then
    run_step "tests -k triton" 210 $PY -m pytest -q -p no:cacheprovider tests -k "triton"
else
    echo "SKIPPED: pytest and/or hypothesis are not installed and pip cannot reach an index"
    record "tests -k triton" "skipped (pytest/hypothesis unavailable)"
fi

# -- 3. AOT compile check --------------------------------------------------------------
step "3. kernelforge aot-check"
run_step "kernelforge aot-check" 90 "${KF_CLI[@]}" aot-check

# -- 4. benchmark -------------------------------------------------------------------------
step "4. tools/gpu_bench.py"
if [ "$HAVE_GPU" = 1 ]; then
    run_step "gpu_bench.py" 240 $PY tools/gpu_bench.py
else
    $PY tools/gpu_bench.py      # says there is no GPU and exits 0
    record "gpu_bench.py" "skipped (no GPU)"
fi

step "summary (total $((SECONDS - START))s)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
[ -n "${OUT:-}" ] && echo "report: $OUT/gpu_report.txt"
exit $FAILED
