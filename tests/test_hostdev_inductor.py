"""Inductor (torch.compile) on the example device hostdev
(examples/kernelforge-hostdev, kf_hostdev/inductor.py): importing
``kf_hostdev.inductor`` registers Inductor's CPU code generation (C++
kernels on data pointers: hostdev memory is host memory) and a Dynamo device
interface for hostdev; then torch.compile, and KernelForge's ``inductor``
backend, run on hostdev tensors.

Importing kf_hostdev renames PrivateUse1 for the whole process, so every
check runs in one child process (this file run as a script), which reports
each check's outcome. References are CPU eager results on the same values.
Three Inductor compiles in all (about 10 s each on a small machine), into a
private Inductor cache, so that nothing is served from an earlier run.

The checks load the repository's kf_hostdev/inductor.py (the file under
test), over whichever kf_hostdev is installed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import traceback

import pytest

from child_checks import fail_on_failed, run_child_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "examples", "kernelforge-hostdev", "kf_hostdev", "inductor.py")
MARK = "HOSTDEV-INDUCTOR-CHECKS "
CHILD_TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("kf_hostdev") is None,
    reason="the example device kf_hostdev is not installed (make install installs it: "
           "pip install --no-deps --no-build-isolation ./examples/kernelforge-hostdev)")


# -- the checks (run in the child process) ---------------------------------------------

def _load_plugin():
    """kf_hostdev.inductor from this repository (importing it registers)."""
    import kf_hostdev
    if not os.path.exists(PLUGIN):
        import kf_hostdev.inductor as mod
        return mod
    spec = importlib.util.spec_from_file_location("kf_hostdev.inductor", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kf_hostdev.inductor"] = mod
    spec.loader.exec_module(mod)
    kf_hostdev.inductor = mod
    return mod


def _data(*shape, seed):
    import torch
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _on_hostdev_close_to(dev, ref, what):
    import torch
    assert isinstance(dev, torch.Tensor) and dev.device.type == "hostdev", \
        f"{what}: {type(dev).__name__} on {getattr(dev, 'device', None)}"
    got = dev.cpu()
    assert got.dtype == ref.dtype and got.shape == ref.shape, \
        f"{what}: {got.dtype} {list(got.shape)}, expected {ref.dtype} {list(ref.shape)}"
    torch.testing.assert_close(got, ref, msg=what)


@contextlib.contextmanager
def _generated_code():
    """The source of every module Inductor compiles inside the block (as
    torch._inductor.utils.run_and_get_code, without its torch._dynamo.reset())."""
    from unittest import mock
    from torch._inductor.graph import GraphLowering
    codes: list = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        yield codes


def _is_inductor_cpp(code: str, what: str):
    """``code`` (a compiled module's source) is Inductor's C++ on hostdev
    buffers, not an eager fallback."""
    assert "async_compile.cpp_pybinding" in code and 'extern "C"' in code, \
        f"{what}: no C++ kernel in the generated code:\n{code[:3000]}"
    assert "device='hostdev'" in code, f"{what}: no hostdev buffer in the generated code"


def not_registered_before_import():
    """With only kf_hostdev imported, KernelForge's inductor backend declines
    hostdev (Inductor has no code generator for it; backend='inductor' is an
    error saying so) and hostdev_cpp is the default."""
    import torch
    import kernelforge.ops
    from kernelforge.backends import registry
    dev = torch.device("hostdev")
    ok, why = registry.backends()["inductor"].can_run(dev)
    assert not ok and "no code generator for hostdev" in why, (ok, why)
    assert registry.select(dev).backend.name == "hostdev_cpp"
    x, w = _data(2, 64, seed=5).to(dev), _data(64, seed=6).to(dev)
    try:
        kernelforge.ops.rms_norm(x, w, 1e-6, backend="inductor")
    except ValueError as e:
        assert "no code generator for hostdev" in str(e), str(e)
    else:
        raise AssertionError("backend='inductor' ran on hostdev before the registration")


def torch_compile_on_hostdev():
    """torch.compile(rms_norm(x, w) * 2) on bfloat16 hostdev tensors:
    Inductor's C++ kernel, a hostdev result equal to CPU eager's (to bfloat16
    tolerance: Inductor rounds once, from float32)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    def f(x, w):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), w) * 2

    x, w = _data(6, 64, seed=1).bfloat16(), _data(64, seed=2).bfloat16()
    out, codes = run_and_get_code(torch.compile(f, fullgraph=True), x.to("hostdev"),
                                  w.to("hostdev"))
    _on_hostdev_close_to(out, f(x, w), "torch.compile(rms_norm * 2)")
    assert len(codes) == 1, f"{len(codes)} compiled modules"
    _is_inductor_cpp(codes[0], "torch.compile(rms_norm * 2)")


