"""The checkout does not shadow other packages: the op files live inside the
kernelforge package (kernelforge/kernels/), so Python started in the
checkout's root imports Hugging Face's `kernels` (a transformers dependency)
or nothing, never a directory of this repository."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_no_top_level_package_named_kernels_in_the_checkout():
    code = ("import importlib.util, sys; s = importlib.util.find_spec('kernels'); "
            "print(s.origin if s and s.origin else (list(s.submodule_search_locations) "
            "if s else None))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert str(REPO) not in out.stdout, f"`import kernels` from the checkout: {out.stdout}"


def test_the_ops_package_is_kernelforge_kernels():
    import kernelforge.kernels as k
    assert Path(k.__path__[0]).resolve() == REPO / "kernelforge" / "kernels"


def test_the_ops_and_integrations_import_without_the_runtime_extra():
    """gguf, tokenizers and safetensors are the runtime extra's: importing the
    ops, the plugin module and the transformers integration loads none (tqdm,
    also the extra's, is not checked: torch.hub imports it when present)."""
    code = ("import sys, kernelforge.ops, kernelforge.integrations.transformers; "
            "import kernelforge.integrations.vllm; "
            "print(sorted(m for m in ('gguf', 'tokenizers', 'safetensors') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("missing,argv,extra", [
    ("gguf", ["generate", "hi"], "runtime"),
    ("fastapi", ["serve", "--port", "0"], "serve")])
def test_the_engine_commands_name_the_missing_extra(missing, argv, extra):
    """Without the runtime (or serve) extra the engine's commands say what to install."""
    code = (f"import sys; sys.modules[{missing!r}] = None; from kernelforge import cli; "
            f"sys.exit(cli.main({argv!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert f"kernelforge[{extra}]" in out.stderr, out.stderr[-2000:]
