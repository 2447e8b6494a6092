"""NaN and ties in max/min, argmax/argmin and maximum/minimum, the same on
every lowering and as torch has them: NaN propagates (the max of a row with a
NaN is NaN, argmax/argmin return the first NaN's index), and ties go to the
lowest index, within a block and across a seq_for's chunks. References are
torch's own float64 ops."""
import functools

import pytest
import torch

import kernelforge
import kernelforge.lang as kl
from conftest import BACKENDS, DEVICE

NAN, INF = float("nan"), float("inf")


@functools.lru_cache(maxsize=None)
def whole_row_reductions(block: int):
    """max, min, argmax and argmin of each row as one tile (padded in Triton)."""
    @kl.kernel(static=("N",))
    def whole_row_reductions(x: kl.In("M", "N"), mx: kl.Out("M"), mn: kl.Out("M"),
                             amx: kl.Out("M"), amn: kl.Out("M")):
        m, n = kl.parallel("M", block=block), kl.tile("N")
        v = kl.load(x[m, n]).to(kl.f32)
        kl.store(mx[m], kl.max(v, "N"))
        kl.store(mn[m], kl.min(v, "N"))
        kl.store(amx[m], kl.argmax(v, "N"))
        kl.store(amn[m], kl.argmin(v, "N"))
    return whole_row_reductions


def _better(c, c_i, best, best_i, larger: bool):
    """Whether a chunk's (value, index) beats the carried one under the rule:
    NaN first, then the larger (smaller), ties to the lower index."""
    wins = c > best if larger else c < best
    c_nan, best_nan = c != c, best != best
    tie = (c == best) | (c_nan & best_nan)
    return (c_nan & ~best_nan) | (wins & ~best_nan) | (tie & (c_i < best_i))


@kl.kernel()
def chunked_reductions(x: kl.In("M", "N"), mx: kl.Out("M"), mn: kl.Out("M"),
                       amx: kl.Out("M"), amn: kl.Out("M")):
    """The same over a runtime-sized N walked in chunks: per-chunk results
    folded into carried ones (kl.maximum / kl.minimum for the values)."""
    m = kl.parallel("M")

    def step(n, hi, lo, hi_i, lo_i):
        v = kl.load(x[m, n]).to(kl.f32)
        c_hi, c_lo = kl.max(v, "N"), kl.min(v, "N")
        c_hi_i, c_lo_i = kl.argmax(v, "N"), kl.argmin(v, "N")
        take_hi = _better(c_hi, c_hi_i, hi, hi_i, True)
        take_lo = _better(c_lo, c_lo_i, lo, lo_i, False)
        return (kl.maximum(hi, c_hi), kl.minimum(lo, c_lo),
                kl.where(take_hi, c_hi_i, hi_i), kl.where(take_lo, c_lo_i, lo_i))

    big = 2 ** 31 - 1
    hi, lo, hi_i, lo_i = kl.seq_for("N", step, init=(
        kl.full(-INF, kl.f32, "M"), kl.full(INF, kl.f32, "M"),
        kl.full(big, kl.i32, "M"), kl.full(big, kl.i32, "M")))
    kl.store(mx[m], hi)
    kl.store(mn[m], lo)
    kl.store(amx[m], hi_i)
    kl.store(amn[m], lo_i)


@kl.kernel(static=("N",))
def elementwise_extrema(x: kl.In("M", "N"), y: kl.In("M", "N"), s: kl.f32, t: kl.f32,
                        mx: kl.Out("M", "N"), mn: kl.Out("M", "N"), mxs: kl.Out("M", "N"),
                        mns: kl.Out("M", "N"), smx: kl.Out("M", "N"), smn: kl.Out("M", "N")):
    """maximum / minimum of two blocks, of a block and a scalar argument, and
    of two scalar arguments."""
    m, n = kl.parallel("M"), kl.tile("N")
    a, b = kl.load(x[m, n]), kl.load(y[m, n])
    kl.store(mx[m, n], kl.maximum(a, b))
    kl.store(mn[m, n], kl.minimum(a, b))
    kl.store(mxs[m, n], kl.maximum(a, s))
    kl.store(mns[m, n], kl.minimum(s, a))
    kl.store(smx[m, n], kl.zeros(kl.f32, "M", "N") + kl.maximum(s, t))
    kl.store(smn[m, n], kl.zeros(kl.f32, "M", "N") + kl.minimum(s, t))


