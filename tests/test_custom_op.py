"""torch.ops.kernelforge.*: registered custom ops with fake kernels, usable
inside an engine's own torch.compile(fullgraph=True) graph."""
import pytest
import torch

import kernelforge
from kernelforge.tolerance import assert_close
import reference

HIDDEN = 576


def test_ops_are_registered():
    for name in ("rms_norm", "fused_add_rms_norm", "fused_add_rms_norm_"):
        assert hasattr(torch.ops.kernelforge, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(3, HIDDEN, dtype=dtype)
    r = torch.randn(3, HIDDEN, dtype=dtype)
    w = torch.randn(HIDDEN, dtype=dtype)
    torch.library.opcheck(torch.ops.kernelforge.rms_norm.default, (x, w, 1e-6, 0.0, "eager"))
    torch.library.opcheck(torch.ops.kernelforge.fused_add_rms_norm.default,
                          (x, r, w, 1e-6, 0.0, "eager"))
    torch.library.opcheck(torch.ops.kernelforge.fused_add_rms_norm_.default,
                          (x.clone(), r.clone(), w, 1e-6, 1.0, "eager"))


def test_inside_an_engines_fullgraph_compile():
    """fullgraph=True raises on any graph break, so this compiling at all is
    the proof; the outputs are checked against the float64 reference."""
    def block(h, res, w):
        h2, res2 = kernelforge.ops.fused_add_rms_norm(h, res, w, 1e-6)
        y = kernelforge.ops.rms_norm(h2 * 2.0, w, 1e-6, offset=1.0)
        h3, res3 = kernelforge.ops.fused_add_rms_norm(y, res2, w, 1e-6, inplace=True)
        return h3 + 1.0, res3

    compiled = torch.compile(block, fullgraph=True)
    h, res = torch.randn(5, HIDDEN), torch.randn(5, HIDDEN)
    w = torch.randn(HIDDEN)
    out, res_out = compiled(h.clone(), res.clone(), w)

    n1, s1 = reference.fused_add_rms_norm(h, res, w, 1e-6)
    y = reference.rms_norm((n1.float() * 2.0), w, 1e-6, 1.0).float()
    n2, s2 = reference.fused_add_rms_norm(y, s1.float(), w, 1e-6)
    assert_close(res_out, s2, torch.float32, "residual through the graph")
    # the reference rounds to fp32 between ops as the graph does; allow each op's error
    assert_close(out - 1.0, n2, torch.float32, "output through the graph")


def test_rotary_ops_are_registered_and_pass_opcheck():
    assert hasattr(torch.ops.kernelforge, "rotary_embedding")
    assert hasattr(torch.ops.kernelforge, "rotary_embedding_")
    pos = torch.tensor([3, 0, 7])
    cache = kernelforge.rope.cos_sin_cache(32, 8)
    q, k = torch.randn(3, 2 * 64), torch.randn(3, 64)
    torch.library.opcheck(torch.ops.kernelforge.rotary_embedding.default,
                          (pos, q, k, 64, cache, True, True, "eager"))
    torch.library.opcheck(torch.ops.kernelforge.rotary_embedding.default,
                          (pos, q, None, 64, cache, False, True, "eager"))
    torch.library.opcheck(torch.ops.kernelforge.rotary_embedding_.default,
                          (pos, q.clone(), k.clone(), 64, cache, True, True, "eager"))


def test_rotary_inside_an_engines_fullgraph_compile():
    """An attention prologue as an engine writes it: fused qkv projection,
    split, rotary in place on the q and k views, and out of place."""
    T, hq, hk, D = 5, 4, 2, 64
    cache = kernelforge.rope.cos_sin_cache(D, 64)
    w = torch.randn(64, (hq + 2 * hk) * D) * 0.1

    def prologue(x, pos):
        qkv = x @ w
        q, k, v = qkv.split([hq * D, hk * D, hk * D], dim=-1)
        kernelforge.ops.rotary_embedding(pos, q, k, D, cache, inplace=True, backend="eager")
        q2, k2 = kernelforge.ops.rotary_embedding(pos, q, k, D, cache, False, backend="eager")
        return q, k, q2, k2

    x, pos = torch.randn(T, 64), torch.tensor([9, 0, 63, 5, 5])
    q, k, q2, k2 = torch.compile(prologue, fullgraph=True)(x, pos)
    qkv = x @ w
    rq = reference.rotary(pos, qkv[:, :hq * D], cache, D, True)
    rk = reference.rotary(pos, qkv[:, hq * D:(hq + hk) * D], cache, D, True)
    assert_close(q, rq, torch.float32, "in place through the graph")
    assert_close(k, rk, torch.float32, "in place through the graph")
    assert_close(q2, reference.rotary(pos, rq.float(), cache, D, False), torch.float32,
                 "second rotation (GPT-J) through the graph")
    assert_close(k2, reference.rotary(pos, rk.float(), cache, D, False), torch.float32,
                 "second rotation (GPT-J) through the graph")


def test_attention_ops_inside_an_engines_fullgraph_compile():
    """A decode step as an engine compiles it: write the new keys into the
    paged cache, then attend; the packed op alongside. No graph break."""
    g = torch.Generator().manual_seed(0)
    hkv, group, D, bs = 2, 2, 64, 16
    lens = [5, 1, 20]
    k, v = (torch.randn(sum(lens), hkv, D, generator=g) for _ in range(2))
    q = torch.randn(len(lens), hkv * group, D, generator=g)       # one new token each
    kc = torch.zeros(6, bs, hkv, D)
    vc = torch.zeros_like(kc)
    tables = torch.tensor([[3, 0], [1, 0], [4, 2]], dtype=torch.int32)
    slots = []
    for b, n in enumerate(lens):
        slots += [int(tables[b, p // bs]) * bs + p % bs for p in range(n)]
    slots = torch.tensor(slots)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)

    def step(q, k, v, kc, vc):
        kernelforge.ops.reshape_and_cache(k, v, kc, vc, slots, backend="eager")
        return kernelforge.ops.paged_attention(q, kc, vc, tables, seq_lens, qsl, backend="eager")

    out = torch.compile(step, fullgraph=True)(q, k, v, kc, vc)
    cu_k = torch.tensor([0, 5, 6, 26], dtype=torch.int32)
    ref = reference.attention(q, k, v, qsl, cu_k, D ** -0.5)
    assert_close(out, ref, torch.float32, "decode step through the graph")
    packed = torch.compile(lambda q, k, v: kernelforge.ops.attention(
        q, k, v, qsl, cu_k, backend="eager"), fullgraph=True)(q, k, v)
    assert_close(packed, ref, torch.float32, "packed attention through the graph")


def test_attention_ops_pass_opcheck():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 2, 64, generator=g) for _ in range(3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.kernelforge.attention.default,
                          (q, k, v, cu, cu, None, True, None, None, None, True, "eager"))
    kc, vc = torch.randn(2, 16, 2, 64), torch.randn(2, 16, 2, 64)
    tables = torch.tensor([[0], [1]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.kernelforge.paged_attention.default,
                          (q, kc, vc, tables, torch.tensor([2, 3], dtype=torch.int32), cu,
                           None, True, 4, 30.0, True, None, "eager"))
    torch.library.opcheck(torch.ops.kernelforge.reshape_and_cache.default,
                          (k, v, kc.clone(), vc.clone(), torch.tensor([0, 17, -1, 3, 30]), True,
                           "eager"))
