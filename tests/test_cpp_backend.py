"""What is particular to the C++ lowering (kernelforge/lower/cpp_printer.py):
its helpers, argument marshalling and the cases a review found. The ops'
equivalence tests run on it through conftest.BACKENDS."""
import pytest
import torch

import kernelforge
import kernelforge.lang as kl
from kernelforge.backends.cpp import compiler
from kernelforge.ir.errors import KernelError
from kernelforge.tolerance import assert_close
import ir_kernels as K

pytestmark = pytest.mark.skipif(compiler()[0] is None, reason="no C++ compiler here")


@kl.kernel(static=("D",))
def scalar_first(eps: kl.f32, w: kl.In("D"), x: kl.In("R", "D"), out: kl.Out("R", "D")):
    r, d = kl.parallel("R"), kl.tile("D")
    kl.store(out[r, d], kl.load(x[r, d]) * kl.load(w[d]) + eps)


def test_runtime_sizes_are_read_from_the_right_tensor():
    """A scalar before the tensors: R must come from x (100 rows), not w."""
    w, x = torch.randn(8), torch.randn(100, 8)
    out = torch.full_like(x, float("nan"))
    kernelforge.launch(scalar_first, 0.5, w, x, out, backend="cpp")
    assert_close(out, x.double() * w.double() + 0.5, torch.float32, "scalar first")


