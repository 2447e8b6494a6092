"""The IR already expresses what the next ops need; each kernel here runs on
every backend and is checked against torch's own ops in float64."""
import numpy as np
import pytest
import torch

import kernelforge
import kernelforge.lang as kl
from kernelforge.tolerance import assert_close, tolerance
from conftest import DEVICE
import ir_kernels as K

CPU_INTERP = DEVICE.type == "cpu"


def run(kdef, *args, backend):
    kernelforge.launch(kdef, *args, backend=backend)


@pytest.mark.parametrize("backend", ["eager", "inductor", "triton", "cpp"])
@pytest.mark.parametrize("n", [7, 1000, 2500])
def test_online_softmax_with_loop_carried_state(backend, n):
    if backend == "inductor" and n != 1000:
        pytest.skip("one Inductor compile is enough: the torch source is the eager one")
    x = torch.randn(3, n, device=DEVICE) * 4
    out = torch.empty_like(x)
    run(K.softmax_online, x, out, backend=backend)
    assert_close(out, torch.softmax(x.double(), -1), torch.float32, f"softmax {backend}")


@pytest.mark.parametrize("backend", ["eager", "triton", "cpp"])
@pytest.mark.parametrize("m,n", [(1, 7), (10, 1000), (13, 2500)])
def test_base2_online_softmax_on_descending_blocks(backend, m, n):
    """``online_softmax_step(log2_scale=)`` (the max of unscaled scores, the
    scale folded into exp2) and a grid launched last block first, with a
    partial last block (m not a multiple of 4): every row written once."""
    x = torch.randn(m, n, device=DEVICE) * 4
    out = torch.full_like(x, float("nan"))
    run(K.softmax_online_base2, x, out, 0.3, backend=backend)
    assert_close(out, torch.softmax(x.double() * 0.3, -1), torch.float32, f"softmax {backend}")
    assert "parallel M block=4 descending" in str(K.softmax_online_base2)
    if backend == "triton":
        src = kernelforge.backends.registry.backends()["triton"].source(
            K.softmax_online_base2.specialize({"x": kl.f32, "out": kl.f32}, {"N": n}))
        assert "(tl.num_programs(0) - 1 - tl.program_id(0))" in src


@pytest.mark.parametrize("backend", ["eager", "inductor", "triton", "cpp"])
@pytest.mark.parametrize("m,n", [(1, 1), (17, 100), (40, 130)])
def test_flash_attention_dot_and_online_softmax(backend, m, n):
    if backend == "inductor" and (m, n) != (17, 100):
        pytest.skip("one Inductor compile is enough: the torch source is the eager one")
    g = torch.Generator().manual_seed(m * n)
    q, k, v = (torch.randn(s, 64, generator=g).to(DEVICE) for s in (m, n, n))
    o = torch.empty(m, 64, device=DEVICE)
    run(K.flash_attention, q, k, v, o, 0.125, backend=backend)
    ref = torch.softmax(q.double() @ k.double().T * 0.125, -1) @ v.double()
    assert_close(o, ref, torch.float32, f"attention {backend}")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_cumsum_argmax_max(backend):
    x = torch.randn(5, 300, device=DEVICE)
    x[2, 17] = x[2, 200] = 50.0                    # a tie: the lower index wins, as in torch
    cs, am, mx = torch.empty_like(x), torch.empty(5, dtype=torch.int32, device=DEVICE), \
        torch.empty(5, device=DEVICE)
    run(K.cumsum_argmax, x, cs, am, mx, backend=backend)
    # a prefix sum rounds once per add: its error grows with the sum of |x| so far,
    # not with |the prefix| (which cancellation can make small), so that is the allowance
    extra = tolerance(torch.float32).rtol * torch.cumsum(x.double().abs(), -1)
    assert_close(cs, torch.cumsum(x.double(), -1), torch.float32, "cumsum", extra=extra)
    assert torch.equal(am.long(), torch.argmax(x, -1))
    assert am[2].item() == 17
    assert torch.equal(mx, x.max(-1).values)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_sort_and_topk(backend):
    if backend == "triton" and CPU_INTERP:
        # tl.sort/tl.topk are Triton library functions decorated when triton is
        # imported: the interpreter can run them only if TRITON_INTERPRET=1 was
        # set before that import, so this case runs in its own process.
        import os, subprocess, sys
        env = dict(os.environ, TRITON_INTERPRET="1")
        code = "import test_ir_capabilities as t; t._check_sort_topk('triton')"
        r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return
    _check_sort_topk(backend)


def _check_sort_topk(backend):
    x = torch.randn(4, 100, device=DEVICE)
    srt, top = torch.empty_like(x), torch.empty(4, 4, device=DEVICE)
    run(K.sort_topk, x, srt, top, backend=backend)
    assert torch.equal(srt, torch.sort(x, -1, descending=True).values)
    assert torch.equal(top, torch.topk(x, 4, -1).values)


