"""CPU benchmarks: kernelforge's rotary embedding against Hugging Face-style peers, in one run.

    python3 -m pytest bench/test_rotary_bench.py --benchmark-only

Shapes are Llama 3 8B's attention: 32 query heads, 8 key heads, head size 128,
full rotary (rotary_dim 128), NeoX style, a float32 cos/sin cache of 8192
positions (``kernelforge.rope.cos_sin_cache(128, 8192, 10000.0)``) and
positions drawn at random from [0, 8192). One group per (T, dtype): T in
{1, 64, 4096} tokens, fp32 and bf16; query is [T, 32 * 128], key [T, 8 * 128].

Per group the implementations are:

    kf_inductor          kernelforge.ops.rotary_embedding(..., backend="inductor"), out of place
    kf_inductor_inplace  the same with inplace=True
    kf_inductor_nocheck  out of place with check_positions=False: its difference
                         from kf_inductor is the host-side range check of positions
    kf_eager             backend="eager"
    hf_eager             peers.hf_rotary: transformers' Llama formula, eager
                         (cos/sin gathered by position and cast to the input
                         dtype, rotate_half with a cat, math in the input dtype)
    hf_compiled          torch.compile(peers.hf_rotary, fullgraph=True, dynamic=False)
    range_check_only     (fp32 groups) what check_positions=True adds, alone:
                         torch.aminmax(positions) and two int() conversions

Bytes moved (the compulsory traffic, each tensor once, the same for every
implementation of a group): query and key read and written (4 x T x 40 x 128
x elsize), positions read (T x 8) and the gathered cos/sin cache rows
(T x rotary_dim x 4, fp32 cache). range_check_only counts positions only.

Every case runs once outside the timed region and is checked against a
float64 formula written here (kernelforge.tolerance.assert_close; the HF
peers in bf16 against a bound relative to the two terms, see _check_hf), so
a broken kernel can't post a fast number. The copy bandwidth comes from the
copy benchmark of test_rmsnorm_bench.py when it ran first in this run, else
from the ``copy_bandwidth`` fixture's own shorter copy (see conftest.py).

There is no ``smoke`` case here: tests/test_bench_flow.py selects ``-k smoke``
over all of bench/ and expects exactly the RMSNorm smoke cases.

Compiles (never timed): the Inductor graph for the out-of-place and the
in-place kernel per dtype (check_positions changes no graph) and hf_compiled
once per (T, dtype).
"""
from __future__ import annotations


import pytest
import torch

import kernelforge
from kernelforge.rope import cos_sin_cache
from timing import run_timed  # noqa: E402  (bench/ is on sys.path under pytest)
from kernelforge.tolerance import assert_close, tolerance

from peers import hf_rotary, hf_rotary_compiled  # bench/ is on sys.path under pytest

HQ, HKV, HEAD, ROTARY_DIM, MAX_POSITION = 32, 8, 128, 128, 8192
TOKENS = (1, 64, 4096)
TARGET_S = 0.4          # aim for about this much timed work per case
MIN_ROUNDS, MAX_ROUNDS = 10, 1000

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_CACHE: list = []


def rope_cache() -> torch.Tensor:
    if not _CACHE:
        _CACHE.append(cos_sin_cache(ROTARY_DIM, MAX_POSITION, 10000.0))
    return _CACHE[0]


# -- float64 reference and the checks -----------------------------------------------

def _ref_rotary(positions, x, cache, head_size):
    """NeoX RoPE in float64; entries past rotary_dim pass through."""
    T = positions.shape[0]
    x64 = x.double().reshape(T, -1, head_size)
    c = cache.double()[positions]                        # [T, R]
    half = c.shape[1] // 2
    cos, sin = c[:, None, :half], c[:, None, half:]
    x1, x2 = x64[..., :half], x64[..., half:2 * half]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x64[..., 2 * half:]), -1)
    return out.reshape(x.shape)


def _term_magnitude(positions, x, cache, head_size):
    """|x1 cos| + |x2 sin| (and the same for the second half) in float64."""
    T = positions.shape[0]
    a = x.double().reshape(T, -1, head_size).abs()
    c = cache.double()[positions].abs()
    half = c.shape[1] // 2
    cos, sin = c[:, None, :half], c[:, None, half:]
    a1, a2 = a[..., :half], a[..., half:2 * half]
    return torch.cat((a1 * cos + a2 * sin, a2 * cos + a1 * sin, a[..., 2 * half:]),
                     -1).reshape(x.shape)


