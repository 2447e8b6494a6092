"""The RMSNorm family, written once in the kernel IR.

    y = x / sqrt(mean(x**2) + eps) * (weight + offset)

computed in fp32 and stored in the input dtype; ``offset=1.0`` is Gemma's
``(1 + weight)`` form. Each row walks the hidden axis twice (sum of squares,
then scale): Triton runs one chunk when the row fits a block and loops over
chunks when it does not; the torch lowerings see the whole row at once.

The fused residual variant rounds ``x + residual`` to the input dtype (the
value it returns and the next layer reads) and normalises that rounded sum,
as vLLM's CUDA kernel does. Its second pass recomputes the sum from the
inputs instead of re-reading the stored one, so writing the results over
``x`` and ``residual`` (in place) never reads a value it has overwritten.
"""
import torch

import kernelforge.lang as kl
from kernelforge.dispatch import launch
from kernelforge.spec import (Backend, Bad, Bool, Call, Float, OpSpec, Out, Output, Tensor,
                              bench, resize_rows, rowwise)


@kl.kernel(static=("N",), examples=({"N": 4096}, {"N": 16384}))
def rms_norm_fwd(x: kl.In("M", "N"), w: kl.In("N"), out: kl.Out("M", "N"),
             eps: kl.f32, offset: kl.f32):
    m = kl.parallel("M")

    def sum_squares(n, acc):
        xs = kl.load(x[m, n]).to(kl.f32)
        return acc + kl.sum(xs * xs, "N")

    ss = kl.seq_for("N", sum_squares, init=kl.zeros(kl.f32, "M"))
    inv_rms = kl.rsqrt(ss / kl.size("N").to(kl.f32) + eps)

    def scale(n):
        xs = kl.load(x[m, n]).to(kl.f32)
        wt = kl.load(w[n]).to(kl.f32) + offset
        kl.store(out[m, n], (xs * inv_rms * wt).to(out.dtype))

    kl.seq_for("N", scale)


@kl.kernel(static=("N",), examples=({"N": 4096}, {"N": 16384}))
def fused_add_rms_norm_fwd(x: kl.In("M", "N"), r: kl.In("M", "N"),
                       w: kl.In("N"), out: kl.Out("M", "N"), r_out: kl.Out("M", "N"),
                       eps: kl.f32, offset: kl.f32):
    m = kl.parallel("M")

    def residual_sum(n):
        # rounded to the storage dtype: the sum every later consumer sees
        s = kl.load(x[m, n]).to(kl.f32) + kl.load(r[m, n]).to(kl.f32)
        return s.to(r_out.dtype).to(kl.f32)

    def sum_squares(n, acc):
        s = residual_sum(n)
        return acc + kl.sum(s * s, "N")

    ss = kl.seq_for("N", sum_squares, init=kl.zeros(kl.f32, "M"))
    inv_rms = kl.rsqrt(ss / kl.size("N").to(kl.f32) + eps)

    def scale(n):
        s = residual_sum(n)
        wt = kl.load(w[n]).to(kl.f32) + offset
        kl.store(r_out[m, n], s.to(r_out.dtype))
        kl.store(out[m, n], (s * inv_rms * wt).to(out.dtype))

    kl.seq_for("N", scale)


# -- the specs -------------------------------------------------------------------------

def reference(x, weight, eps, offset=0.0):
    """float64, from the formula."""
    x64 = x.to(torch.float64)
    ms = (x64 * x64).mean(dim=-1, keepdim=True)
    return x64 / torch.sqrt(ms + eps) * (weight.to(torch.float64) + offset)


def fused_reference(x, residual, weight, eps, offset=0.0):
    """(normed, sum): the sum rounded to the input dtype (what the op returns)
    and normalised as rounded."""
    s = (x.to(torch.float64) + residual.to(torch.float64)).to(x.dtype)
    return reference(s, weight, eps, offset), s


def _samples(st, budget, fused: bool):
    @st.composite
    def draw(draw):
        x, dtype, seed = budget.row_input(draw, [576, 4097, 1, 16384], st.integers(1, 5000),
                                          scales=[1e-3, 1.0, 50.0])
        kw = dict(x=x, weight=budget.tensor(x.shape[-1:], budget.variant(
            draw, [dtype, torch.float32]), seed + 1),
                  eps=draw(st.one_of(st.sampled_from([1e-6, 1e-5]), st.floats(1e-8, 1.0))),
                  offset=draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-1.0, 1.0))))
        if fused:
            kw["residual"] = budget.tensor(x.shape, dtype, seed + 2, 1.0, draw(st.booleans()))
            kw["inplace"] = draw(st.booleans())
        return Call(kw, f"{list(x.shape)} {dtype}")
    return draw()


def _bench(fused: bool):
    def make(device, dtype, rows, n):
        x = torch.randn(rows, n, device=device).to(dtype)
        return dict(x=x, weight=torch.randn(n, device=device).to(dtype), eps=1e-6,
                    **({"residual": torch.randn_like(x)} if fused else {}))
    return bench(make, (1, 4096), (32, 4096), (4096, 4096), (64, 16384))


