"""paged_attention_plan: what every layer of a step shares, derived once.

A plan reused by several layers (different caches, the same tables) must give
each layer the float64 reference's rows; a plan that does not describe the
call must be refused, naming ``plan``; table checks run once per cache shape.
"""
import pytest
import torch

import kernelforge
from test_attention import cu, randn, scatter_to_pages, check
from conftest import BACKENDS, DEVICE
import reference

ops = kernelforge.ops


def _batch(g, dtype=torch.float32, hkv=2, group=2, D=64):
    k_lens = [30, 1, 45, 0, 17]         # decode, first token, chunk, empty, whole prompt
    q_lens = [1, 1, 13, 0, 17]
    q = randn((sum(q_lens), hkv * group, D), dtype, g)
    k, v = (randn((sum(k_lens), hkv, D), dtype, g) for _ in range(2))
    return q, k, v, q_lens, k_lens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 7])
def test_plan_shared_by_layers_matches_float64(backend, window):
    g = torch.Generator().manual_seed(5)
    layers = []
    for _ in range(3):       # three layers: own keys, values and queries, one layout
        q, k, v, q_lens, k_lens = _batch(g)
        kc, vc, tables, lens = scatter_to_pages(k, v, k_lens, 16, torch.Generator().manual_seed(1))
        layers.append((q, k, v, kc, vc))
    qsl = cu(q_lens)         # (the same seed: every layer's pages use the same tables)
    plan = ops.paged_attention_plan(tables, lens, qsl, window=window)
    for i, (q, k, v, kc, vc) in enumerate(layers):
        out = ops.paged_attention(q, kc, vc, tables, lens, qsl, window=window, plan=plan,
                                  backend=backend)
        ref = reference.attention(q, k, v, cu(q_lens), cu(k_lens), 64 ** -0.5, True, window)
        check(out, ref, torch.float32, f"layer {i} window={window} [{backend}]")


def test_plan_must_describe_the_call():
    g = torch.Generator().manual_seed(6)
    q, k, v, q_lens, k_lens = _batch(g)
    kc, vc, tables, lens = scatter_to_pages(k, v, k_lens, 16, g)
    qsl = cu(q_lens)
    plan = ops.paged_attention_plan(tables, lens, qsl)
    cases = [
        (dict(block_tables=tables.clone()), "plan.*block_tables"),
        (dict(seq_lens=lens.clone()), "plan.*seq_lens"),
        (dict(query_start_loc=qsl.clone()), "plan.*query_start_loc"),
        (dict(causal=False), "plan.*causal=False"),
        (dict(window=3), "plan.*window=3"),
        (dict(check_tables=False), "plan.*check_tables=False"),
        (dict(plan="not a plan"), "plan.*PagedAttentionPlan.*str"),
    ]
    for change, match in cases:
        kw = dict(block_tables=tables, seq_lens=lens, query_start_loc=qsl, plan=plan)
        kw.update(change)
        with pytest.raises(ValueError, match=match):
            ops.paged_attention(q, kc, vc, **kw)
    with pytest.raises(ValueError, match="query_start_loc.*to end at 5"):
        ops.paged_attention(q[:5], kc, vc, tables, lens, qsl, plan=plan)


def test_plan_checks_tables_once_per_cache_shape(monkeypatch):
    from kernelforge.kernels import attention_plan
    calls = []
    real = attention_plan.check_block_tables
    monkeypatch.setattr(attention_plan, "check_block_tables",
                        lambda *a: calls.append(a[4:6]) or real(*a))
    g = torch.Generator().manual_seed(7)
    q, k, v, q_lens, k_lens = _batch(g)
    kc, vc, tables, lens = scatter_to_pages(k, v, k_lens, 16, g)
    qsl = cu(q_lens)
    plan = ops.paged_attention_plan(tables, lens, qsl)
    for _ in range(4):
        ops.paged_attention(q, kc, vc, tables, lens, qsl, plan=plan)
    assert calls == [(kc.shape[0], 16)]
    small = kc[:2].clone()         # the tables name blocks this cache does not have
    with pytest.raises(ValueError, match="block_tables.*block numbers in \\[0, 2\\)"):
        ops.paged_attention(q, small, small.clone(), tables, lens, qsl, plan=plan)


def test_plan_arguments_are_checked():
    tables = torch.zeros(2, 4, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="query_start_loc.*non-decreasing"):
        ops.paged_attention_plan(tables, lens, torch.tensor([0, 3, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_tables.*2 rows"):
        ops.paged_attention_plan(tables[:1], lens, cu([1, 1]))
    with pytest.raises(ValueError, match="window"):
        ops.paged_attention_plan(tables, lens, cu([1, 1]), window=-1)
    with pytest.raises(ValueError, match="causal.*a bool"):
        ops.paged_attention_plan(tables, lens, cu([1, 1]), causal="yes")
