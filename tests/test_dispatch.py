"""Backend selection per device, overrides, explain(), plug-ins."""
import warnings

import pytest
import torch

import kernelforge
from kernelforge.backends import registry
from kernelforge.backends.eager import EagerBackend

X, W = torch.randn(2, 64), torch.randn(64)


@pytest.fixture
def clean_registry():
    saved = registry._backends
    registry._backends = None
    registry.reset()
    yield
    registry._backends = saved
    registry.reset()


def test_cpu_default_is_cpp_and_explained(monkeypatch):
    monkeypatch.delenv("KERNELFORGE_BACKEND", raising=False)
    from kernelforge.backends.cpp import compiler
    e = kernelforge.explain("rms_norm", X, W, torch.empty(2, 64))
    assert e.backend == ("cpp" if compiler()[0] else "inductor")
    text = str(e)
    assert "highest default priority for cpu" in text
    assert "eager" in text and "triton" in text and "interpreter" in text and "inductor" in text
    assert "rms_norm_fwd" in text and "N=64" in text


def test_no_compiler_falls_back_to_inductor(monkeypatch):
    """Without a C++ compiler the cpp backend steps aside, with the reason."""
    from kernelforge.backends import cpp
    monkeypatch.setattr(cpp, "compiler", lambda: (None, "no C++ compiler found (test)"))
    monkeypatch.delenv("KERNELFORGE_BACKEND", raising=False)
    registry.reset()
    try:
        d = registry.select(torch.device("cpu"))
        assert d.backend.name == "inductor"
        assert "no C++ compiler found (test)" in str(d)
        with pytest.raises(ValueError, match="cannot run on cpu tensors: no C\\+\\+ compiler"):
            registry.select(torch.device("cpu"), "cpp")
    finally:
        registry.reset()


def test_gpu_default_is_triton():
    from kernelforge.backends.triton import triton_import_error
    if triton_import_error():
        pytest.skip("triton not importable")
    d = registry.select(torch.device("cuda", 0))
    assert d.backend.name == "triton"
    assert any(name == "inductor" and prio is not None for name, prio, _ in d.candidates)


def test_environment_then_argument_override(monkeypatch):
    monkeypatch.setenv("KERNELFORGE_BACKEND", "eager")
    e = kernelforge.explain("rms_norm", X, W)
    assert e.backend == "eager" and "KERNELFORGE_BACKEND" in str(e)
    e = kernelforge.explain("rms_norm", X, W, backend="triton")
    assert e.backend == "triton" and "backend= argument" in str(e)
    before = kernelforge.cache.stats[("kernelforge.kernels.rmsnorm.rms_norm_fwd", "eager")]
    kernelforge.ops.rms_norm(torch.randn(2, 65), torch.randn(65))   # runs the env's choice
    assert kernelforge.cache.stats[("kernelforge.kernels.rmsnorm.rms_norm_fwd", "eager")] == \
        before + 1


def test_explain_rejects_unknown_op():
    with pytest.raises(ValueError, match="`op` expected one of"):
        kernelforge.explain("no_such_op", X)


class CountingBackend(EagerBackend):
    name = "vendorx"
    description = "a vendor's backend, for the test"
    calls = 0

    def default_priority(self, device):
        return 50, "the vendor claims cpu tensors"

    def build(self, kernel, device):
        fn = super().build(kernel, device)

        def run(*args):
            CountingBackend.calls += 1
            return fn(*args)
        return run


def test_registered_backend_becomes_the_default(clean_registry, monkeypatch):
    monkeypatch.delenv("KERNELFORGE_BACKEND", raising=False)
    registry.register(CountingBackend())
    assert kernelforge.explain("rms_norm", X, W).backend == "vendorx"
    before = CountingBackend.calls
    y = kernelforge.ops.rms_norm(X, W)
    assert CountingBackend.calls == before + 1
    from kernelforge.tolerance import assert_close
    import reference
    assert_close(y, reference.rms_norm(X, W, 1e-6), torch.float32, "through the plug-in")


class _EP:
    def __init__(self, name, value, factory):
        self.name, self.value, self._factory = name, value, factory

    def load(self):
        return self._factory


def test_entry_point_plugins_load_and_broken_ones_are_skipped(clean_registry, monkeypatch):
    def broken():
        raise ImportError("vendor SDK missing")
    eps = list(registry.entry_points(group="kernelforge.backends")) + [
        _EP("vendorx", "vendorx:spec", CountingBackend), _EP("bad", "bad:spec", broken),
        _EP("absent", "absent:spec", lambda: None)]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        names = set(registry.backends())
    assert {"eager", "inductor", "triton", "vendorx"} <= names and "bad" not in names
    assert any("'bad' failed to load" in str(x.message) for x in w)
