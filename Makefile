# The two set-up commands of the README. Each installs what it needs first.
PY ?= python3

.PHONY: install demo test bench gpu-check gpu-wheels
install:
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"

demo: install
	$(PY) -m kernelforge.cli demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: install
	$(PY) -m pytest bench/ --benchmark-only

gpu-check:
	bash tools/gpu_check.sh

# pytest, hypothesis and pytest-benchmark wheels for a GPU machine without an
# index (tools/gpu_check.sh installs from .gpu_wheels/ when they are missing)
gpu-wheels:
	for v in 3.10 3.11 3.12 3.13; do python3 -m pip download -q -d .gpu_wheels --only-binary=:all: --python-version $$v pytest hypothesis pytest-benchmark; done
