"""CPU benchmarks: kernelforge's RMSNorm lowerings against torch peers, in one run.

    python3 -m pytest bench/ --benchmark-only

Per group (op, shape, dtype) the implementations are:

    kf_cpp                kernelforge.ops.*(..., backend="cpp")  (the CPU default: C++ lowering)
    kf_inductor           kernelforge.ops.*(..., backend="inductor")  (torch lowering, compiled)
    kf_eager              kernelforge.ops.*(..., backend="eager")
    torch_F_rms_norm      torch.nn.functional.rms_norm, eager
    torch_add_F_rms_norm  (fused group) x + residual, then F.rms_norm, eager
    eager_formula         x.float() * rsqrt(mean(x.float()**2) + eps) * w, cast back
    compiled_formula      torch.compile of that formula, written by hand

Every case is compiled and run once outside the timed region, and its
result is checked once against a float64 formula
(``kernelforge.tolerance.assert_close``), so a broken kernel can't post a
fast number. The first case in the file times a large copy: the machine's
memory bandwidth, which every case reports a fraction of (see conftest.py).
The ``smoke`` cases are tiny; the regression-flow test selects them with
``-k smoke``.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import kernelforge
from timing import run_timed  # noqa: E402  (bench/ is on sys.path under pytest)
from kernelforge.tolerance import assert_close

EPS = 1e-6
TARGET_S = 1.0          # aim for about this much timed work per case
MIN_ROUNDS, MAX_ROUNDS = 10, 200

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- the memory bandwidth of this machine ----------------------------------------

def test_copy_bandwidth(benchmark, record_copy):
    """A 256 MiB fp32 ``dst.copy_(src)``; bytes moved = read + write."""
    n = 256 * 1024 * 1024 // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    assert torch.equal(dst, src)
    benchmark.group = "copy 256 MiB fp32"
    benchmark.pedantic(dst.copy_, args=(src,), rounds=20, warmup_rounds=3, iterations=1)
    record_copy(benchmark, 2 * n * src.element_size())


# -- the implementations -------------------------------------------------------------

from peers import formula, fused_formula  # noqa: E402  (bench/ is on sys.path under pytest)


_COMPILED: dict = {}


def _compiled(op: str, group: str):
    key = (op, group)
    if key not in _COMPILED:
        fn = formula if op == "rms_norm" else fused_formula
        _COMPILED[key] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[key]


def make_fn(op: str, impl: str, group: str, args: tuple):
    ops = kernelforge.ops
    if op == "rms_norm":
        x, w = args
        n = x.shape[-1]
        return {
            "kf_cpp": lambda: ops.rms_norm(x, w, EPS, backend="cpp"),
            "kf_inductor": lambda: ops.rms_norm(x, w, EPS, backend="inductor"),
            "kf_eager": lambda: ops.rms_norm(x, w, EPS, backend="eager"),
            "torch_F_rms_norm": lambda: F.rms_norm(x, (n,), w, EPS),
            "eager_formula": lambda: formula(x, w),
            "compiled_formula": lambda: _compiled(op, group)(x, w),
        }[impl]
    x, r, w = args
    n = x.shape[-1]

    def add_then_f():
        s = x + r
        return F.rms_norm(s, (n,), w, EPS), s

    return {
        "kf_cpp": lambda: ops.fused_add_rms_norm(x, r, w, EPS, backend="cpp"),
        "kf_inductor": lambda: ops.fused_add_rms_norm(x, r, w, EPS, backend="inductor"),
        "kf_eager": lambda: ops.fused_add_rms_norm(x, r, w, EPS, backend="eager"),
        "torch_add_F_rms_norm": add_then_f,
        "eager_formula": lambda: fused_formula(x, r, w),
        "compiled_formula": lambda: _compiled(op, group)(x, r, w),
    }[impl]


# -- inputs and float64 references, built once per group ------------------------------

_INPUTS: dict = {}


def group_inputs(op: str, m: int, n: int, dtype: torch.dtype, group: str):
    """(args, references, bytes moved); only the current group is kept."""
    if group not in _INPUTS:
        _INPUTS.clear()
        g = torch.Generator().manual_seed(m * 100003 + n)
        x = torch.randn(m, n, generator=g).to(dtype)
        w = (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)
        el = x.element_size()
        if op == "rms_norm":
            args = (x, w)
            refs = (_ref_rms(x, w),)
            nbytes = 2 * x.numel() * el + w.numel() * w.element_size()
        else:
            r = torch.randn(m, n, generator=g).to(dtype)
            s = (x.double() + r.double()).to(dtype)
            args = (x, r, w)
            refs = (_ref_rms(s, w), s)
            nbytes = 4 * x.numel() * el + w.numel() * w.element_size()
        _INPUTS[group] = (args, refs, nbytes)
    return _INPUTS[group]


def _ref_rms(x, w):
    x64 = x.double()
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + EPS) * w.double()


# -- the cases ------------------------------------------------------------------------

RMS_IMPLS = ("kf_cpp", "kf_inductor", "kf_eager", "torch_F_rms_norm", "eager_formula",
             "compiled_formula")
FUSED_IMPLS = ("kf_cpp", "kf_inductor", "kf_eager", "torch_add_F_rms_norm", "eager_formula",
               "compiled_formula")

CONFIGS = [
    # (op, rows, hidden, dtype, impls, smoke)
    ("rms_norm", 64, 576, "fp32", ("kf_inductor", "kf_eager"), True),
    ("rms_norm", 4096, 4096, "fp32", RMS_IMPLS, False),
    ("rms_norm", 4096, 4096, "bf16", RMS_IMPLS, False),
    ("fused_add_rms_norm", 4096, 4096, "bf16", FUSED_IMPLS, False),
    ("rms_norm", 4096, 576, "bf16", RMS_IMPLS, False),
]


def _params():
    for op, m, n, dt, impls, smoke in CONFIGS:
        for impl in impls:
            pid = f"{op}-{m}x{n}-{dt}-{impl}"
            yield pytest.param(op, m, n, dt, impl, id=("smoke-" + pid) if smoke else pid)


@pytest.mark.parametrize("op,m,n,dt,impl", list(_params()))
def test_rmsnorm(benchmark, copy_bandwidth, record_case, op, m, n, dt, impl):
    dtype = _DTYPES[dt]
    group = f"{op} {m}x{n} {dt}" + (" (smoke)" if (m, n) == (64, 576) else "")
    args, refs, nbytes = group_inputs(op, m, n, dtype, group)
    fn = make_fn(op, impl, group, args)

    # compile / warm up, then check the result once, all outside the timed region
    got = fn()
    got = got if isinstance(got, tuple) else (got,)
    for i, (a, ref) in enumerate(zip(got, refs)):
        assert a.dtype == dtype and a.shape == ref.shape
        assert_close(a, ref, dtype, f"{group} {impl} output {i}")
    del got
    run_timed(benchmark, fn, group=group, target_s=TARGET_S, min_rounds=MIN_ROUNDS,
              max_rounds=MAX_ROUNDS)
    record_case(benchmark, group=group, impl=impl, nbytes=nbytes)
