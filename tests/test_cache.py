"""Caching: what is in the key, what is not, and the on-disk cache's safety."""
import os
import threading
import warnings

import pytest
import torch

import kernelforge
import kernelforge.lang as kl
from kernelforge import cache
from kernelforge.dispatch import compiled
from conftest import DEVICE
from kernelforge.kernels.rmsnorm import rms_norm_fwd

QUAL = "kernelforge.kernels.rmsnorm.rms_norm_fwd"


def builds(backend):
    return cache.stats[(QUAL, backend)]


@pytest.mark.parametrize("backend", ["eager", "triton", "inductor"])
def test_new_row_count_or_eps_does_not_recompile(backend):
    import torch._dynamo.utils as dyn
    hidden = 333                       # a size no other test uses: the first call builds
    w = torch.randn(hidden, device=DEVICE)
    before, graphs_before = builds(backend), dyn.counters["stats"]["unique_graphs"]
    for rows, eps, offset in ((1, 1e-6, 0.0), (2, 1e-5, 1.0), (5, 1e-6, 1e-6), (0, 3e-3, 0.5),
                              (33, 0.5, 0.0), (7, 2e-6, -1.0)):
        x = torch.randn(rows, hidden, device=DEVICE)
        kernelforge.ops.rms_norm(x, w, eps, offset=offset, backend=backend)
    assert builds(backend) - before == 1
    if backend == "inductor":   # and torch.compile traced one graph for every row count
        assert dyn.counters["stats"]["unique_graphs"] - graphs_before == 1


def test_static_sizes_and_dtypes_are_in_the_key():
    w = torch.randn(40)
    before = builds("eager")
    kernelforge.ops.rms_norm(torch.randn(3, 40), w, backend="eager")
    kernelforge.ops.rms_norm(torch.randn(3, 41), torch.randn(41), backend="eager")
    kernelforge.ops.rms_norm(torch.randn(3, 40).half(), w, backend="eager")
    kernelforge.ops.rms_norm(torch.randn(9, 40).half(), w, backend="eager")
    assert builds("eager") - before == 3


def _only_kernel():
    @kl.kernel(static=("N",))
    def cache_probe(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], kl.load(x[m, n]) * 2.0)
    return cache_probe


def test_sources_are_written_atomically_and_named_by_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELFORGE_CACHE_DIR", str(tmp_path))
    k = _only_kernel()
    x = torch.randn(2, 8)
    out = torch.empty_like(x)
    kernelforge.launch(k, x, out, backend="eager")
    assert torch.equal(out, x * 2)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("torch_cache_probe_") and files[0].endswith(".py")
    text = (tmp_path / files[0]).read_text()
    assert text.rstrip().splitlines()[-1].startswith("# kernelforge-sha256: ")

    # many writers of the same entry at once: every one sees a complete file
    src = text.rpartition("\n# kernelforge-sha256: ")[0]
    errors = []

    def write():
        try:
            path = cache.write_source("torch", "cache_probe", src)
            assert cache._valid(path, src)
        except Exception as e:   # noqa: BLE001 - collected for the assert below
            errors.append(e)
    threads = [threading.Thread(target=write) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELFORGE_CACHE_DIR", str(tmp_path))
    k = _only_kernel()
    spec = k.specialize({}, {"N": 8})
    from kernelforge.lower import torch_printer
    src = torch_printer.print_module(spec)
    path = cache.write_source("torch", spec.name, src)
    with open(path, "w") as f:          # a truncated write from a crashed process
        f.write(src[: len(src) // 2])
    with pytest.warns(RuntimeWarning, match="corrupt cache entry"):
        mod = cache.load_module("torch", spec.name, src)
    assert cache._valid(path, src)
    x = torch.randn(3, 8)
    out = torch.empty_like(x)
    getattr(mod, spec.name)(x, out)
    assert torch.equal(out, x * 2)


def test_dump_switch_prints_generated_code(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("KERNELFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KERNELFORGE_DUMP", "1")
    k = _only_kernel()
    x = torch.randn(2, 16)
    kernelforge.launch(k, x, torch.empty_like(x), backend="triton")
    err = capfd.readouterr().err
    assert "kernelforge triton module for `cache_probe`" in err
    assert "@triton.jit" in err and "def cache_probe_kernel(" in err


def test_compiled_callable_is_reused():
    x, out = torch.randn(4, 40), torch.empty(4, 40)
    w = torch.randn(40)
    f1, _ = compiled(rms_norm_fwd, (x, w, out, 1e-6, 0.0), "eager")
    f2, _ = compiled(rms_norm_fwd, (x[:1], w, out[:1], 1e-5, 1.0), "eager")
    assert f1 is f2


def test_an_unusable_cache_directory_falls_back_with_a_warning(tmp_path, monkeypatch):
    """A file where the cache directory should be: generated modules go to a
    private temporary directory for this process, with one warning."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("KERNELFORGE_CACHE_DIR", str(blocker))
    monkeypatch.setattr(cache, "_fallback", {})
    with pytest.warns(RuntimeWarning, match="cannot use the cache directory .*not-a-dir"):
        mod = cache.load_module("torch", "fallback_probe", "def f():\n    return 7\n")
    assert mod.f() == 7 and mod.__file__.startswith(cache._fallback[str(blocker)])
    # the second module reuses the fallback without another warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load_module("torch", "fallback_probe2", "def g():\n    return 8\n").g() == 8