def _cost(a):
    rows = a.x.numel() // max(a.x.shape[-1], 1)
    tensors = 3 if a.__dict__.get("residual") is None else 5     # reads and writes of rows
    return tensors * a.x.numel() * a.x.element_size() + a.weight.numel() * \
        a.weight.element_size(), 4 * a.x.numel() + 2 * rows


_X = Tensor("x", dims=(1, None), doc="[..., N] float32, bfloat16 or float16; rows may be "
            "strided, the last dim must be contiguous")
_WEIGHT = Tensor("weight", shape=lambda a: (a.x.shape[-1],), why=" (the last dim of `x`)",
                 doc="[N], any float dtype (read as fp32)")
_EPS = Float("eps", default=1e-6, positive=True, doc="added to the mean square; > 0")
_OFFSET = Float("offset", default=0.0, kw_only=True,
                doc="added to the weight; 1.0 gives Gemma's ``(1 + weight)``")
_BAD = (
    Bad("weight of the wrong size", lambda c: c.with_(weight=c.kwargs["weight"][:-1]),
        ("`weight`", "(the last dim of `x`)")),
    Bad("weight of the wrong rank", lambda c: c.with_(weight=c.kwargs["weight"][None]),
        ("`weight`",)),
)


def _norm_rows(a, x, out):
    return launch(rms_norm_fwd, x, a.weight, out, float(a.eps), float(a.offset),
                  backend=a.backend)


RMS_NORM = OpSpec(
    "rms_norm",
    "RMSNorm over the last dim: ``x / sqrt(mean(x**2) + eps) * (weight + offset)``,\n"
    "computed in fp32 and stored in ``x``'s dtype.",
    args=(_X, _WEIGHT, _EPS, _OFFSET, Out(), Backend()),
    outputs=(Output("y", lambda a: a.x.shape, "x", "the normalised rows, ``x``'s shape and "
                    "dtype (``out`` when given)"),),
    run=rowwise(_norm_rows),
    kernels=lambda: (rms_norm_fwd,),
    example=">>> y = kernelforge.ops.rms_norm(x, w, 1e-6)",
    reference=lambda a: (reference(a.x, a.weight, a.eps, a.offset),),
    samples=lambda st, budget: _samples(st, budget, fused=False),
    bad=_BAD, bench=_bench(False), cost=_cost, resize=resize_rows("x"),
    peer=lambda a: torch.nn.functional.rms_norm(a.x, (a.x.shape[-1],), a.weight, a.eps),
    vllm="rms_norm(out, input, weight, epsilon)", checks_by_key=(),
)


def _fused_rows(a, x, r, out, r_out):
    return launch(fused_add_rms_norm_fwd, x, r, a.weight, out, r_out, float(a.eps),
                  float(a.offset), backend=a.backend)


FUSED_ADD_RMS_NORM = OpSpec(
    "fused_add_rms_norm",
    "Residual add then RMSNorm, in one pass over memory: ``s = x + residual``\n"
    "rounded to x's dtype; returns ``(rms_norm(s), s)``.",
    args=(_X,
          Tensor("residual", shape=lambda a: a.x.shape, why=" (the shape of `x`)",
                 dtype_of="x", doc="[..., N], `x`'s shape and dtype"),
          _WEIGHT, _EPS, _OFFSET,
          Bool("inplace", default=False, kw_only=True, graph=False,
               doc="write the normalised rows into ``x`` and the sum into ``residual`` "
                   "and return them (vLLM's calling convention)"),
          Backend()),
    outputs=(Output("normed", lambda a: a.x.shape, "x", "``rms_norm(x + residual)``"),
             Output("sum", lambda a: a.x.shape, "x", "``x + residual`` rounded to x's dtype")),
    run=rowwise(_fused_rows, inputs=("x", "residual"),
                inplace_of={"normed": "x", "sum": "residual"}),
    kernels=lambda: (fused_add_rms_norm_fwd,),
    inplace="inplace", mutates=("x", "residual"),
    example=">>> h, res = kernelforge.ops.fused_add_rms_norm(h, res, w, 1e-6, inplace=True)",
    reference=lambda a: fused_reference(a.x, a.residual, a.weight, a.eps, a.offset),
    samples=lambda st, budget: _samples(st, budget, fused=True),
    bad=_BAD + (
        Bad("residual of another shape", lambda c: c.with_(residual=c.kwargs["residual"][..., :-1]),
            ("`residual`", "(the shape of `x`)")),
        Bad("residual of another dtype", lambda c: c.with_(
            residual=c.kwargs["residual"].to(torch.float64)), ("`residual`", "float64")),
        Bad("residual is x, in place", lambda c: c.with_(residual=c.kwargs["x"], inplace=True),
            ("`x`", "overlaps `residual`"))),
    bench=_bench(True), cost=_cost, resize=resize_rows("x", "residual"),
    peer=lambda a: torch.nn.functional.rms_norm(a.x + a.residual, (a.x.shape[-1],), a.weight,
                                                a.eps),
    vllm="fused_add_rms_norm(input, residual, weight, epsilon) (in place)", checks_by_key=(),
)

rms_norm = RMS_NORM.op
fused_add_rms_norm = FUSED_ADD_RMS_NORM.op
SPECS = (RMS_NORM, FUSED_ADD_RMS_NORM)
