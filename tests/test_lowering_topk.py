"""``kl.topk`` returns values and indices on every lowering: descending by
value, NaN first, ties to the lower index. The reference is a stable
descending sort in float64 (torch.topk documents no order for ties)."""
import functools

import pytest
import torch

import kernelforge
import kernelforge.lang as kl
from kernelforge.ir.errors import KernelError
from conftest import BACKENDS, DEVICE


@functools.lru_cache(maxsize=None)
def topk_rows(k: int, block: int):
    """Each row's k largest values and their columns; ``block`` rows per program."""
    @kl.kernel(static=("N", "K"))
    def topk_rows(x: kl.In("M", "N"), vals: kl.Out("M", "K"), ids: kl.Out("M", "K")):
        m, n = kl.parallel("M", block=block), kl.tile("N")
        v, i = kl.topk(kl.load(x[m, n]), "N", k, "K")
        kl.store(vals[m, kl.tile("K")], v)
        kl.store(ids[m, kl.tile("K")], i)
    return topk_rows


@kl.kernel(static=("N", "K"))
def topk_columns(x: kl.In("N", "M"), vals: kl.Out("K", "M"), ids: kl.Out("K", "M")):
    """Top 3 down each column: the selected axis is x's first dim, the new
    axis comes after M in the kernel's axis order."""
    m, n = kl.parallel("M", block=2), kl.tile("N")
    v, i = kl.topk(kl.load(x[n, m]).to(kl.f32) * 2.0, "N", 3, "K")
    kl.store(vals[kl.tile("K"), m], v)
    kl.store(ids[kl.tile("K"), m], i)


def reference(x: torch.Tensor, k: int, dim: int = -1):
    s = torch.sort(x.double().cpu(), dim=dim, descending=True, stable=True)
    return s.values.narrow(dim, 0, k), s.indices.narrow(dim, 0, k)


def tied_rows(rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, (rows, n), generator=g).float()      # many ties
    x[1, [3, 9]] = float("nan")                                   # two NaNs: both first
    x[2] = float("-inf")                                          # a row of -inf
    x[3, :] = 1.0
    x[3, n - 1] = 2.0                                             # the largest value last
    return x.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,block", [(10, 3, 1), (37, 5, 4), (64, 8, 1)])
def test_topk_values_and_indices_with_ties_and_nan(backend, n, k, block):
    if backend == "inductor" and (n, k) != (37, 5):
        pytest.skip("one Inductor compile is enough: the torch source is the eager one")
    x = tied_rows(6, n, n)
    vals = torch.empty(6, k, device=DEVICE)
    ids = torch.empty(6, k, dtype=torch.int32, device=DEVICE)
    kernelforge.launch(topk_rows(k, block), x, vals, ids, backend=backend)
    rv, ri = reference(x, k)
    assert torch.equal(ids.long().cpu(), ri), (ids, ri)
    assert torch.allclose(vals.double().cpu(), rv.cpu(), equal_nan=True)
    assert ri[1, :2].tolist() == [3, 9]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_of_integers(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 3, (5, 20), generator=g, dtype=torch.int32)
    x[0, 0] = torch.iinfo(torch.int32).min                         # the type's smallest value
    x[4, :] = torch.iinfo(torch.int32).min
    vals = torch.empty(5, 4, dtype=torch.int32, device=DEVICE)
    ids = torch.empty(5, 4, dtype=torch.int32, device=DEVICE)
    kernelforge.launch(topk_rows(4, 1), x.to(DEVICE), vals, ids, backend=backend)
    s = torch.sort(x.long(), dim=-1, descending=True, stable=True)
    assert torch.equal(vals.long().cpu(), s.values[:, :4])
    assert torch.equal(ids.long().cpu(), s.indices[:, :4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_along_a_leading_dim(backend):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 3, (12, 5), generator=g).float().to(DEVICE)
    x[4, 1] = float("nan")
    vals = torch.empty(3, 5, device=DEVICE)
    ids = torch.empty(3, 5, dtype=torch.int32, device=DEVICE)
    kernelforge.launch(topk_columns, x, vals, ids, backend=backend)
    rv, ri = reference(x * 2.0, 3, dim=0)
    assert torch.equal(ids.long().cpu(), ri.cpu())
    assert torch.allclose(vals.double().cpu(), rv.cpu(), equal_nan=True)


def test_topk_k_must_fit_the_axis():
    @kl.kernel(static=("N", "K"))
    def too_many(x: kl.In("M", "N"), out: kl.Out("M", "K")):
        m, n = kl.parallel("M"), kl.tile("N")
        v, _ = kl.topk(kl.load(x[m, n]), "N", 9, "K")
        kl.store(out[m, kl.tile("K")], v)
    with pytest.raises(KernelError, match=r"topk: k=9 must be between 1 and the extent of `N` \(8\)"):
        too_many.specialize({}, {"N": 8, "K": 9})
