# The two set-up commands of the README. Each installs what it needs first.
PY ?= python3

.PHONY: install demo test bench gpu-check
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
