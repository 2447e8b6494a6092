#!/usr/bin/env bash
# Install the optional runtime-benchmark peer llama-cpp-python (bench/test_runtime_bench.py
# and bench/runtime_peers.py, `make bench-runtime`, measure it in the same run as kernelforge
# when it is importable). It compiles llama.cpp
# from source: about 8-10 minutes on 2 cores.
#
# Why the flags: the default build (GGML_NATIVE) compiles for this CPU, which reports AMX;
# this machine's kernel does not let a process use AMX tiles, so the native build dies
# with "Illegal instruction" (tilezero) on its first matmul. Build for AVX-512 with
# VNNI and BF16 instead, AMX off: the kernels llama.cpp uses on such CPUs without AMX.
set -euo pipefail
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
 -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python3 -m pip install --no-cache-dir "llama-cpp-python==${LLAMA_CPP_VERSION:-0.3.36}"
python3 -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
