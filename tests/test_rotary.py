"""Rotary embeddings: every backend against a float64 complex-rotation
reference (tests/reference.py), under the one tolerance policy; plus the
mathematical properties RoPE exists for."""
import pytest
import torch
from hypothesis import given, strategies as st

import kernelforge
from kernelforge.tolerance import assert_close
from conftest import BACKENDS, DEVICE
import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_SIZES = [64, 80, 96, 128, 256]
# The Triton interpreter runs each program in numpy: few tokens on CPU.
MAX_TOKENS = {"eager": 40, "inductor": 24, "triton": 40 if DEVICE.type == "cuda" else 3, "cpp": 40}

# Inductor compiles once per specialisation (tens of seconds cold): a fixed set
# of cases that still covers both styles, partial rotary, GQA, key None,
# in place, strided rows and each dtype.
#   (head_size, rotary_dim, is_neox, Hq, Hkv, with_key, inplace, layout, dtype)
INDUCTOR_CASES = [
    (128, 128, True, 4, 2, True, False, "2d", torch.bfloat16),
    (80, 32, False, 3, 1, True, False, "3d", torch.float32),
    (64, 64, True, 2, 2, True, True, "qkv", torch.float16),
    (96, 48, True, 3, 3, False, False, "2d", torch.float32),
]


@st.composite
def problems(draw, backend):
    if backend in ("inductor", "cpp"):     # both compile per specialisation
        D, R, neox, hq, hk, with_key, inplace, layout, dtype = draw(st.sampled_from(INDUCTOR_CASES))
        cache_dtype = torch.float32
    else:
        D = draw(st.sampled_from(HEAD_SIZES))
        R = draw(st.one_of(st.just(D), st.integers(1, D // 2).map(lambda h: 2 * h)))
        neox, with_key, inplace = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
        hk = draw(st.sampled_from([1, 2, 4]))
        hq = hk * draw(st.sampled_from([1, 2, 3]))
        layout = draw(st.sampled_from(["2d", "3d", "qkv"]))
        dtype = draw(st.sampled_from(DTYPES))
        cache_dtype = draw(st.sampled_from([torch.float32, dtype]))
    T = draw(st.integers(0, MAX_TOKENS[backend]))
    max_position = draw(st.sampled_from([1, 7, 512, 4096]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return D, R, neox, hq, hk, with_key, inplace, layout, dtype, cache_dtype, T, max_position, seed


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
@given(data=st.data())
def test_rotary_matches_float64(backend, data):
    (D, R, neox, hq, hk, with_key, inplace, layout, dtype, cache_dtype, T, max_position,
     seed) = data.draw(problems(backend))
    g = torch.Generator().manual_seed(seed)
    q, k = make_qk(T, hq, hk, D, dtype, layout, g)
    k = k if with_key else None
    cache = random_cache(max_position, R, cache_dtype, g)
    positions = torch.randint(0, max_position, (T,), generator=g).to(DEVICE)
    ref_q = reference.rotary(positions, q, cache, D, neox)
    ref_k = None if k is None else reference.rotary(positions, k, cache, D, neox)
    q_in, k_in = q.clone(), None if k is None else k.clone()

    q_out, k_out = kernelforge.ops.rotary_embedding(positions, q, k, D, cache, neox,
                                                    inplace=inplace, backend=backend)
    what = f"rotary[{backend}, D={D}, R={R}, {'neox' if neox else 'gptj'}, {layout}]"
    assert q_out.shape == q.shape and q_out.dtype == dtype
    assert_close(q_out, ref_q, dtype, what + " query")
    if k is None:
        assert k_out is None
    else:
        assert k_out.shape == k.shape
        assert_close(k_out, ref_k, dtype, what + " key")
    if inplace:
        assert q_out is q and k_out is k
    else:
        assert torch.equal(q, q_in) and (k is None or torch.equal(k, k_in)), "inputs changed"


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
