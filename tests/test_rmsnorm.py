"""RMSNorm family: every backend against the float64 reference, under the
one tolerance policy (kernelforge/tolerance.py)."""
import pytest
import torch
from hypothesis import given, strategies as st

import kernelforge
from kernelforge.tolerance import assert_close
from conftest import BACKENDS, DEVICE
import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Inductor compiles once per (dtype, hidden size): draw from a few sizes so the
# suite stays within its time budget; eager and triton take any size.
HIDDEN = {
    "eager": st.one_of(st.integers(1, 5000), st.sampled_from([576, 4097, 16384])),
    "inductor": st.sampled_from([576, 4097]),
    "triton": st.sampled_from([1, 7, 64, 576, 1000, 4097, 16384]),
    # the C++ lowering compiles each hidden size too (about 1 s with g++ -O3)
    "cpp": st.sampled_from([1, 576, 4097, 16384]),
}
# The Triton interpreter runs one program per row in numpy: keep row counts small on CPU.
MAX_ROWS = {"eager": 9, "inductor": 9, "triton": 9 if DEVICE.type == "cuda" else 3, "cpp": 9}


@st.composite
def problems(draw, backend):
    hidden = draw(HIDDEN[backend])
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    rows = 1
    for d in lead:
        rows *= d
    if rows > MAX_ROWS[backend]:
        lead = [min(MAX_ROWS[backend], 3)]
    strided = len(lead) == 1 and draw(st.booleans())
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    w_dtype = dtype if backend == "inductor" else draw(st.sampled_from([dtype, torch.float32]))
    eps = draw(st.one_of(st.sampled_from([1e-6, 1e-5]), st.floats(1e-8, 1.0)))
    offset = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-1.0, 1.0)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return hidden, dtype, tuple(lead), strided, scale, w_dtype, eps, offset, seed


