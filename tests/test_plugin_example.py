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


def _conformance(ops: str, examples: int) -> str:
    res = subprocess.run([sys.executable, "-m", "kernelforge.cli", "conformance", "--backend",
                          "portable_cpp", "--examples", str(examples), "--ops", ops],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verdict: L1" in res.stdout and "FAIL" not in res.stdout
    return res.stdout


def test_conformance_level_1():
    """One op of each kind the plug-in's flags (-march=x86-64-v2: no AVX, no
    F16C, so _Float16 is emulated) could break, each compiling its own
    libraries: row reductions and bf16 (rms_norm), exp (silu_and_mul), position
    gathers (rotary_embedding), paged attention with its split/combine and f16
    (paged_attention), at 5 examples; and sample, the only op with integer and
    bit work (Philox, float-order keys, the radix search), at 2 examples: one
    f32 library instead of three (sample_rows is ~8000 lines of C++, ~15 s a
    build; its f16/bf16 variants differ only in the logits load, which
    paged_attention and rms_norm check in f16 and bf16), in this process (the
    command line, in a fresh one, judged the other four). The full verdict,
    every op at 30 examples, is in docs/benchmarks.md ('Verdicts')."""
    from kernelforge import conformance
    out = _conformance("rms_norm,silu_and_mul,rotary_embedding,paged_attention", 5)
    assert all(op in out for op in ("rms_norm", "silu_and_mul", "rotary_embedding",
                                    "paged_attention"))
    report = conformance.run(backend="portable_cpp", device="cpu", ops=["sample"], examples=2)
    assert report["level"] == 1 and [op["op"] for op in report["ops"]] == ["sample"], \
        conformance.table(report)
