"""The gated activation of a SwiGLU MLP, written once in the kernel IR.

    silu_and_mul(x) = silu(x[..., :d]) * x[..., d:]

vLLM's ``silu_and_mul`` (Llama, Mistral, Qwen2 MLPs): the gate and up
projections come out of one matmul as one [..., 2d] tensor, and this reads
both halves and writes the product in one pass over memory, where eager torch
makes three (silu, then the product). Rounding follows eager torch
(``F.silu(gate) * up``): silu computed in fp32 and rounded to the input dtype,
then the product computed in fp32 and rounded again, so a model that switches
to this op keeps its numbers.
"""
from typing import Optional

import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.backends import registry
from kernelforge.dispatch import NewTensor, launch


@kl.kernel(static=("D",), examples=({"D": 1536}, {"D": 14336}))
def silu_and_mul_fwd(gate: kl.In("M", "D"), up: kl.In("M", "D"), out: kl.Out("M", "D")):
    m = kl.parallel("M")

    def body(d):
        g = kl.load(gate[m, d]).to(kl.f32)
        act = (g * kl.sigmoid(g)).to(out.dtype).to(kl.f32)     # F.silu's rounding
        kl.store(out[m, d], (act * kl.load(up[m, d]).to(kl.f32)).to(out.dtype))

    kl.seq_for("D", body)


def _impl(x: torch.Tensor, out: Optional[torch.Tensor], backend: Optional[str]) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2, _ = checks.rows(x)              # a copy at worst: only read
    if out is None:
        if not x2.shape[0]:
            return torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
        (y,) = launch(silu_and_mul_fwd, x2[:, :d], x2[:, d:],
                      NewTensor((x2.shape[0], d), x.dtype, x.device), backend=backend)
        return y.view(*x.shape[:-1], d)
    out2, copied = checks.rows(out)
    if x2.shape[0]:
        launch(silu_and_mul_fwd, x2[:, :d], x2[:, d:], out2, backend=backend)
    if copied:
        out.copy_(out2.view(out.shape))
    return out


def silu_and_mul(x: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]``, the SwiGLU gate, in one pass.

    Args:
        x: [..., 2d] float32, bfloat16 or float16 (gate then up, as a fused
            gate/up matmul writes them); the last dim contiguous and even.
        out: optional [..., d] output, x's dtype.
        backend: "eager", "inductor", "triton", "cpp" or None (chosen per device).
    Returns:
        [..., d] in x's dtype (``out`` when given).

    Example:
        >>> h = kernelforge.ops.silu_and_mul(x @ w_gate_up.T)   # [T, 2 * 1536] -> [T, 1536]
    """
    op = "silu_and_mul"
    checks.tensor(op, "x", x)
    checks.at_least_1d(op, "x", x)
    checks.float_dtype(op, "x", x)
    checks.last_dim_contiguous(op, "x", x)
    if x.shape[-1] % 2:
        checks.fail(op, "x", "an even last dim (gate and up halves)", f"shape {list(x.shape)}")
    if out is not None:
        checks.tensor(op, "out", out)
        checks.shape(op, "out", out, (*x.shape[:-1], x.shape[-1] // 2),
                     " (`x`'s shape with half its last dim)")
        checks.same_dtype(op, "out", out, "x", x)
        checks.same_device(op, "out", out, "x", x)
        checks.last_dim_contiguous(op, "out", out)
    if checks.opaque():
        y = torch.ops.kernelforge.silu_and_mul(x, backend)
        return y if out is None else out.copy_(y)
    if not torch.compiler.is_compiling():
        registry.select(x.device, backend)      # an unknown backend fails even for 0 rows
    return _impl(x, out, backend)


# -- torch.library custom op: an opaque, compile-safe entry point for engines ---------

@torch.library.custom_op("kernelforge::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    return _impl(x, None, backend)


@_silu_and_mul_op.register_fake
def _(x, backend):
    return torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