def kernelforge_inductor_on_hostdev():
    """kernelforge.ops.rms_norm(..., backend='inductor') on bfloat16 hostdev
    tensors: Inductor's C++, equal to CPU eager (to bfloat16 tolerance);
    other row counts reuse the compiled graph; the inductor backend can run
    on hostdev now, below hostdev_cpp, which stays the default. (bfloat16:
    get_current_backend() must name "cpp" for hostdev.)"""
    import torch
    import kernelforge.ops
    from kernelforge.backends import registry
    from torch._dynamo.utils import counters

    dev = torch.device("hostdev")
    ok, why = registry.backends()["inductor"].can_run(dev)
    assert ok, why
    decision = registry.select(dev)
    prio = {name: p for name, p, _ in decision.candidates}
    assert decision.backend.name == "hostdev_cpp", str(decision)
    assert prio["inductor"] is not None and prio["inductor"] < prio["hostdev_cpp"], str(decision)

    x, w = _data(5, 128, seed=3).bfloat16(), _data(128, seed=4).bfloat16()
    xd, wd = x.to("hostdev"), w.to("hostdev")

    def ref(rows, eps):      # in float32, rounded once
        return torch.nn.functional.rms_norm(x[:rows].float(), (128,), w.float(),
                                            eps).bfloat16()

    with _generated_code() as codes:
        out = kernelforge.ops.rms_norm(xd, wd, 1e-6, backend="inductor")
    _on_hostdev_close_to(out, ref(5, 1e-6), "rms_norm (5 rows)")
    assert len(codes) == 1, f"{len(codes)} compiled modules"
    _is_inductor_cpp(codes[0], "kernelforge rms_norm")
    frames = sum(counters["frames"].values())
    for rows, eps in ((1, 1e-5), (0, 1e-6), (3, 1e-6)):
        with _generated_code() as codes:
            out = kernelforge.ops.rms_norm(xd[:rows], wd, eps, backend="inductor")
        _on_hostdev_close_to(out, ref(rows, eps), f"rms_norm ({rows} rows, eps {eps})")
        assert codes == [] and sum(counters["frames"].values()) == frames, \
            f"{rows} rows, eps {eps}: compiled again"


def kernelforge_fused_add_rms_norm_on_hostdev():
    """kernelforge.ops.fused_add_rms_norm(..., backend='inductor') on float32
    hostdev tensors equals CPU eager's x + residual and rms_norm of it. (Its
    graph reaches the scheduler's CPU-only checks, BaseSchedulerNode.is_cpu(),
    which must count hostdev nodes as CPU ones.)"""
    import torch
    import kernelforge.ops

    x, r, w = _data(4, 256, seed=7), _data(4, 256, seed=8), _data(256, seed=9)
    with _generated_code() as codes:
        normed, total = kernelforge.ops.fused_add_rms_norm(
            x.to("hostdev"), r.to("hostdev"), w.to("hostdev"), 1e-6, backend="inductor")
    assert len(codes) == 1, f"{len(codes)} compiled modules"
    _is_inductor_cpp(codes[0], "kernelforge fused_add_rms_norm")
    _on_hostdev_close_to(total, x + r, "fused_add_rms_norm: the sum")
    _on_hostdev_close_to(normed, torch.nn.functional.rms_norm(x + r, (256,), w, 1e-6),
                         "fused_add_rms_norm: the normalised sum")


def child_main() -> None:
    """Run every check, report ``MARK`` + JSON {check: None or its traceback}."""
    import faulthandler
    faulthandler.dump_traceback_later(CHILD_TIMEOUT - 20, exit=True)
    results = {}

    def run(fn):
        try:
            fn()
            results[fn.__name__] = None
        except Exception:
            results[fn.__name__] = traceback.format_exc()[-3000:]

    import kf_hostdev  # noqa: F401  (the device, without Inductor's registration)
    run(not_registered_before_import)
    try:
        _load_plugin()
    except Exception:
        results["load kf_hostdev.inductor"] = traceback.format_exc()[-3000:]
    else:
        run(torch_compile_on_hostdev)
        run(kernelforge_inductor_on_hostdev)
        run(kernelforge_fused_add_rms_norm_on_hostdev)
    print(MARK + json.dumps(results), flush=True)


# -- the test (in the pytest process) ----------------------------------------------------

def test_inductor_on_hostdev(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor-cache")
    env.pop("KERNELFORGE_BACKEND", None)
    outcomes = run_child_checks(os.path.abspath(__file__), mark=MARK, env=env, cwd=ROOT,
                                timeout=CHILD_TIMEOUT, what="the checks")
    fail_on_failed(outcomes, "checks")
    assert sorted(outcomes) == ["kernelforge_fused_add_rms_norm_on_hostdev",
                                "kernelforge_inductor_on_hostdev", "not_registered_before_import",
                                "torch_compile_on_hostdev"]


if __name__ == "__main__" and "--child" in sys.argv:
    child_main()
