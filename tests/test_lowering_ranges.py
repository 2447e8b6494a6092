"""seq_for(start=, stop=): lanes outside the rows' ranges read 0 on every
lowering, so NaN stored where no row looks (uninitialised cache slots, keys
past every row's end, the rows of a padded last block) never reaches an
output. References are float64 formulas over each row's own range."""
import functools

import pytest
import torch

import kernelforge
import kernelforge.lang as kl
from kernelforge.ir import lib
from kernelforge.tolerance import assert_close
from conftest import BACKENDS, DEVICE

NAN = float("nan")


@functools.lru_cache(maxsize=None)
def ranged_attention(static_n: bool):
    """Flash attention over each query row's own key range [lo, hi), 16 rows
    per program; a row with an empty range gives 0 (as kernelforge/kernels/attention.py)."""
    @kl.kernel(static=("D", "N") if static_n else ("D",))
    def ranged_attention(q: kl.In("M", "D"), k: kl.In("N", "D"), v: kl.In("N", "D"),
                         lo: kl.In("M"), hi: kl.In("M"), o: kl.Out("M", "D")):
        m, d = kl.parallel("M", block=16), kl.tile("D")
        qt = kl.load(q[m, d])

        def step(n, m_i, l_i, acc):
            s = kl.dot(qt, kl.load(k[n, d]), "D")
            m_new, l_new, p, alpha = lib.online_softmax_step(m_i, l_i, s, "N")
            return m_new, l_new, acc * alpha + kl.dot(p, kl.load(v[n, d]), "N")

        init = (kl.full(float("-inf"), kl.f32, "M"), kl.zeros(kl.f32, "M"),
                kl.zeros(kl.f32, "M", "D"))
        _, l_i, acc = kl.seq_for("N", step, init=init, start=kl.load(lo[m]),
                                 stop=kl.load(hi[m]))
        kl.store(o[m, d], kl.where(l_i > 0.0, acc / l_i, 0.0))
    return ranged_attention


@functools.lru_cache(maxsize=None)
def ranged_weighted_sums(block: int):
    """out[m] = sum over n in [lo[m], hi[m]) of w[m, n] * x[n]: x is shared by the rows."""
    @kl.kernel()
    def ranged_weighted_sums(w: kl.In("M", "N"), x: kl.In("N"), lo: kl.In("M"),
                             hi: kl.In("M"), out: kl.Out("M")):
        m = kl.parallel("M", block=block)

        def step(n, acc):
            return acc + kl.sum(kl.load(w[m, n]) * kl.load(x[n]), "N")

        (s,) = kl.seq_for("N", step, init=(kl.zeros(kl.f32, "M"),), start=kl.load(lo[m]),
                          stop=kl.load(hi[m]))
        kl.store(out[m], s)
    return ranged_weighted_sums


def ranges(rows: int, n: int, split: int):
    """Staggered ranges (causal-like), an empty one, and a stretch of keys
    between two groups of rows that no row sees. The groups meet at row
    ``split``, a program boundary: Triton and C++ walk a program's keys from
    its rows' smallest start to their largest stop (docs/design.md)."""
    lo = torch.arange(rows) * 2 + 5
    hi = lo + 20 + torch.arange(rows)
    lo[split:] += n // 3                 # the later rows look further on
    hi[split:] += n // 3
    hi[3] = lo[3]                        # an empty range
    assert int(hi.max()) < n - 3
    return lo, hi


def poison_outside(t: torch.Tensor, lo, hi) -> torch.Tensor:
    """NaN at every key position that no row's range covers."""
    seen = torch.zeros(t.shape[0], dtype=torch.bool)
    for a, b in zip(lo.tolist(), hi.tolist()):
        seen[a:b] = True
    t = t.clone()
    t[~seen] = NAN
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,n,static_n", [(37, 300, False), (20, 160, True)])
def test_nan_outside_every_range_never_reaches_attention(backend, rows, n, static_n):
    """37 rows: the last program's block of 16 has 11 padded rows, whose
    bounds read as 0 and must not widen its walk to key 0."""
    if backend == "inductor" and static_n:
        pytest.skip("one Inductor compile is enough: the torch source is the eager one")
    g = torch.Generator().manual_seed(rows)
    q = torch.randn(rows, 16, generator=g)
    lo, hi = ranges(rows, n, 16)
    k = poison_outside(torch.randn(n, 16, generator=g), lo, hi)
    v = poison_outside(torch.randn(n, 16, generator=g), lo, hi)
    o = torch.full((rows, 16), -3.0, device=DEVICE)
    args = [t.to(DEVICE) for t in (q, k, v, lo, hi)]
    kernelforge.launch(ranged_attention(static_n), *args, o, backend=backend)
    ref = torch.zeros(rows, 16, dtype=torch.float64)
    for i in range(rows):
        kk, vv = k[lo[i]:hi[i]].double(), v[lo[i]:hi[i]].double()
        if len(kk):
            ref[i] = torch.softmax(q[i].double() @ kk.T, -1) @ vv
    assert not torch.isnan(o).any()
    assert_close(o, ref, torch.float32, f"ranged attention {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [1, 4])
def test_nan_outside_every_range_never_reaches_a_shared_load(backend, block):
    rows, n = 13, 200
    g = torch.Generator().manual_seed(block)
    lo, hi = ranges(rows, n, 8)
    w = torch.randn(rows, n, generator=g)
    for i in range(rows):                 # w is per row: NaN outside each row's own range
        w[i, :lo[i]] = NAN
        w[i, hi[i]:] = NAN
    x = poison_outside(torch.randn(n, generator=g), lo, hi)
    out = torch.full((rows,), -3.0, device=DEVICE)
    kernelforge.launch(ranged_weighted_sums(block), *(t.to(DEVICE) for t in (w, x, lo, hi)),
                       out, backend=backend)
    ref = torch.stack([(w[i, lo[i]:hi[i]].double() * x[lo[i]:hi[i]].double()).sum()
                       for i in range(rows)])
    assert_close(out, ref, torch.float32, f"ranged sums {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_bounds_past_the_axis_are_clamped(backend, block, dtype):
    """Bounds from bad host data (a stop of 2**31 - 1, a start past the end,
    a negative start) visit only [0, N) of the axis, on every lowering:
    Triton clamps the walk as C++ does (it had looped to 2**31 or crashed)."""
    rows, n = 6, 200
    big = 2 ** 31 - 1
    lo = torch.tensor([0, -5, 150, big, -big - 1, 190], dtype=dtype)
    hi = torch.tensor([big, 30, big, big, 10, 195], dtype=dtype)
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(rows, n, generator=g), torch.randn(n, generator=g)
    out = torch.full((rows,), -3.0, device=DEVICE)
    kernelforge.launch(ranged_weighted_sums(block), *(t.to(DEVICE) for t in (w, x, lo, hi)),
                       out, backend=backend)
    ref = torch.stack([(w[i, max(a, 0):min(b, n)].double() * x[max(a, 0):min(b, n)].double()).sum()
                       for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist()))])
    assert_close(out, ref, torch.float32, f"clamped ranges {backend}")