def _check_hf(got, ref, x, positions, cache, dtype, what):
    """The HF formula rounds cos and sin, both products and their sum to the
    input dtype: with u the unit roundoff (2**-8 for bf16, half the policy's
    rtol) its error is at most about 3u (|x1 cos| + |x2 sin|), which where the
    two terms cancel is large relative to the result. fp32 passes the ordinary
    policy; bf16 is held to 2 x rtol (= 4u) times the magnitude of the terms."""
    if dtype == torch.float32:
        assert_close(got, ref, dtype, what)
        return
    tol = tolerance(dtype)
    err = (got.double() - ref).abs()
    bound = tol.atol + 2 * tol.rtol * _term_magnitude(positions, x, cache, HEAD)
    if bool((err > bound).any()) or not bool(torch.isfinite(got).all()):
        raise AssertionError(f"{what}: {int((err > bound).sum())} elements beyond "
                             f"{2 * tol.rtol} x (|x1 cos| + |x2 sin|); max error "
                             f"{err.max().item():.3e}")


# -- inputs, built once per group ------------------------------------------------------

_INPUTS: dict = {}


def group_inputs(T: int, dtype: torch.dtype, group: str):
    """(positions, q, k, (ref_q, ref_k), bytes moved); only the current group is kept."""
    if group not in _INPUTS:
        _INPUTS.clear()
        g = torch.Generator().manual_seed(T * 7919 + (dtype == torch.bfloat16))
        cache = rope_cache()
        positions = torch.randint(0, MAX_POSITION, (T,), generator=g, dtype=torch.int64)
        q = torch.randn(T, HQ * HEAD, generator=g).to(dtype)
        k = torch.randn(T, HKV * HEAD, generator=g).to(dtype)
        refs = (_ref_rotary(positions, q, cache, HEAD), _ref_rotary(positions, k, cache, HEAD))
        el = q.element_size()
        nbytes = (2 * (q.numel() + k.numel()) * el + positions.numel() * positions.element_size()
                  + T * ROTARY_DIM * cache.element_size())
        _INPUTS[group] = (positions, q, k, refs, nbytes)
    return _INPUTS[group]


def make_fn(impl: str, positions, q, k):
    cache, ops = rope_cache(), kernelforge.ops
    if impl == "kf_inductor_inplace":          # its own copies: the others' inputs stay put
        q, k = q.clone(), k.clone()

    def range_check():
        lo, hi = torch.aminmax(positions)
        return int(lo), int(hi)

    return {
        "kf_inductor": lambda: ops.rotary_embedding(positions, q, k, HEAD, cache,
                                                    backend="inductor"),
        "kf_inductor_inplace": lambda: ops.rotary_embedding(positions, q, k, HEAD, cache,
                                                            inplace=True, backend="inductor"),
        "kf_inductor_nocheck": lambda: ops.rotary_embedding(positions, q, k, HEAD, cache,
                                                            check_positions=False,
                                                            backend="inductor"),
        "kf_eager": lambda: ops.rotary_embedding(positions, q, k, HEAD, cache, backend="eager"),
        "hf_eager": lambda: hf_rotary(positions, q, k, cache, HEAD),
        "hf_compiled": lambda: hf_rotary_compiled()(positions, q, k, cache, HEAD),
        "range_check_only": range_check,
    }[impl], (q, k)


# -- the cases ------------------------------------------------------------------------

IMPLS = ("kf_inductor", "kf_inductor_inplace", "kf_inductor_nocheck", "kf_eager", "hf_eager",
         "hf_compiled")


def _params():
    for dt in _DTYPES:
        for T in TOKENS:
            for impl in IMPLS + (("range_check_only",) if dt == "fp32" else ()):
                yield pytest.param(T, dt, impl, id=f"rotary-T{T}-{dt}-{impl}")


@pytest.mark.parametrize("T,dt,impl", list(_params()))
def test_rotary(benchmark, copy_bandwidth, record_case, T, dt, impl):
    dtype = _DTYPES[dt]
    group = f"rotary T={T} {dt}"
    positions, q, k, refs, nbytes = group_inputs(T, dtype, group)
    fn, (x_q, x_k) = make_fn(impl, positions, q, k)

    # compile / warm up, then check the result once, all outside the timed region
    got = fn()
    if impl == "range_check_only":
        assert got == (int(positions.min()), int(positions.max()))
        nbytes = positions.numel() * positions.element_size()
    else:
        for name, a, x, ref in zip(("query", "key"), got, (q, k), refs):
            assert a.dtype == dtype and a.shape == ref.shape
            what = f"{group} {impl} {name}"
            if impl.startswith("hf_"):
                _check_hf(a, ref, x, positions, rope_cache(), dtype, what)
            else:
                assert_close(a, ref, dtype, what)
        if impl == "kf_inductor_inplace":
            assert got[0] is x_q and got[1] is x_k
    del got
    run_timed(benchmark, fn, group=group, target_s=TARGET_S, min_rounds=MIN_ROUNDS,
              max_rounds=MAX_ROUNDS)
    record_case(benchmark, group=group, impl=impl, nbytes=nbytes, op="rotary")