def test_sort_and_topk_compile_for_gpus():
    pytest.importorskip("triton")
    from kernelforge import aot
    from kernelforge.backends import registry
    be = registry.backends()["triton"]
    for target in aot.TARGETS:
        r = aot.compile_one(K.sort_topk, {"x": kernelforge.lang.f32, "srt": kernelforge.lang.f32,
                                          "top": kernelforge.lang.f32}, {"N": 128, "K": 4},
                            target, be)
        assert r.ok, r.detail


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_gather_by_loaded_index(backend):
    table = torch.randn(50, 96, device=DEVICE)
    ids = torch.tensor([3, 49, 0, 3, 17], dtype=torch.int64, device=DEVICE)
    out = torch.empty(5, 96, device=DEVICE)
    run(K.gather_rows, table, ids, out, backend=backend)
    assert torch.equal(out, table[ids])


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("n", [8, 128, 4000])
def test_offset_tiles_rotate_halves(backend, n):
    x = torch.randn(3, n, device=DEVICE)
    out = torch.empty_like(x)
    run(K.rotate_halves, x, out, backend=backend)
    assert torch.equal(out, torch.cat([x[:, n // 2:], x[:, :n // 2]], -1))


def _philox_reference(counter: int, key: tuple[int, int]) -> list[int]:
    """Philox 4x32-10 from the paper's definition, in Python integers."""
    c, (k0, k1) = [counter, 0, 0, 0], key
    mask = 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c[3] ^ k1) & mask,
             p0 & mask]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_philox_bit_identical_to_reference(backend):
    counters = [0, 1, 2, 12345, 2 ** 31 + 7, 2 ** 32 - 1] + list(range(100, 140))
    key = (0xDEADBEEF, 42)
    counter = torch.tensor(np.array(counters, dtype=np.uint32)).to(DEVICE)
    seed = torch.tensor(np.array(key, dtype=np.uint32)).to(DEVICE)
    out = torch.zeros(len(counters), 4, dtype=torch.uint32, device=DEVICE)
    run(K.philox, counter, seed, out, backend=backend)
    got = out.cpu().numpy().astype(np.uint64).tolist()
    assert got == [_philox_reference(c, key) for c in counters]


@pytest.mark.parametrize("backend", ["eager", "inductor", "triton", "cpp"])
def test_explicit_casts_are_honoured(backend):
    """Inductor, left alone, fuses through f32->bf16->f32 and skips the rounding."""
    a = torch.randn(4, 1000, device=DEVICE).bfloat16()
    b = torch.randn(4, 1000, device=DEVICE).bfloat16()
    out = torch.empty(4, 1000, device=DEVICE)
    run(K.round_trip, a, b, out, backend=backend)
    assert torch.equal(out, (a.float() + b.float()).bfloat16().float() * 3.0)


@pytest.mark.parametrize("backend", ["eager", "inductor", "triton", "cpp"])
def test_outputs_allocated_by_the_backend(backend):
    """NewTensor outputs: Inductor returns them from its graph when an output
    is written whole (one store, or pieces that tile it exactly, joined by one
    torch.cat); otherwise (a masked store) it falls back to writing into an
    allocated tensor. Either way launch returns them."""
    from kernelforge.dispatch import NewTensor
    from kernelforge.lower.torch_printer import can_return
    x = torch.randn(3, 1000, device=DEVICE)
    (y,) = kernelforge.launch(K.softmax_online, x, NewTensor(x.shape, x.dtype, DEVICE),
                              backend=backend)
    assert_close(y, torch.softmax(x.double(), -1), torch.float32, "softmax into a new tensor")
    x = torch.randn(3, 64, device=DEVICE)
    (r,) = kernelforge.launch(K.rotate_halves, x, NewTensor(x.shape, x.dtype, DEVICE),
                              backend=backend)
    assert torch.equal(r, torch.cat([x[:, 32:], x[:, :32]], -1))
    assert can_return(K.softmax_online.specialize({}, {"N": 1000}), "out")
    assert can_return(K.rotate_halves.specialize({}, {"N": 64}), "out")
    assert not can_return(K.ranged_softmax_blocks.specialize({"hi": kl.i64}), "out")
    hi = torch.tensor([64, 3, 0], device=DEVICE)
    (o,) = kernelforge.launch(K.ranged_softmax_blocks, x, hi, NewTensor(x.shape, x.dtype, DEVICE),
                              backend=backend)
    for i in range(3):
        assert_close(o[i, :hi[i]], torch.softmax(x[i, :hi[i]].double(), -1), torch.float32,
                     "a masked store into a new tensor")


@pytest.mark.parametrize("backend", ["eager", "inductor", "triton", "cpp"])
def test_loaded_values_are_snapshots_even_in_place(backend):
    x = torch.randn(3, 64, device=DEVICE)
    orig = x.clone()
    out2 = torch.empty_like(x)
    run(K.store_then_reuse, x, x, out2, backend=backend)      # out is x itself
    assert torch.equal(x, orig * 2.0)
    assert torch.equal(out2, orig + 1.0)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_integer_semantics(backend):
    vals = np.array([[0, 1, 2 ** 31, 2 ** 32 - 1, 12345, 7, 99, 3]], dtype=np.uint32)
    x = torch.tensor(vals).to(DEVICE)
    seed = 0x80000000
    outs = [torch.empty(1, 8, dtype=torch.uint32, device=DEVICE) for _ in range(2)]
    wrapped = torch.empty(1, 8, dtype=torch.int32, device=DEVICE)
    run(K.int_semantics, x, seed, *outs, wrapped, backend=backend)
    mask = 0xFFFFFFFF
    want_hash = [((int(v) ^ ((seed + 0x9E3779B9) & mask)) >> 16) for v in vals[0]]
    want_flip = [((~int(v)) & mask) >> 28 for v in vals[0]]
    want_wrap = np.array([n * 1000000000 for n in range(8)], dtype=np.int64).astype(np.int32)
    assert outs[0].cpu().numpy().astype(np.int64).tolist() == [want_hash]
    assert outs[1].cpu().numpy().astype(np.int64).tolist() == [want_flip]
    assert wrapped.cpu().numpy().tolist() == [want_wrap.tolist()]


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bool_reduction_over_a_padded_tile(backend):
    x = torch.tensor([[1.0, 2, 3, 4, 5], [1, -2, 3, 4, 5]], device=DEVICE)   # N=5: padded
    out = torch.empty(2, dtype=torch.bool, device=DEVICE)
    run(K.all_positive, x, out, backend=backend)
    assert out.tolist() == [True, False]


@pytest.mark.parametrize("backend", ["eager", "inductor", "triton", "cpp"])
def test_kernels_from_a_factory_do_not_share_a_cache_entry(backend):
    x = torch.randn(2, 8, device=DEVICE)
    for c in (2.0, 3.0):
        out = torch.empty_like(x)
        run(K.make_scaler(c), x, out, backend=backend)
        assert torch.equal(out, x * c)


def test_returned_output_is_never_an_input():
    from kernelforge.dispatch import NewTensor
    x = torch.randn(2, 8, device=DEVICE)
    (y,) = kernelforge.launch(K.copy_rows, x, NewTensor(x.shape, x.dtype, DEVICE),
                              backend="inductor")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_launch_checks_that_shared_axes_agree(backend):
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"`out` dim 0 is axis M, expected 4 \(dim 0 of `x`\), "
                                         r"got 3"):
        run(K.copy_rows, x, torch.empty(3, 8, device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", ["eager", "inductor", "triton", "cpp"])
def test_loops_with_a_range_per_row(backend):
    """seq_for(start=, stop=): each row visits only its own [start, stop);
    a row with an empty range sums to 0. Ranges that vary inside one program
    (rows in blocks of 4) mask per row."""
    g = torch.Generator().manual_seed(3)
    M, N = 7, 300
    x = torch.randn(M, N, generator=g).to(DEVICE)
    x[:, 250:] = float("nan")       # never inside any row's range: must never be read
    lo = torch.tensor([0, 5, 100, 249, 0, 10, 7], device=DEVICE)
    hi = torch.tensor([250, 6, 250, 250, 0, 200, 8], device=DEVICE)
    out = torch.full((M,), 99.0, device=DEVICE)
    run(K.ranged_sums, x, lo, hi, out, backend=backend)
    ref = torch.stack([x[i, lo[i]:hi[i]].double().sum() for i in range(M)])
    assert_close(out, ref, torch.float32, f"ranged sums {backend}")

    hi2 = torch.tensor([250, 1, 50, 249, 3, 200, 8], device=DEVICE)
    o2 = torch.full((M, N), -5.0, device=DEVICE)
    run(K.ranged_softmax_blocks, x, hi2, o2, backend=backend)
    ref2 = torch.full((M, N), -5.0, dtype=torch.float64)
    for i in range(M):
        ref2[i, :hi2[i]] = torch.softmax(x[i, :hi2[i]].double(), 0)
    assert_close(o2, ref2, torch.float32, f"per-row softmax {backend}")


@pytest.mark.parametrize("backend", ["eager", "inductor", "triton", "cpp"])
def test_masked_scatter_skips_masked_rows(backend):
    """store(..., mask=): rows whose slot is -1 are not written anywhere."""
    xs = torch.randn(6, 8, device=DEVICE)
    slot = torch.tensor([3, -1, 0, 9, -1, 5], device=DEVICE)
    table = torch.full((10, 8), 7.0, device=DEVICE)
    run(K.scatter_rows, xs, slot, table, backend=backend)
    ref = torch.full((10, 8), 7.0, device=DEVICE)
    for i in range(6):
        if slot[i] >= 0:
            ref[slot[i]] = xs[i]
    assert torch.equal(table, ref)
