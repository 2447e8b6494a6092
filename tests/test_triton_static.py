"""What the compiler makes of the attention kernels Triton runs by default
on an H100/H200 (sm_90, bf16, tools/gpu_bench.py's shapes), with no GPU:
tensor-core instructions present, no register spills (tools/
triton_static_stats.py; ptxas and cuobjdump ship with Triton). A guard for
the GPU path between the sessions that get a GPU: a change that drops the
tensor cores or makes the kernels spill fails here first."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def static_stats():
    triton = pytest.importorskip("triton")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip("Triton's ptxas/cuobjdump are not installed")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import triton_static_stats
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return lambda kdef, sizes: triton_static_stats.stats(
        kdef, triton_static_stats.bf16_dtypes(kdef), sizes, "sm_90")


def test_default_prefill_uses_wgmma_without_spills(static_stats):
    from kernelforge.kernels import attention_kernels as A
    kdef = A.attention_kernel(False, 128, True)      # round_p: Triton's default for bf16
    s = static_stats(kdef, {"HK": 32, "G": 1, "D": 128})
    assert s["spill st/ld"] == "0/0", s
    assert s["wgmma"] > 0, s
    assert s["mufu.ex2"] > 0, s                       # the base-2 softmax


def test_default_paged_decode_uses_mma_without_spills(static_stats):
    from kernelforge.kernels import attention_kernels as A
    kdef = A.paged_attention_kernel(False, True)
    s = static_stats(kdef, {"HK": 8, "G": 4, "D": 128, "BS": 16})
    assert s["spill st/ld"] == "0/0", s
    assert s["mma"] > 0, s
