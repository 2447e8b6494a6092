"""The example backend plug-in (examples/kernelforge-portable-cpp, installed
by `make install`) is found through the entry point like any vendor's,
never becomes a default, and passes the conformance kit at L1."""
import subprocess
import sys

import pytest
import torch

import kernelforge
from kernelforge.backends import registry

pytestmark = pytest.mark.skipif(
    "portable_cpp" not in registry.backends(),
    reason="the example plug-in is not installed (make install installs it: "
           "pip install --no-deps ./examples/kernelforge-portable-cpp)")


def test_found_through_its_entry_point_and_never_a_default():
    assert registry.origin["portable_cpp"] == "kernelforge-portable-cpp"
    assert not registry.builtin("portable_cpp")
    d = registry.select(torch.device("cpu"))
    assert d.backend.name != "portable_cpp"
    text = str(kernelforge.explain("rms_norm", torch.randn(2, 64), torch.ones(64)))
    assert "portable_cpp" in text and "request it with backend='portable_cpp'" in text


def test_its_libraries_are_built_for_the_baseline_cpu():
    from kernelforge.backends import cpp
    flags = registry.backends()["portable_cpp"].compile_flags()
    assert "-march=native" not in flags and any(f.startswith("-march=") for f in flags)
    assert flags != cpp.flags()


def test_conformance_level_1():
    """A few ops of each kind in CI (each compiles its own libraries); the full
    verdict, every op at 30 examples, is in docs/benchmarks.md ('Verdicts')."""
    res = subprocess.run([sys.executable, "-m", "kernelforge.cli", "conformance", "--backend",
                          "portable_cpp", "--examples", "5", "--ops",
                          "rms_norm,silu_and_mul,rotary_embedding,paged_attention,sample"],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verdict: L1" in res.stdout and "FAIL" not in res.stdout
