"""CPU benchmark: kernelforge.ops.sample against a sort-based torch sampler, in one run.

    python3 -m pytest bench/test_sampling_bench.py --benchmark-only

B=32 rows, V=128256 (Llama 3), fp32 logits, per-request top_k=50 and
top_p=0.9 ([B] tensors), temperature 1, a seed per row.

    kf_inductor   kernelforge.ops.sample(..., backend="inductor"): max pass,
                  radix threshold searches (no sort), Gumbel-max draw
    torch_sort    vLLM's native path: sort, top-k mask, softmax, cumsum,
                  top-p mask, scatter back, softmax, multinomial (eager torch)

Both are checked once, untimed: every drawn token lies in the float64
reference kept set (tests/test_sampling.py's definition, inlined here). The
ratio torch_sort / kf_inductor (goal >= 2x on CPU) is printed and stored in
the kf case's extra_info. Bytes: the logits read once (the op's compulsory
traffic). The Inductor compile (about a minute cold) is never timed.
"""
from __future__ import annotations

import pytest
import torch

import kernelforge
from peers import torch_sort_sample  # noqa: E402  (bench/ is on sys.path under pytest)
from timing import run_timed  # noqa: E402

B, V, TOP_K, TOP_P = 32, 128256, 50, 0.9
GOAL_VS_SORT = 2.0
_MEDIANS: dict = {}


def _kept_top_k_top_p(x, k, p):
    x = x.double()
    vals, order = torch.sort(x, descending=True)
    keep = x >= vals[k - 1]
    q = torch.where(keep, torch.exp(x - x.max()), 0.0)
    q = q / q.sum()
    qs = q[order]
    above = torch.empty_like(q)
    above[order] = torch.cumsum(qs, 0) - qs           # no ties in random fp32 logits
    return keep & (above < p)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g) * 3
    k = torch.full((B,), TOP_K, dtype=torch.int64)
    p = torch.full((B,), TOP_P)
    kept = torch.stack([_kept_top_k_top_p(logits[i], TOP_K, TOP_P) for i in range(B)])
    return logits, k, p, kept


def _check(tokens, kept):
    assert tokens.shape == (B,)
    assert bool(kept[torch.arange(B), tokens].all()), "a token outside the kept set"


@pytest.mark.parametrize("impl", ["kf_inductor", "torch_sort"])
def test_sample_bench(benchmark, record_case, problem, impl):
    logits, k, p, kept = problem
    seeds = torch.arange(B)
    if impl == "kf_inductor":
        def fn():
            return kernelforge.ops.sample(logits, temperature=1.0, top_k=k, top_p=p, seeds=seeds,
                                          offsets=0, backend="inductor")
    else:
        gen = torch.Generator().manual_seed(0)

        def fn():
            return torch_sort_sample(logits, k, p, gen)
    _check(fn(), kept)
    group = f"sample B={B} V={V} fp32 top_k={TOP_K} top_p={TOP_P}"
    run_timed(benchmark, fn, group=group, target_s=1.0, min_rounds=5, max_rounds=100)
    record_case(benchmark, group=group, impl=impl, nbytes=logits.numel() * 4, op="sample")
    stats = getattr(benchmark, "stats", None)
    if stats:
        _MEDIANS[impl] = stats.stats.median
        if len(_MEDIANS) == 2:
            ratio = _MEDIANS["torch_sort"] / _MEDIANS["kf_inductor"]
            benchmark.extra_info["speedup_vs_torch_sort"] = round(ratio, 2)
            print(f"\nsample: kf_inductor {_MEDIANS['kf_inductor'] * 1e3:.1f} ms, torch_sort "
                  f"{_MEDIANS['torch_sort'] * 1e3:.1f} ms: {ratio:.2f}x (goal >= {GOAL_VS_SORT:g}x)")
