"""silu_and_mul (kernels/activation.py): every backend against a float64
formula and against eager torch's ``F.silu(gate) * up``, under the one
tolerance policy; bad input names the argument."""
import pytest
import torch
from hypothesis import given, strategies as st

import kernelforge
from kernelforge.tolerance import assert_close
from conftest import BACKENDS, DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# the compiling backends build once per (dtype, d): a few sizes keep the suite short
D = {"eager": st.integers(1, 3000), "inductor": st.sampled_from([1536, 7]),
     "triton": st.sampled_from([1, 7, 64, 1536]), "cpp": st.sampled_from([1, 7, 1536])}
MAX_ROWS = {"eager": 9, "inductor": 9, "triton": 9 if DEVICE.type == "cuda" else 3, "cpp": 9}
silu_and_mul = kernelforge.ops.silu_and_mul


def reference(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float64, gate and up the halves of the last dim."""
    g, u = x.double().chunk(2, dim=-1)
    return g / (1 + torch.exp(-g)) * u


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_silu_and_mul_matches_float64(backend, data):
    d = data.draw(D[backend])
    dtype = data.draw(st.sampled_from(DTYPES))
    rows = data.draw(st.integers(0, MAX_ROWS[backend]))
    strided = data.draw(st.booleans())
    scale = data.draw(st.sampled_from([1e-2, 1.0, 8.0]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1)))
    base = (torch.randn(rows, 2 * d + 3, generator=g) * scale).to(dtype).to(DEVICE)
    x = base[:, 1:1 + 2 * d] if strided else base[:, :2 * d].contiguous()
    y = silu_and_mul(x, backend=backend)
    assert y.shape == (rows, d) and y.dtype == dtype
    assert_close(y, reference(x), dtype, f"silu_and_mul {backend} {dtype} rows={rows} d={d}")
    if dtype == torch.float32:
        # eager torch as a second reference only in fp32: in 16-bit dtypes it
        # rounds twice too (silu, then the product), and a 1-ulp difference in
        # the rounded silu (another exp) becomes 2 ulps of the product, which
        # the 16-bit tolerance (set for one result against float64) does not cover
        gate, up = x.chunk(2, dim=-1)
        assert_close(y, torch.nn.functional.silu(gate) * up, dtype, "against eager torch")


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_out_and_leading_dims(backend):
    x = torch.randn(2, 3, 64, device=DEVICE)
    out = torch.full((2, 3, 32), float("nan"), device=DEVICE)
    assert silu_and_mul(x, out=out, backend=backend) is out
    assert_close(out, reference(x), torch.float32, "out=")
    # an out whose rows cannot be viewed as [rows, d]: computed in a copy, copied back
    big = torch.full((3, 4, 40), float("nan"), device=DEVICE)
    o = big.transpose(0, 1)[:, :, :32]
    x = torch.randn(4, 3, 64, device=DEVICE)
    assert silu_and_mul(x, out=o, backend=backend) is o
    assert_close(o, reference(x), torch.float32, "out= not viewable")


@pytest.mark.parametrize("kw,match", [
    (dict(x=torch.randn(4, 7)), "`x`.*even last dim"),
    (dict(x=torch.randint(0, 3, (4, 8))), "`x`"),
    (dict(x=torch.randn(4, 8).t()), "`x`"),
    (dict(x=torch.randn(4, 8), out=torch.empty(4, 8)), "`out`"),
    (dict(x=torch.randn(4, 8), out=torch.empty(4, 4, dtype=torch.float64)), "`out`"),
    (dict(x=torch.randn(4, 8), backend="nope"), "nope"),
])
def test_bad_input_names_the_argument(kw, match):
    x = kw.pop("x")
    with pytest.raises((ValueError, TypeError), match=match):
        silu_and_mul(x, **kw)


def test_custom_op_in_a_compiled_graph():
    x = torch.randn(5, 16)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return torch.ops.kernelforge.silu_and_mul(x, None) + 1
    assert_close(f(x), reference(x) + 1, torch.float32, "compiled")
