"""Rotary embeddings beyond the spec's generated tests (tests/test_ops.py,
against the float64 complex rotation): the properties RoPE exists for,
partial rotary's pass-through, the cache builders, torch.compile."""
import pytest
import torch
from hypothesis import given, strategies as st

import kernelforge
from kernelforge.tolerance import assert_close
from conftest import BACKENDS, DEVICE
import reference


def make_qk(T, hq, hk, D, dtype, layout, g):
    """query and key as a model would hand them over: flat [T, H*D], per-head
    [T, H, D], or strided views into one fused qkv projection."""
    if layout == "qkv":
        qkv = torch.randn(T, (hq + 2 * hk) * D, generator=g).to(dtype).to(DEVICE)
        return qkv[:, :hq * D], qkv[:, hq * D:(hq + hk) * D]
    q = torch.randn(T, hq * D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(T, hk * D, generator=g).to(dtype).to(DEVICE)
    if layout == "3d":
        return q.view(T, hq, D), k.view(T, hk, D)
    return q, k


def random_cache(max_position, R, dtype, g):
    """Any values: the op must apply the cache it is given (the builders are
    tested separately against transformers)."""
    angles = torch.rand(max_position, R // 2, generator=g, dtype=torch.float64) * 6.3
    scale = 0.5 + torch.rand(max_position, 1, generator=g, dtype=torch.float64)   # yarn's mscale
    cache = torch.cat([angles.cos() * scale, angles.sin() * scale], dim=1)
    return cache.to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_rotary_passes_the_rest_through(backend):
    """Entries past rotary_dim come back bit-identical, in place or not."""
    g = torch.Generator().manual_seed(0)
    T, H, D, R = 3, 2, 80, 32
    q, k = make_qk(T, H, H, D, torch.bfloat16, "3d", g)
    cache = random_cache(16, R, torch.float32, g)
    pos = torch.tensor([3, 0, 15], device=DEVICE)
    for neox in (True, False):
        for inplace in (False, True):
            qi, ki = q.clone(), k.clone()
            qo, ko = kernelforge.ops.rotary_embedding(pos, qi, ki, D, cache, neox,
                                                      inplace=inplace, backend=backend)
            assert torch.equal(qo[..., R:], q[..., R:]) and torch.equal(ko[..., R:], k[..., R:])
            assert not torch.equal(qo[..., :R], q[..., :R])


def default_cache(R, max_position, base=10000.0):
    return kernelforge.rope.cos_sin_cache(R, max_position, base).to(DEVICE)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotation_keeps_each_pairs_norm(backend, is_neox):
    g = torch.Generator().manual_seed(1)
    T, H, D = 3, 2, 64
    q = torch.randn(T, H, D, generator=g).to(DEVICE)
    pos = torch.tensor([0, 77, 2047], device=DEVICE)
    out, _ = kernelforge.ops.rotary_embedding(pos, q, None, D, default_cache(D, 2048), is_neox,
                                              backend=backend)

    def pair_norms(x):
        a, b = (x[..., :D // 2], x[..., D // 2:]) if is_neox else (x[..., 0::2], x[..., 1::2])
        return (a.double() ** 2 + b.double() ** 2).sqrt()

    assert_close(pair_norms(out), pair_norms(q), torch.float32, "pair norms")


@pytest.mark.parametrize("backend", ["eager", "triton"])
@given(a=st.integers(0, 1000), b=st.integers(0, 1000), shift=st.integers(-1000, 1000))
def test_scores_depend_only_on_relative_position(backend, a, b, shift):
    """<R(a) q, R(b) k> = <R(a + s) q, R(b + s) k>: the reason RoPE exists."""
    if min(a, b) + shift < 0:
        shift = -min(a, b)
    g = torch.Generator().manual_seed(a * 1001 + b)
    D = 128
    q = torch.randn(1, 1, D, generator=g).to(DEVICE)
    k = torch.randn(1, 1, D, generator=g).to(DEVICE)
    cache = default_cache(D, 2048)

    def score(pa, pb):
        qa, _ = kernelforge.ops.rotary_embedding(torch.tensor([pa], device=DEVICE), q, None, D,
                                                 cache, backend=backend)
        kb, _ = kernelforge.ops.rotary_embedding(torch.tensor([pb], device=DEVICE), k, None, D,
                                                 cache, backend=backend)
        return (qa.double() * kb.double()).sum()

    s0, s1 = score(a, b), score(a + shift, b + shift)
    # each rotated vector carries fp32 rounding of cos/sin at large angles
    # (|p * inv_freq| up to ~2000 rad rounds with abs error ~1e-4) times |q||k| ~ D
    bound = 1e-3 * float(q.norm() * k.norm())
    assert abs(float(s0 - s1)) <= bound, (float(s0), float(s1), bound)


def test_scores_catch_a_wrong_rotation():
    """The relative-position check above can fail: with a cache whose angle
    is not linear in the position it does."""
    D = 64
    cache = default_cache(D, 64)
    bent = cache.clone()
    bent[5] = cache[9]       # position 5 looks like position 9
    q = torch.randn(1, 1, D).to(DEVICE)
    k = torch.randn(1, 1, D).to(DEVICE)

    def score(pa, pb):
        qa, _ = kernelforge.ops.rotary_embedding(torch.tensor([pa], device=DEVICE), q, None, D,
                                                 bent, backend="eager")
        kb, _ = kernelforge.ops.rotary_embedding(torch.tensor([pb], device=DEVICE), k, None, D,
                                                 bent, backend="eager")
        return float((qa * kb).sum())

    assert abs(score(5, 2) - score(6, 3)) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_batch_with_unrelated_positions(backend):
    """A decode step: one token per request, positions unsorted and repeated;
    each row must equal that token rotated alone."""
    D, H = 64, 2
    cache = default_cache(D, 4096)
    q = torch.randn(5, H * D).to(DEVICE)
    pos = torch.tensor([4095, 0, 17, 17, 1000], device=DEVICE)
    out, _ = kernelforge.ops.rotary_embedding(pos, q, None, D, cache, backend=backend)
    for i in range(5):
        alone, _ = kernelforge.ops.rotary_embedding(pos[i:i + 1], q[i:i + 1], None, D, cache,
                                                    backend="eager")
        assert_close(out[i:i + 1], alone.double(), torch.float32, f"row {i}")
