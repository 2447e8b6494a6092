"""Outputs the backend allocates (``NewTensor``) keep the shape they were
declared with on every lowering, size-1 axes included."""
import pytest
import torch

import kernelforge
import kernelforge.lang as kl
from kernelforge.dispatch import NewTensor
from conftest import BACKENDS, DEVICE


@kl.kernel(static=("K",))
def column_by_literal(x: kl.In("T"), out: kl.Out("T", "K")):
    """out[t, 0] = 2 x[t]: the literal index drops K from the stored value."""
    t = kl.parallel("T")
    kl.store(out[t, 0], kl.load(x[t]) * 2.0)


@kl.kernel(static=("K",))
def column_copy_by_literal(x: kl.In("T"), out: kl.Out("T", "K")):
    """out[t, 0] = x[t], the stored value a load (the returned output must be a copy)."""
    t = kl.parallel("T")
    kl.store(out[t, 0], kl.load(x[t]))


@kl.kernel(static=("K",))
def column_by_tile(x: kl.In("T"), out: kl.Out("T", "K")):
    t, k = kl.parallel("T"), kl.tile("K")
    kl.store(out[t, k], kl.zeros(kl.f32, "K") + kl.load(x[t]) * 2.0)


@kl.kernel(static=("J", "K"))
def corner_by_literals(x: kl.In("T"), out: kl.Out("J", "T", "K")):
    t = kl.parallel("T")
    kl.store(out[0, t, 0], kl.load(x[t]) + 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kdef,ref", [
    (column_by_literal, lambda x: (x * 2)[:, None]),
    (column_copy_by_literal, lambda x: x[:, None]),
    (column_by_tile, lambda x: (x * 2)[:, None]),
])
def test_size_one_output_axis_is_kept(backend, kdef, ref):
    x = torch.randn(5, device=DEVICE)
    (out,) = kernelforge.launch(kdef, x, NewTensor((5, 1), torch.float32, DEVICE),
                                backend=backend)
    assert out.shape == (5, 1)
    assert torch.equal(out, ref(x))
    if kdef is column_copy_by_literal:
        assert out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_size_one_axes_around_a_runtime_axis(backend):
    x = torch.randn(6, device=DEVICE)
    (out,) = kernelforge.launch(corner_by_literals, x, NewTensor((1, 6, 1), torch.float32, DEVICE),
                                backend=backend)
    assert out.shape == (1, 6, 1)
    assert torch.equal(out, (x + 1)[None, :, None])
