"""dispatch.launch checks what a kernel's signature says before any
lowering runs: the argument count, every static and derived axis extent,
empty static axes; and a default backend that fails to build steps aside."""
import warnings

import pytest
import torch

import kernelforge.lang as kl
from kernelforge import dispatch
from kernelforge.backends import registry
from kernelforge.backends.eager import EagerBackend
from kernelforge.dispatch import NewTensor, launch
from conftest import BACKENDS


@kl.kernel(static=("N",), derived={"H": lambda s: s["N"] // 2})
def halves_sum(x: kl.In("M", "N"), out: kl.Out("M", "H")):
    m, h = kl.parallel("M"), kl.tile("H")
    kl.store(out[m, h], kl.load(x[m, h]) + kl.load(x[m, h + kl.size("H")]))


def test_a_missing_argument_is_named():
    with pytest.raises(TypeError, match=r"launch\(halves_sum\): expected 2 arguments \(x, out\), "
                                        r"got 1"):
        launch(halves_sum, torch.randn(3, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_output_off_its_derived_axis_is_refused(backend):
    """H = N // 2: an output with 3 columns for N = 8 would be written past
    its end or left partly unwritten, depending on the lowering."""
    x = torch.randn(3, 8)
    for cols in (3, 5):
        with pytest.raises(ValueError, match=rf"`out` dim 1 is axis H, expected 4 .* got {cols}"):
            launch(halves_sum, x, torch.empty(3, cols), backend=backend)
        with pytest.raises(ValueError, match=r"axis H, expected 4"):
            launch(halves_sum, x, NewTensor((3, cols), torch.float32, "cpu"), backend=backend)
    (y,) = launch(halves_sum, x, NewTensor((3, 4), torch.float32, "cpu"), backend=backend)
    torch.testing.assert_close(y, x[:, :4] + x[:, 4:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_static_axis_is_refused_not_launched(backend):
    """A static axis of extent 0 crashed the Triton interpreter (tl.arange(0, 0))."""
    with pytest.raises(ValueError, match=r"static axis N, expected at least 1, got 0"):
        launch(halves_sum, torch.randn(3, 0), torch.empty(3, 0), backend=backend)


class _BrokenBuild(EagerBackend):
    name = "brokenbuild"
    description = "builds nothing (test)"

    def default_priority(self, device):
        return 99, "wants to be the default (test)"

    def build(self, kernel, device):
        raise RuntimeError("vendor compiler crashed (test)")


@pytest.fixture
def broken_default():
    registry.register(_BrokenBuild())
    yield
    registry.backends().pop("brokenbuild")
    registry.reset()


def test_a_default_backend_that_fails_to_build_falls_back_with_a_warning(broken_default,
                                                                          monkeypatch):
    monkeypatch.delenv("KERNELFORGE_BACKEND", raising=False)
    x = torch.randn(2, 6)
    with pytest.warns(RuntimeWarning, match=r"'brokenbuild' failed to build `halves_sum`.*"
                                            r"vendor compiler crashed.*running it on"):
        (y,) = launch(halves_sum, x, NewTensor((2, 3), torch.float32, "cpu"))
    torch.testing.assert_close(y, x[:, :3] + x[:, 3:])
    with warnings.catch_warnings():          # the decision is cached: one warning
        warnings.simplefilter("error")
        launch(halves_sum, x, NewTensor((2, 3), torch.float32, "cpu"))


def test_an_explicit_backend_that_fails_to_build_raises(broken_default):
    with pytest.raises(RuntimeError, match="vendor compiler crashed"):
        launch(halves_sum, torch.randn(2, 6), NewTensor((2, 3), torch.float32, "cpu"),
               backend="brokenbuild")


def test_specialization_reports_static_sizes_only():
    dtypes, sizes = dispatch.specialization(halves_sum, (torch.randn(2, 6), torch.empty(2, 3)))
    assert sizes == {"N": 6}
