"""Ops traced into the caller's compiled graph (kernelforge.config.inline()):
a decoder layer's ops (RMSNorm, rotary, KV-cache write, paged attention,
fused add + RMSNorm) become plain torch ops in one fullgraph trace, no
kernelforge custom op left in it, against float64 references."""
import pytest
import torch
import torch._dynamo.testing

import kernelforge
from kernelforge import config
from kernelforge.rope import cos_sin_cache
from kernelforge.tolerance import assert_close
import reference

HKV, GROUP, D, BS, EPS = 2, 2, 64, 16, 1e-6
HIDDEN = HKV * GROUP * D


@pytest.fixture
def inline():
    config.set_inline(True)
    torch._dynamo.reset()
    yield
    config.set_inline(None)
    torch._dynamo.reset()


def _decode_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [5, 1, 20]                              # context, new token included
    k, v = (torch.randn(sum(lens), HKV, D, generator=g) for _ in range(2))
    tables = torch.tensor([[3, 0], [1, 0], [4, 2]], dtype=torch.int32)
    slots = torch.tensor([int(tables[b, p // BS]) * BS + p % BS
                          for b, n in enumerate(lens) for p in range(n)])
    return g, lens, k, v, tables, slots


def _graph_targets(counter):
    return [str(n.target) for gm in counter.graphs for n in gm.graph.nodes
            if n.op == "call_function"]


def test_decoder_layer_traced_inline(inline):
    g, lens, k, v, tables, slots = _decode_problem()
    h = torch.randn(len(lens), HIDDEN, generator=g)
    res = torch.randn(len(lens), HIDDEN, generator=g)
    w = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    cache = cos_sin_cache(D, 64, 10000.0)
    pos = torch.tensor([n - 1 for n in lens])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    kc, vc = torch.zeros(6, BS, HKV, D), torch.zeros(6, BS, HKV, D)
    last = torch.tensor([sum(lens[:b + 1]) - 1 for b in range(len(lens))])
    # the cache holds every earlier key; the step writes the new (last) ones
    kernelforge.ops.reshape_and_cache(k, v, kc, vc, slots, backend="eager")

    def layer(h, res, kc, vc):
        x = kernelforge.ops.rms_norm(h, w, EPS)
        q = x * 0.5
        knew = x.view(-1, HKV * GROUP, D)[:, :HKV].reshape(-1, HKV * D)
        q, knew = kernelforge.ops.rotary_embedding(pos, q, knew, D, cache,
                                                   check_positions=False)
        kernelforge.ops.reshape_and_cache(knew.view(-1, HKV, D), v[last], kc, vc, slots[last],
                                          check_slots=False)
        o = kernelforge.ops.paged_attention(q.view(-1, HKV * GROUP, D), kc, vc, tables,
                                            seq_lens, qsl, check_tables=False)
        return kernelforge.ops.fused_add_rms_norm(o.reshape(-1, HIDDEN), res, w, EPS)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    kc1, vc1 = kc.clone(), vc.clone()
    got, got_res = torch.compile(layer, fullgraph=True, backend=counter)(h, res, kc1, vc1)
    assert counter.frame_count == 1
    assert not [t for t in _graph_targets(counter) if "kernelforge" in t]

    # float64 reference, written here from the op definitions
    h64, w64 = h.double(), w.double()
    x = h64 / torch.sqrt((h64 * h64).mean(-1, keepdim=True) + EPS) * w64
    q = (x * 0.5).view(-1, HKV * GROUP, D)
    knew = x.view(-1, HKV * GROUP, D)[:, :HKV]
    c = cache.double()[pos][:, None]
    rot = lambda t: torch.cat((t[..., :D // 2] * c[..., :D // 2] - t[..., D // 2:] * c[..., D // 2:],  # noqa: E731
                               t[..., D // 2:] * c[..., :D // 2] + t[..., :D // 2] * c[..., D // 2:]), -1)
    q, knew = rot(q), rot(knew)
    k_all = k.double().clone()
    k_all[last] = knew
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    o = reference.attention(q, k_all, v.double(), qsl, cu_k, D ** -0.5)
    s = o.reshape(-1, HIDDEN) + res.double()
    want = s / torch.sqrt((s * s).mean(-1, keepdim=True) + EPS) * w64
    assert_close(got_res, s, torch.float32, "inline residual")
    assert_close(got, want, torch.float32, "inline decoder layer")
    # the cache writes happened in the caller's tensors
    assert_close(kc1[tables[2, 1], 3], knew[2, :, :].float().double(), torch.float32,
                 "key written through the graph")


def test_host_checks_must_be_off_inline(inline):
    g, lens, k, v, tables, slots = _decode_problem(1)
    cache = cos_sin_cache(D, 64, 10000.0)
    pos = torch.zeros(3, dtype=torch.long)
    q = torch.randn(3, HKV * GROUP * D, generator=g)
    f = torch.compile(lambda q: kernelforge.ops.rotary_embedding(pos, q, None, D, cache),
                      fullgraph=True)
    with pytest.raises(Exception, match="`check_positions` expected False when the op is "
                                        "traced into a compiled graph"):
        f(q)
    kc = torch.zeros(6, BS, HKV, D)
    f2 = torch.compile(lambda k: kernelforge.ops.reshape_and_cache(k, k, kc, kc.clone(), slots),
                       fullgraph=True)
    with pytest.raises(Exception, match="`check_slots` expected False"):
        f2(k)


def test_off_by_default_ops_stay_opaque():
    torch._dynamo.reset()
    assert not config.inline()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    w = torch.ones(HIDDEN)
    torch.compile(lambda x: kernelforge.ops.rms_norm(x, w, EPS), fullgraph=True,
                  backend=counter)(torch.randn(2, HIDDEN))
    assert any("kernelforge.rms_norm" in t for t in _graph_targets(counter))
