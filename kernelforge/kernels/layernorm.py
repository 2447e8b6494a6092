"""LayerNorm over the last dim, written once in the kernel IR.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias

Statistics in fp32 from shifted sums: each row's first element ``K`` is
subtracted before summing, ``var = (sum (x-K)^2 - (sum (x-K))^2 / N) / N``.
The plain one-pass ``E[x^2] - E[x]^2`` cancels catastrophically when
|mean| is much larger than the std (a row of 1000 + noise); shifted by a
value of the row itself, the sums stay of the order of the spread, so one
pass over the row keeps the statistics accurate (docs/kernel-authors.md,
"Numerics"). Stored in the input dtype.
"""
import torch

import kernelforge.lang as kl
from kernelforge.dispatch import kernel_factory, launch
from kernelforge.spec import (Backend, Bad, Call, Float, OpSpec, Output, Tensor, bench,
                              resize_rows, rowwise)
from kernelforge.tolerance import tolerance


@kernel_factory
def layer_norm_kernel(with_bias: bool) -> kl.KernelDef:
    """LayerNorm rows; ``with_bias`` adds the bias tensor."""

    def stats_and_scale(x, w, b, out, eps):
        m = kl.parallel("M")
        shift = kl.load(x[m, 0]).to(kl.f32)

        def sums(n, s1, s2):
            d = kl.load(x[m, n]).to(kl.f32) - shift
            return s1 + kl.sum(d, "N"), s2 + kl.sum(d * d, "N")

        zero = kl.zeros(kl.f32, "M")
        s1, s2 = kl.seq_for("N", sums, init=(zero, zero))
        count = kl.size("N").to(kl.f32)
        mean_d = s1 / count
        var = kl.maximum(s2 / count - mean_d * mean_d, 0.0)
        rstd = kl.rsqrt(var + eps)

        def scale(n):
            y = (kl.load(x[m, n]).to(kl.f32) - shift - mean_d) * rstd * kl.load(w[n]).to(kl.f32)
            if b is not None:
                y = y + kl.load(b[n]).to(kl.f32)
            kl.store(out[m, n], y.to(out.dtype))

        kl.seq_for("N", scale)

    if with_bias:
        def layer_norm_bias(x: kl.In("M", "N"), w: kl.In("N"), b: kl.In("N"),
                            out: kl.Out("M", "N"), eps: kl.f32):
            stats_and_scale(x, w, b, out, eps)
        fn = layer_norm_bias
    else:
        def layer_norm(x: kl.In("M", "N"), w: kl.In("N"), out: kl.Out("M", "N"), eps: kl.f32):
            stats_and_scale(x, w, None, out, eps)
        fn = layer_norm
    return kl.kernel(fn, static=("N",), examples=({"N": 768}, {"N": 4096}))


def reference(x, weight, bias, eps):
    """float64, from the formula (mean and population variance)."""
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + eps) * weight.double()
    return y if bias is None else y + bias.double()


def allowance(a, ref):
    """fp32 rtol times |normalised x * weight|: the statistics are fp32 sums
    in each backend's own order, an error relative to that term, which a
    bias of the opposite sign leaves far above |y| (docs/tolerance.md)."""
    return (tolerance(torch.float32).rtol * reference(a.x, a.weight, None, a.eps).abs(),)


def _run(a, x, out):
    if a.bias is None:
        return launch(layer_norm_kernel(False), x, a.weight, out, float(a.eps), backend=a.backend)
    return launch(layer_norm_kernel(True), x, a.weight, a.bias, out, float(a.eps),
                  backend=a.backend)


def _samples(st, budget):
    @st.composite
    def draw(draw):
        x, dtype, seed = budget.row_input(draw, [768, 4097, 1], st.integers(1, 5000), [1e-2, 1.0])
        shift = draw(st.sampled_from([0.0, 3.0, 1000.0]))   # one-pass sums would cancel
        n = x.shape[-1]
        w = budget.tensor((n,), budget.variant(draw, [dtype, torch.float32]), seed + 1)
        b = None if draw(st.booleans()) else budget.tensor((n,), w.dtype, seed + 2)
        return Call(dict(x=(x.float() + shift).to(dtype), weight=w, bias=b,
                         eps=draw(st.sampled_from([1e-5, 1e-6, 0.1]))),
                    f"{list(x.shape)} {dtype} +{shift}")
    return draw()


def _vector(name: str, optional: bool) -> Tensor:
    return Tensor(name, shape=lambda a: (a.x.shape[-1],), why=" (the last dim of `x`)",
                  optional=optional, doc="[N], any float dtype (read as fp32)" +
                  (", or None" if optional else ""))


LAYER_NORM = OpSpec(
    "layer_norm",
    "LayerNorm over the last dim: ``(x - mean) / sqrt(var + eps) * weight + bias``,\n"
    "statistics in fp32 (accurate when |mean| >> std), stored in ``x``'s dtype.",
    args=(Tensor("x", dims=(1, None), doc="[..., N] float32, bfloat16 or float16; rows may be "
                 "strided, the last dim contiguous"),
          _vector("weight", False), _vector("bias", True),
          Float("eps", default=1e-5, positive=True, doc="added to the variance; > 0"),
          Backend()),
    outputs=(Output("y", lambda a: a.x.shape, "x", "``x``'s shape and dtype"),),
    run=rowwise(_run),
    kernels=lambda: (layer_norm_kernel(False), layer_norm_kernel(True)),
    example=">>> y = kernelforge.ops.layer_norm(x, w, b, 1e-5)",
    reference=lambda a: (reference(a.x, a.weight, a.bias, a.eps),), allowance=allowance,
    samples=_samples,
    bad=(Bad("bias of the wrong size", lambda c: c.with_(bias=torch.zeros(
        c.kwargs["x"].shape[-1] + 1, device=c.kwargs["x"].device)),
        ("`bias`", "(the last dim of `x`)")),),
    bench=bench(lambda device, dtype, rows, n: dict(
        x=torch.randn(rows, n, device=device).to(dtype), eps=1e-5,
        weight=torch.randn(n, device=device).to(dtype),
        bias=torch.randn(n, device=device).to(dtype)), (1, 4096), (4096, 4096)),
    resize=resize_rows("x"),
    peer=lambda a: torch.nn.functional.layer_norm(a.x, (a.x.shape[-1],), a.weight, a.bias, a.eps),
    cost=lambda a: (2 * a.x.numel() * a.x.element_size(), 7 * a.x.numel()),
)

layer_norm = LAYER_NORM.op
SPECS = (LAYER_NORM,)
