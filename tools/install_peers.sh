#!/usr/bin/env bash
# Install the optional runtime-benchmark peer llama-cpp-python (bench/test_runtime_bench.py,
# bench/runtime_peers.py and bench/cold_start.py measure it in the same run as kernelforge
# when it is importable). It compiles llama.cpp from source: about 8-10 minutes on 2 idle
# cores, 21 minutes with other jobs on them.
#
# Why the flags: the default build (GGML_NATIVE) compiles for the CPU's reported features,
# AMX included where reported; the kernel on these machines does not let a process use AMX
# tiles, so such a build dies with "Illegal instruction" (tilezero) on its first matmul.
# So: GGML_NATIVE off, AMX always off, and each x86 extension on only when /proc/cpuinfo
# lists it (AVX-512 with VBMI/VNNI/BF16 where present, else AVX2+FMA+F16C). A build with
# an extension the CPU lacks also dies with "Illegal instruction".
set -euo pipefail

cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { for f in "$@"; do [[ "$cpu_flags" == *" $f "* ]] || return 1; done; }
onoff() { if has "$@"; then echo ON; else echo OFF; fi; }

# GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw.
avx512=$(onoff avx512f avx512cd avx512vl avx512dq avx512bw)
sub512() { if [[ $avx512 == ON ]]; then onoff "$@"; else echo OFF; fi; }

flags="-DGGML_NATIVE=OFF -DGGML_SSE42=$(onoff sse4_2) -DGGML_AVX=$(onoff avx)"
flags+=" -DGGML_AVX2=$(onoff avx2) -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c)"
flags+=" -DGGML_BMI2=$(onoff bmi2) -DGGML_AVX_VNNI=$(onoff avx_vnni)"
flags+=" -DGGML_AVX512=$avx512 -DGGML_AVX512_VBMI=$(sub512 avx512vbmi)"
flags+=" -DGGML_AVX512_VNNI=$(sub512 avx512_vnni) -DGGML_AVX512_BF16=$(sub512 avx512_bf16)"
flags+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
export CMAKE_ARGS="$flags"
echo "install_peers.sh: CMAKE_ARGS=$CMAKE_ARGS"

export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python3 -m pip install --no-cache-dir "llama-cpp-python==${LLAMA_CPP_VERSION:-0.3.36}"
python3 -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