def rows_with_ties_and_nans(n: int) -> torch.Tensor:
    """Rows whose extrema tie (within and across chunks of 64 and 128),
    hold NaNs, or are all -inf / +inf."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(8, n, generator=g)
    x[0, [n // 7, n // 2, n - 1]] = 50.0               # max ties, spread over chunks
    x[0, [n // 5, n - 2]] = -50.0                       # min ties
    x[1, [n // 3, n - 1]] = NAN                         # two NaNs: the first one's index
    x[2] = -INF
    x[3] = INF
    x[4, n - 1] = NAN                                   # a NaN in the last (partial) chunk
    x[5, 0] = NAN                                       # ... and in the first
    x[6] = 1.0                                          # all equal
    x[7, [1, n - 1]] = torch.tensor([-INF, INF])
    return x.to(DEVICE)


def check(x, mx, mn, amx, amn):
    xd = x.double().cpu()
    assert torch.equal(amx.long().cpu(), xd.argmax(-1)), (amx, xd.argmax(-1))
    assert torch.equal(amn.long().cpu(), xd.argmin(-1)), (amn, xd.argmin(-1))
    assert torch.equal(mx.double().cpu(), xd.amax(-1)) or \
        torch.allclose(mx.double().cpu(), xd.amax(-1), equal_nan=True)
    assert torch.allclose(mn.double().cpu(), xd.amin(-1), equal_nan=True)
    assert torch.isnan(mx[[1, 4, 5]]).all() and torch.isnan(mn[[1, 4, 5]]).all()


def outputs(x):
    f = lambda d: torch.full((x.shape[0],), -7, dtype=d, device=DEVICE)   # noqa: E731
    return f(torch.float32), f(torch.float32), f(torch.int32), f(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,block", [(37, 1), (300, 4)])
def test_whole_row_reductions_ties_and_nan(backend, n, block):
    if backend == "inductor" and n != 300:
        pytest.skip("one Inductor compile is enough: the torch source is the eager one")
    x = rows_with_ties_and_nans(n)
    outs = outputs(x)
    kernelforge.launch(whole_row_reductions(block), x, *outs, backend=backend)
    check(x, *outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [300, 1000])
def test_chunked_reductions_ties_and_nan(backend, n):
    """Triton walks N in chunks of 64 and C++ of 128: the tied maxima, the
    NaNs and the extremes sit in different chunks."""
    if backend == "inductor" and n != 300:
        pytest.skip("one Inductor compile is enough: the torch source is the eager one")
    x = rows_with_ties_and_nans(n)
    outs = outputs(x)
    kernelforge.launch(chunked_reductions, x, *outs, backend=backend)
    check(x, *outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s,t", [(0.5, NAN), (NAN, 0.5), (-INF, 2.0)])
def test_maximum_minimum_propagate_nan(backend, s, t):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    x[0, :5], y[1, :5] = NAN, NAN
    x[2, :3], y[2, :3] = NAN, NAN
    x, y = x.to(DEVICE), y.to(DEVICE)
    outs = [torch.empty_like(x) for _ in range(6)]
    kernelforge.launch(elementwise_extrema, x, y, s, t, *outs, backend=backend)
    xd, yd = x.double(), y.double()
    sd, td = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    refs = [torch.maximum(xd, yd), torch.minimum(xd, yd), torch.maximum(xd, sd),
            torch.minimum(sd, xd), torch.maximum(sd, td).expand_as(xd),
            torch.minimum(sd, td).expand_as(xd)]
    for got, ref in zip(outs, refs):
        assert torch.allclose(got.double(), ref, equal_nan=True), (got, ref)