def make(shape, dtype, scale, seed, strided):
    g = torch.Generator().manual_seed(seed)
    if strided:   # rows with a stride larger than the hidden size
        base = torch.randn(shape[0], shape[1] + 5, generator=g) * scale
        return base.to(dtype).to(DEVICE)[:, 3:3 + shape[1]]
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_rms_norm_matches_float64(backend, data):
    hidden, dtype, lead, strided, scale, w_dtype, eps, offset, seed = data.draw(problems(backend))
    x = make((*lead, hidden), dtype, scale, seed, strided)
    w = make((hidden,), w_dtype, 1.0, seed + 1, False)
    y = kernelforge.ops.rms_norm(x, w, eps, offset=offset, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, reference.rms_norm(x, w, eps, offset), dtype, f"rms_norm[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), inplace=st.booleans())
def test_fused_add_rms_norm_matches_float64(backend, data, inplace):
    hidden, dtype, lead, strided, scale, w_dtype, eps, offset, seed = data.draw(problems(backend))
    x = make((*lead, hidden), dtype, scale, seed, strided)
    r = make((*lead, hidden), dtype, scale, seed + 2, strided)
    w = make((hidden,), w_dtype, 1.0, seed + 1, False)
    ref_y, ref_s = reference.fused_add_rms_norm(x, r, w, eps, offset)
    xi, ri = x.clone(), r.clone()
    y, s = kernelforge.ops.fused_add_rms_norm(xi, ri, w, eps, offset=offset, inplace=inplace,
                                              backend=backend)
    if inplace:
        assert y is xi and s is ri
    else:   # inputs untouched
        assert torch.equal(xi, x) and torch.equal(ri, r)
    assert_close(s, ref_s, dtype, f"fused residual sum[{backend}]")
    assert_close(y, ref_y, dtype, f"fused normed[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_return_empty(backend, dtype):
    x = torch.empty(0, 576, dtype=dtype, device=DEVICE)
    w = torch.ones(576, dtype=dtype, device=DEVICE)
    assert kernelforge.ops.rms_norm(x, w, backend=backend).shape == (0, 576)
    y, s = kernelforge.ops.fused_add_rms_norm(x, x.clone(), w, backend=backend)
    assert y.shape == s.shape == (0, 576)
    assert kernelforge.ops.rms_norm(x.view(0, 2, 576), w, backend=backend).shape == (0, 2, 576)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_pass_through(backend):
    dtype = torch.float32
    x = torch.randn(4, 576, device=DEVICE)
    x[1, 7] = float("nan")
    x[2, 9] = float("inf")
    w = torch.randn(576, device=DEVICE)
    y = kernelforge.ops.rms_norm(x, w, backend=backend)
    ref = reference.rms_norm(x, w, 1e-6)
    assert y[1].isnan().all() and y[2].isnan().any()   # inf/inf in the row's scale
    assert_close(y, ref, dtype, "rows with NaN and inf")
    assert_close(y[[0, 3]], ref[[0, 3]], dtype, "clean rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_argument_and_non_viewable_rows(backend):
    dtype = torch.bfloat16
    base = torch.randn(3, 4, 600, device=DEVICE).to(dtype)
    x = base.transpose(0, 1)[:, :, :576]          # [4, 3, 576]: leading dims not collapsible
    w = torch.randn(576, device=DEVICE).to(dtype)
    out = torch.full((4, 3, 576), 7.0, dtype=dtype, device=DEVICE)
    y = kernelforge.ops.rms_norm(x, w, 1e-5, out=out, backend=backend)
    assert y is out
    assert_close(out, reference.rms_norm(x, w, 1e-5), dtype, "out=")
    xr = x.clone()
    rr = torch.randn_like(xr).transpose(0, 1).contiguous().transpose(0, 1)
    ref_y, ref_s = reference.fused_add_rms_norm(xr, rr, w, 1e-5)
    y, s = kernelforge.ops.fused_add_rms_norm(xr, rr, w, 1e-5, inplace=True, backend=backend)
    assert y is xr and s is rr
    assert_close(xr, ref_y, dtype, "in place, strided")
    assert_close(rr, ref_s, dtype, "in place residual, strided")


def test_backends_agree_with_torch_rms_norm():
    """A second, independent reference: torch's own F.rms_norm in float64."""
    x = torch.randn(5, 4097, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4097, dtype=torch.float64, device=DEVICE)
    ref = torch.nn.functional.rms_norm(x, (4097,), w, eps=1e-6)
    for backend in BACKENDS:
        y = kernelforge.ops.rms_norm(x.float(), w.float(), 1e-6, backend=backend)
        assert_close(y, ref, torch.float32, f"vs F.rms_norm [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden", [576, 4097])
def test_no_out_of_bounds_reads_or_writes(backend, hidden):
    """Rows live inside larger buffers: NaN poison around the input would leak
    into any row that read past its end, and sentinels around the output show
    any write past it."""
    rows, pad = 3, 37
    xbuf = torch.full((rows + 2, hidden + pad), float("nan"), device=DEVICE)
    x = xbuf[1:-1, 5:5 + hidden]
    x.copy_(torch.randn(rows, hidden, device=DEVICE))
    w = torch.randn(hidden, device=DEVICE)
    obuf = torch.full((rows + 2, hidden + pad), 123.0, device=DEVICE)
    out = obuf[1:-1, 5:5 + hidden]
    kernelforge.ops.rms_norm(x, w, out=out, backend=backend)
    assert_close(out, reference.rms_norm(x, w, 1e-6), torch.float32, "rows inside a buffer")
    untouched = obuf.clone()
    untouched[1:-1, 5:5 + hidden] = 123.0
    assert (untouched == 123.0).all(), "a write landed outside the output rows"
    rbuf = xbuf.clone()
    r = rbuf[1:-1, 5:5 + hidden]
    r.copy_(torch.randn(rows, hidden, device=DEVICE))
    kernelforge.ops.fused_add_rms_norm(x, r, w, inplace=True, backend=backend)
    for buf in (xbuf, rbuf):     # rows finite, every pad cell still NaN
        assert buf[1:-1, 5:5 + hidden].isfinite().all()
        pad = torch.ones_like(buf, dtype=torch.bool)
        pad[1:-1, 5:5 + hidden] = False
        assert buf[pad].isnan().all(), "a write landed outside the rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_16384_on_every_backend(backend):
    """Rows larger than one Triton block (16384 > the 1024 cap the tests set,
    and > the 8192 default) loop over chunks; every backend takes them."""
    x = torch.randn(2, 16384, device=DEVICE).bfloat16()
    r = torch.randn(2, 16384, device=DEVICE).bfloat16()
    w = torch.randn(16384, device=DEVICE).bfloat16()
    assert_close(kernelforge.ops.rms_norm(x, w, backend=backend), reference.rms_norm(x, w, 1e-6),
                 torch.bfloat16, f"hidden 16384 [{backend}]")
    y, s = kernelforge.ops.fused_add_rms_norm(x, r, w, backend=backend)
    ref_y, ref_s = reference.fused_add_rms_norm(x, r, w, 1e-6)
    assert_close(s, ref_s, torch.bfloat16, "sum")
    assert_close(y, ref_y, torch.bfloat16, "normed")
