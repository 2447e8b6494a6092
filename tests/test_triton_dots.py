"""The Triton lowering's tensor-core products (kernelforge/lower/triton_dots.py):
sums of products printed as ``tl.dot`` with small static axes padded to 16,
16-bit operands behind f32 casts handed over as they are, and an f32 operand
facing a 16-bit one split into hi + lo halves. Checked against float64, in
the interpreter here and natively on a GPU (tools/gpu_check.sh)."""
import pytest
import torch

import ir_kernels as K
import kernelforge
from conftest import DEVICE
from kernelforge.tolerance import assert_close


@pytest.mark.parametrize("G, N, D", [(1, 16, 64), (3, 48, 80), (4, 32, 128), (7, 20, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sums_of_products_run_as_tensor_core_products(G, N, D, dtype):
    """q.k (both operands 16-bit behind a cast) and p.v (f32 scores against
    16-bit values: hi + lo) against float64; G below 16 is padded to 16 rows
    and masked (G=1, 3, 7), N and D that are not powers of two too."""
    g = torch.Generator().manual_seed(G * 1000 + N + D)
    # non-negative values: each sum's error stays relative to its value
    q = torch.rand(3, G, D, generator=g).to(dtype).to(DEVICE)
    k, v = (torch.rand(3, N, D, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    s = torch.full((3, G, N), float("nan"), device=DEVICE)
    o = torch.full((3, G, D), float("nan"), device=DEVICE)
    args = (q, k, v, s, o)
    src = kernelforge.dispatch.source(K.contractions, args, "triton")
    assert src.count("tl.dot(") == (2 if dtype == torch.float32 else 3), src
    assert "tl.arange(0, 16)" in src and f"mask_g = offs_g < {G}" in src   # G padded to 16
    assert ("_hi = " in src) == (dtype != torch.float32)                    # p as hi + lo
    kernelforge.launch(K.contractions, *args, backend="triton")
    want_s = torch.einsum("rgd,rnd->rgn", q.double(), k.double())
    assert_close(s.cpu(), want_s.cpu(), torch.float32, "q.k")
    want_o = torch.einsum("rgn,rnd->rgd", want_s, v.double())
    assert_close(o.cpu(), want_o.cpu(), torch.float32, "p.v")


def test_paged_decode_never_builds_its_product_block():
    """Paged decode's q.k and p.v are tl.dots: the generated module never
    builds a [G, N, D] product."""
    from kernelforge.kernels.attention import paged_attention_kernel
    kdef = paged_attention_kernel(False)
    q = torch.zeros(2, 8, 4, 128, dtype=torch.bfloat16)
    kc = torch.zeros(4, 16, 8, 128, dtype=torch.bfloat16)
    i32 = lambda *s: torch.zeros(*s, dtype=torch.int32)  # noqa: E731
    args = (q, kc, kc, i32(2, 2), i32(2), i32(2), i32(2), i32(32), torch.empty_like(q), 1.0, 0.0)
    src = kernelforge.dispatch.source(kdef, args, "triton")
    # q.k, then p.v as hi + lo, in each of the key loop's two copies (the
    # unmasked interior, then the masked edges: triton_loops.split_loop)
    assert src.count("tl.dot(") == 6
    assert "[:, :, None]" not in src and "[:, None, :]" not in src   # no 3-D product