@kl.kernel(static=("D",))
def int_div_mod(a: kl.In("R", "D"), b: kl.In("R", "D"), q: kl.Out("R", "D"), m: kl.Out("R", "D")):
    r, d = kl.parallel("R"), kl.tile("D")
    x, y = kl.load(a[r, d]), kl.load(b[r, d])
    kl.store(q[r, d], x // y)
    kl.store(m[r, d], x % y)


def test_integer_division_truncates_and_padded_lanes_do_not_trap():
    """D=5 pads to 8 lanes whose loads read 0: 0 // 0 there must not trap (it
    killed the process before kf_idiv); real lanes divide toward zero (C)."""
    a = torch.tensor([[7, -7, 7, -7, -2 ** 31]], dtype=torch.int32)
    b = torch.tensor([[2, 2, -2, -2, 3]], dtype=torch.int32)
    q, m = torch.empty_like(a), torch.empty_like(a)
    kernelforge.launch(int_div_mod, a, b, q, m, backend="cpp")
    want_q = torch.div(a.long(), b.long(), rounding_mode="trunc")
    assert torch.equal(q.long(), want_q)
    assert torch.equal(m.long(), a.long() - want_q * b.long())


@kl.kernel(static=("N",))
def exp_rows(x: kl.In("M", "N"), out: kl.Out("M", "N"), out2: kl.Out("M", "N")):
    m, n = kl.parallel("M"), kl.tile("N")
    kl.store(out[m, n], kl.exp(kl.load(x[m, n])))
    kl.store(out2[m, n], kl.exp2(kl.load(x[m, n])))


@pytest.mark.parametrize("fn", ["exp", "exp2"])
def test_exp_over_the_whole_float_range(fn):
    """kf_exp and kf_exp2 (vectorisable polynomials) against float64 exp and
    exp2: relative error within the fp32 policy down to the subnormals,
    exact 0, inf and NaN."""
    lo, hi = (-110.0, 89.0) if fn == "exp" else (-152.0, 129.0)
    special = [-87.2, -100.0] if fn == "exp" else [-149.0, -126.5, 127.99, 128.0]
    x = torch.cat([torch.linspace(lo, hi, 4001),
                   torch.tensor([float("-inf"), float("inf"), float("nan"), 0.0] + special)])
    outs = torch.empty_like(x[None]), torch.empty_like(x[None])
    kernelforge.launch(exp_rows, x[None], *outs, backend="cpp")
    out = outs[fn == "exp2"][0].double()
    ref = getattr(torch, fn)(x.double()).float().double()     # float's range: exp(89) is inf
    normal = ref.abs() >= torch.finfo(torch.float32).tiny
    assert_close(out[normal], ref[normal], torch.float32, f"{fn}, normal results")
    small = ~normal & (ref > 0) & torch.isfinite(ref)
    assert (out[small] - ref[small]).abs().max() <= 2 * 2 ** -149      # subnormals: ~1 ulp
    n = len(special)
    assert out[-4 - n] == 0.0 and out[-3 - n] == float("inf") and out[-2 - n].isnan()
    assert out[-1 - n] == 1.0


@kl.kernel(static=("N",))
def uses_a_cpp_keyword(new: kl.In("M", "N"), out: kl.Out("M", "N")):
    m, n = kl.parallel("M"), kl.tile("N")
    kl.store(out[m, n], kl.load(new[m, n]))


def test_a_name_cpp_cannot_use_is_refused_by_name():
    with pytest.raises(KernelError, match="`new`"):
        kernelforge.launch(uses_a_cpp_keyword, torch.ones(2, 4), torch.empty(2, 4), backend="cpp")


def test_non_contiguous_rows_and_a_strided_last_dim():
    """Row strides are passed; a strided last dim is made contiguous (inputs)
    or computed into a temporary and copied back (outputs)."""
    x = torch.randn(6, 16)[::2]                       # row stride 32
    w = torch.randn(32)[::2]                          # last-dim stride 2
    out = torch.empty(3, 32)[:, ::2]                  # output last-dim stride 2
    kernelforge.launch(scalar_first, 1.0, w, x, out, backend="cpp")
    assert_close(out, x.double() * w.double() + 1.0, torch.float32, "strided")


def test_in_place_call_reads_before_it_writes():
    """One buffer as input and output (in-place rotary, fused add + norm)."""
    x = torch.randn(5, 64)
    want = torch.nn.functional.rms_norm(x.double(), (64,), eps=1e-6)
    kernelforge.ops.rms_norm(x, torch.ones(64), 1e-6, backend="cpp")   # out of place first
    out = x.clone()
    kernelforge.launch(kernelforge.kernels.rmsnorm.rms_norm_fwd, out, torch.ones(64), out,
                       1e-6, 0.0, backend="cpp")
    assert_close(out, want, torch.float32, "in place")


def test_generated_source_points_back_to_the_kernel():
    src = kernelforge.dispatch.source(exp_rows, (torch.ones(2, 8), torch.empty(2, 8),
                                                 torch.empty(2, 8)), "cpp")
    assert "test_cpp_backend.py" in src and "kl.exp(kl.load(x[m, n]))" in src
    assert 'extern "C" void exp_rows(' in src


def test_a_kernel_the_cpp_lowering_cannot_lower_falls_back(monkeypatch):
    """sort has no C++ rule yet (topk has): by default the kernel runs on the
    next CPU backend (Inductor); asked for explicitly, cpp says why it cannot."""
    import ir_kernels as K
    monkeypatch.delenv("KERNELFORGE_BACKEND", raising=False)
    x = torch.randn(4, 100)
    srt, top = torch.empty_like(x), torch.empty(4, 4)
    kernelforge.launch(K.sort_topk, x, srt, top)
    assert torch.equal(srt, torch.sort(x, -1, descending=True).values)
    assert torch.equal(top, torch.topk(x, 4, -1).values)
    with pytest.raises(ValueError, match="'cpp' cannot run kernel `sort_topk`: .*no rule for sort"):
        kernelforge.launch(K.sort_topk, x, srt, top, backend="cpp")


@pytest.mark.parametrize("G, N, D", [(1, 16, 64), (3, 48, 80), (5, 128, 96), (6, 32, 64),
                                     (7, 20, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sums_of_products_lower_as_block_products(G, N, D, dtype):
    """``sum(a * b, axis)`` over two blocks that each lack one output axis is a
    block product: the C++ lowering emits kf_dot_nt for q.k (a few rows
    against keys stored along D: 16 at a time, then kf_hsum16's shuffles;
    a key count that 16 does not divide transposes them for kf_dot) and
    kf_dot for p.v. Row counts that 4 does not divide (G of 5, 6, 7:
    kf_dot's row blocking must not run past them), key counts that are not
    powers of two (N=20, 48) and every supported head size, against float64."""
    g = torch.Generator().manual_seed(G * 1000 + N + D)
    # non-negative values: no cancellation, so each sum's fp32 rounding stays
    # relative to its value (random signs make some sums far smaller than
    # their terms, and no per-element tolerance fits them)
    q = torch.rand(3, G, D, generator=g).to(dtype)
    k, v = (torch.rand(3, N, D, generator=g).to(dtype) for _ in range(2))
    s, o = torch.full((3, G, N), float("nan")), torch.full((3, G, D), float("nan"))
    args = (q, k, v, s, o)
    src = kernelforge.dispatch.source(K.contractions, args, "cpp")
    assert "kf_dot<" in src and ("kf_dot_nt<" in src) == (N % 16 == 0)   # 20 keys: transposed
    kernelforge.launch(K.contractions, *args, backend="cpp")
    want_s = torch.einsum("rgd,rnd->rgn", q.double(), k.double())
    assert_close(s, want_s, torch.float32, "q.k")
    assert_close(o, torch.einsum("rgn,rnd->rgd", want_s, v.double()), torch.float32, "p.v")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [5, 16, 300])
def test_gathered_rows_are_prefetched_at_the_top_of_each_chunk(N, dtype):
    """Loads of whole rows at rows read from a table, inside a loop, get
    their rows prefetched once the indices are known and before the first
    use, the rows of both tables together (cpp_prefetch.py); a load of
    contiguous rows gets none. A hint only: the results equal float64 sums."""
    g = torch.Generator().manual_seed(N)
    S, D, R = 40, 64, 3
    idx = torch.randint(0, S, (R, N), generator=g, dtype=torch.int32)
    a, b = (torch.rand(S, D, generator=g).to(dtype) for _ in range(2))
    w = torch.rand(D, generator=g).to(dtype)
    out = torch.full((R, D), float("nan"), dtype=torch.float32)
    args = (idx, a, b, w, out)
    src = kernelforge.dispatch.source(K.gathered_row_sums, args, "cpp")
    body = src[src.index("kf_args"):]
    for name in ("a", "b"):
        hint = body.find(f"// prefetch the {name} rows")
        assert hint >= 0, f"no prefetch of {name}'s rows"
        assert hint < body.index(f"{name}[kf_clamp"), f"{name}'s rows prefetched after use"
    assert "prefetch the w rows" not in body and "prefetch the idx rows" not in body
    kernelforge.launch(K.gathered_row_sums, *args, backend="cpp")
    rows_a, rows_b = a.double()[idx.long()], b.double()[idx.long()]   # [R, N, D]
    score = (rows_a * w.double()).sum(-1, keepdim=True)
    assert_close(out, (score * rows_b).sum(1), torch.float32, "gathered row sums")


def test_chunks_with_too_many_row_bytes_are_not_prefetched():
    """Rows of 4 KB (D=1024, fp32): a chunk's rows of both tables pass
    cpp_prefetch.PREFETCH_BYTES (prefetching 128 KB chunks cost 5% in paged
    decode: the later lines evict the first before they are read): none is
    issued, and the sums are unchanged."""
    from kernelforge.lower import cpp_prefetch
    g = torch.Generator().manual_seed(3)
    S, D, R, N = 40, 1024, 2, 300
    assert 2 * 16 * D * 4 > cpp_prefetch.PREFETCH_BYTES     # even a 16-row chunk is over
    idx = torch.randint(0, S, (R, N), generator=g, dtype=torch.int32)
    a, b = (torch.rand(S, D, generator=g) for _ in range(2))
    w = torch.rand(D, generator=g)
    out = torch.full((R, D), float("nan"))
    args = (idx, a, b, w, out)
    assert "__builtin_prefetch" not in kernelforge.dispatch.source(K.gathered_row_sums, args,
                                                                   "cpp")
    kernelforge.launch(K.gathered_row_sums, *args, backend="cpp")
    rows_a, rows_b = a.double()[idx.long()], b.double()[idx.long()]
    score = (rows_a * w.double()).sum(-1, keepdim=True)
    assert_close(out, (score * rows_b).sum(1), torch.float32, "gathered row sums")
