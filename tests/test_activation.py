"""Gated activations (kernelforge/kernels/activation.py) beyond their specs' generated
tests (tests/test_ops.py): torch's own F.silu / F.gelu as a second
reference, out= with rows that cannot be viewed, the custom op in a graph."""
import pytest
import torch

import kernelforge
from kernelforge.tolerance import assert_close
from conftest import BACKENDS, DEVICE

silu_and_mul = kernelforge.ops.silu_and_mul


def reference(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float64, gate and up the halves of the last dim."""
    g, u = x.double().chunk(2, dim=-1)
    return g / (1 + torch.exp(-g)) * u


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_torchs_own_activations(backend):
    """fp32: within the policy of F.silu(g) * u and F.gelu(g, approximate="tanh") * u
    (the same formulas; only each lowering's exp/tanh differs, docs/tolerance.md)."""
    x = torch.randn(6, 2 * 96, device=DEVICE) * 4
    g, u = x.chunk(2, dim=-1)
    f = torch.nn.functional
    assert_close(kernelforge.ops.silu_and_mul(x, backend=backend), (f.silu(g) * u).double(),
                 torch.float32, f"silu_and_mul[{backend}] vs torch")
    assert_close(kernelforge.ops.gelu_tanh_and_mul(x, backend=backend),
                 (f.gelu(g, approximate="tanh") * u).double(), torch.float32,
                 f"gelu_tanh_and_mul[{backend}] vs torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eager_rounds_as_torch_composes_it(dtype):
    """The reference lowering runs torch's own formula and rounding points
    (silu = g / (1 + exp(-g)), rounded to the dtype, times up): bit for bit.
    x * sigmoid(x), used before, differed by 1-2 ulp."""
    x = (torch.randn(64, 2 * 257) * 4).to(dtype)
    g, u = x.float().chunk(2, dim=-1)
    want = ((g / (1 + torch.exp(-g))).to(dtype).float() * u).to(dtype)
    assert torch.equal(kernelforge.ops.silu_and_mul(x, backend="eager"), want)
