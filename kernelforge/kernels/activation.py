"""The gated activations of transformer MLPs, written once in the kernel IR.

    silu_and_mul(x)      = silu(x[..., :d]) * x[..., d:]          (SwiGLU: Llama, Mistral, Qwen2)
    gelu_tanh_and_mul(x) = gelu_tanh(x[..., :d]) * x[..., d:]     (GeGLU: Gemma)

vLLM's ops of those names: the gate and up projections come out of one
matmul as one [..., 2d] tensor, and these read both halves and write the
product in one pass over memory, where eager torch makes three. Rounding
follows eager torch (``F.silu(gate) * up``, ``F.gelu(gate, approximate="tanh")
* up``): the activation computed in fp32 with torch's formula, rounded to the
input dtype, then the product computed in fp32 and rounded again. Results
match torch's up to the fp32 ``exp``/``tanh`` of each lowering (a few ulp of
fp32 before the final rounding; docs/tolerance.md).
"""
import math

import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.dispatch import kernel_factory, launch
from kernelforge.spec import (Backend, Bad, Call, OpSpec, Out, Output, Tensor, bench, resize_rows,
                              rowwise)

_GELU_BETA = math.sqrt(2.0 / math.pi)
_GELU_KAPPA = 0.044715


def _silu(g):
    return g / (1.0 + kl.exp(-g))                       # torch's formula


def _gelu_tanh(g):
    inner = _GELU_BETA * (g + _GELU_KAPPA * (g * g * g))
    return 0.5 * g * (1.0 + kl.tanh(inner))             # torch's formula and order


ACTIVATIONS = {"silu": _silu, "gelu_tanh": _gelu_tanh}


@kernel_factory
def gated_kernel(act: str) -> kl.KernelDef:
    """``act(gate) * up`` row by row; ``act`` one of ACTIVATIONS."""
    fn_act = ACTIVATIONS[act]

    def gated(gate: kl.In("M", "D"), up: kl.In("M", "D"), out: kl.Out("M", "D")):
        m = kl.parallel("M")

        def body(d):
            g = kl.load(gate[m, d]).to(kl.f32)
            a = fn_act(g).to(out.dtype).to(kl.f32)          # rounded as torch rounds it
            kl.store(out[m, d], (a * kl.load(up[m, d]).to(kl.f32)).to(out.dtype))

        kl.seq_for("D", body)

    gated.__name__ = gated.__qualname__ = f"{act}_and_mul_fwd"
    return kl.kernel(gated, static=("D",), examples=({"D": 1536}, {"D": 14336}))


silu_and_mul_fwd = gated_kernel("silu")


def _even_last(op, a):
    if a.x.shape[-1] % 2:
        checks.fail(op, "x", "an even last dim (gate and up halves)", f"shape {list(a.x.shape)}")


def _half(a):
    return (*a.x.shape[:-1], a.x.shape[-1] // 2)


def reference(x, act: str = "silu"):
    """act(gate) * up in float64, gate and up the halves of the last dim."""
    g, u = x.double().chunk(2, dim=-1)
    if act == "silu":
        return g / (1 + torch.exp(-g)) * u
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * u


def _samples(st, budget):
    @st.composite
    def draw(draw):
        x, dtype, _ = budget.row_input(draw, [3072, 14, 2],
                                       st.integers(1, 3000).map(lambda d: 2 * d), [1e-2, 1.0, 8.0])
        return Call(dict(x=x), f"{list(x.shape)} {dtype}")
    return draw()


def _cost(a):
    n = a.x.numel()
    return (n + n // 2) * a.x.element_size(), 3 * n


def _peer(act: str):
    def peer(a):
        g, u = a.x.chunk(2, dim=-1)
        f = torch.nn.functional
        return (f.silu(g) if act == "silu" else f.gelu(g, approximate="tanh")) * u
    return peer


def _spec(act: str, doc: str, vllm: str) -> OpSpec:
    return OpSpec(
        f"{act}_and_mul", doc,
        args=(Tensor("x", dims=(1, None), check=_even_last,
                     doc="[..., 2d] float32, bfloat16 or float16 (gate then up, as a fused "
                         "gate/up matmul writes them); the last dim contiguous and even"),
              Out(doc="optional [..., d] output, x's dtype"), Backend()),
        outputs=(Output("y", _half, "x", "[..., d] in x's dtype (``out`` when given)"),),
        run=rowwise(lambda a, x, out: launch(gated_kernel(act), x[:, :x.shape[1] // 2],
                                             x[:, x.shape[1] // 2:], out, backend=a.backend)),
        kernels=lambda: (gated_kernel(act),),
        example=f">>> h = kernelforge.ops.{act}_and_mul(x @ w_gate_up.T)   # [T, 2d] -> [T, d]",
        reference=lambda a: (reference(a.x, act),),
        samples=_samples,
        bad=(Bad("odd last dim", lambda c: c.with_(x=c.kwargs["x"][..., :-1]),
                 ("`x`", "even last dim")),
             Bad("out overlapping x", lambda c: c.with_(
                 out=c.kwargs["x"][..., :c.kwargs["x"].shape[-1] // 2]),
                 ("`out`", "overlaps `x`"))),
        bench=bench(lambda device, dtype, rows, d: dict(
            x=torch.randn(rows, 2 * d, device=device).to(dtype)), (1, 1536), (32, 1536),
            (256, 14336)), cost=_cost, resize=resize_rows("x"), vllm=vllm, peer=_peer(act),
        checks_by_key=())


SILU_AND_MUL = _spec("silu", "``silu(x[..., :d]) * x[..., d:]``, the SwiGLU gate, in one pass.",
                     "silu_and_mul(out, input)")
GELU_TANH_AND_MUL = _spec(
    "gelu_tanh", "``gelu(x[..., :d], approximate='tanh') * x[..., d:]``, the GeGLU gate "
    "(Gemma), in one pass.", "gelu_tanh_and_mul(out, input)")

silu_and_mul = SILU_AND_MUL.op
gelu_tanh_and_mul = GELU_TANH_AND_MUL.op
SPECS = (SILU_AND_MUL, GELU_TANH_AND_MUL)
