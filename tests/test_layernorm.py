"""layer_norm beyond the derived checks (tests/test_ops.py): the allowance of
docs/tolerance.md takes a backend's own fp32 summation order, and still
fails the one-pass statistics that the shifted sums replace."""
import pytest
import torch

import kernelforge
from kernelforge import testing
from kernelforge.kernels import layernorm
from kernelforge.spec import Call
from kernelforge.tolerance import assert_close
from conftest import BACKENDS, DEVICE

SPEC = kernelforge.ops.SPECS["layer_norm"]


def _case(n=4097, cancel=True):
    """Rows of 1000 + noise (std 1e-2), a bias that cancels the normalised term."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, generator=g) * 1e-2 + 1000.0
    w = torch.randn(n, generator=g)
    t = layernorm.reference(x, w, None, 1e-5)
    b = (-t[0]).float() if cancel else torch.randn(n, generator=g)
    return Call(dict(x=x.to(DEVICE), weight=w.to(DEVICE), bias=b.to(DEVICE), eps=1e-5),
                "1000 + noise")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_cancelling_the_term_inside_padded_buffers(backend):
    """Inductor sums a strided row in its own order (rstd off by ~4e-6 where
    the others are ~2e-8); y = term + bias near 0 then fails the plain rule by
    that error times |term|, which the allowance covers."""
    testing.check_poison(SPEC, _case(), backend)
    testing.check_reference(SPEC, _case(), backend)


def test_allowance_still_fails_one_pass_statistics():
    """E[x^2] - E[x]^2 in fp32 on rows of 1000 + noise cancels: far outside."""
    call = _case(cancel=False)
    a = testing.bound(SPEC, call)
    ref = SPEC.reference(a)[0]
    x = a.x.float().cpu()
    mean = x.mean(-1, keepdim=True)
    var = ((x * x).mean(-1, keepdim=True) - mean * mean).clamp_min(0)
    y = (x - mean) * torch.rsqrt(var + a.eps) * a.weight.cpu() + a.bias.cpu()
    with pytest.raises(AssertionError):
        assert_close(y, ref, torch.float32, "one pass", extra=SPEC.allowance(a, (ref,))[0])
