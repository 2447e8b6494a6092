"""RMSNorm family: what its spec's generated tests (tests/test_ops.py) do not
cover: NaN and inf, rows that cannot be viewed, a second reference (torch's
own F.rms_norm) and rows longer than a Triton block."""
import pytest
import torch

import kernelforge
from kernelforge.tolerance import assert_close
from conftest import BACKENDS, DEVICE
import reference


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
