"""Launch pieces on lowerings that collapse the key loop (eager, Inductor):
they hold every (query row, key) pair of a launch at once, so paged and
packed attention launch in pieces of rows whose temporaries stay within
attention_plan.PIECE_BYTES, each over only the keys its rows see where the
host knows the lengths (docs/attention.md)."""
import os
import subprocess
import sys

import pytest
import torch

import kernelforge
from kernelforge.kernels import attention_plan as AP
from kernelforge.tolerance import assert_close
from conftest import DEVICE
from test_attention import cu, randn, scatter_to_pages
import reference


def prefix_prefill(n_seq=4, prompt=2048, cached=8192, bs=16):
    """vLLM-like: ``n_seq`` prompts of ``prompt`` tokens over ``cached``
    earlier positions each; tables as the cache would hold them."""
    k_len = prompt + cached
    mb = k_len // bs + 2                                   # spare table columns
    tables = torch.arange(n_seq * mb, dtype=torch.int32).view(n_seq, mb)
    lens = torch.full((n_seq,), k_len, dtype=torch.int32)
    return tables, lens, cu([prompt] * n_seq).cpu(), k_len


@pytest.mark.parametrize("check_tables", [True, False])
@pytest.mark.parametrize("budget", [AP.PIECE_BYTES, 64 << 20])
def test_prefix_prefill_plan_stays_within_the_budget(check_tables, budget):
    """4 prompts of 2048 tokens over 8192 cached (Hq 32, Hkv 8, D 128,
    bf16): one launch would hold ~2.5 TB of temporaries. The planned pieces
    cover every row once, in order; every launch holds at most the budget's
    pairs (with 64 MiB one row over its whole context does not fit: its keys
    come in chunks); each chunk's table rows and columns hold exactly the
    blocks of the keys its rows see there (row ranges from row_ranges)."""
    hq, hkv, D, bs = 32, 8, 128, 16
    tables, lens, qsl, k_len = prefix_prefill()
    T, mb = int(qsl[-1]), tables.shape[1]
    pair = AP.paged_pair_bytes(hq, hkv, D, 2)
    assert T * mb * bs * pair > 2e12
    plan = AP.paged_attention_plan(tables, lens, qsl, check_tables=check_tables)
    max_pairs = budget // pair
    planned = plan.launch_pieces(T, bs, mb, max_pairs, torch.device("cpu"))
    assert [r for p in planned for r in range(p[0], p[1])] == list(range(T))
    seq, lo, hi = AP.row_ranges(qsl.long(), qsl.diff().long(), lens.long(), True, None,
                                torch.device("cpu"), T)
    launched = chunked = 0
    for r0, r1, chunks in planned:
        chunked += len(chunks) > 1
        for tab, s, l, h, width in chunks:
            assert (r1 - r0) * width <= max(max_pairs, bs), (r0, r1, width)
            assert tab.shape[1] * bs == width
            launched += (r1 - r0) * width
        for r in (r0, (r0 + r1) // 2, r1 - 1):
            b, i = int(seq[r]), r - r0
            # the row's keys, chunk after chunk, read the blocks the full table gives them
            seen, want = [], tables[b][int(lo[r]) // bs:-(-int(hi[r]) // bs)]
            for tab, s, l, h, width in chunks:
                if h[i] > l[i]:
                    seen.append(tab[int(s[i])][int(l[i]) // bs:-(-int(h[i]) // bs)])
            assert torch.equal(torch.cat(seen), want), r
            assert sum(int(c[3][i] - c[2][i]) for c in chunks) == int(hi[r] - lo[r])
    assert (chunked > 0) == (budget < AP.PIECE_BYTES)
    if check_tables:
        # trimmed to what the rows see, up to whole blocks at either end
        assert launched <= int((hi - lo).sum()) + 2 * bs * T * (1 + (chunked > 0))
    else:
        assert launched == T * mb * bs


def mixed_batch(g, dtype=torch.float32, hkv=2, group=2, D=64):
    k_lens = [300, 1, 0, 170, 45]          # long chunk, decode, empty, chunk, whole prompt
    q_lens = [40, 1, 0, 17, 45]
    q = randn((sum(q_lens), hkv * group, D), dtype, g)
    k, v = (randn((sum(k_lens), hkv, D), dtype, g) for _ in range(2))
    return q, k, v, q_lens, k_lens


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("pairs", [600, 40])
def test_small_budget_pieces_match_float64(backend, pairs, monkeypatch):
    """With a budget of 600 pairs every call runs in many pieces (rows
    trimmed to their keys, table rows and columns sliced, one-row pieces
    over a whole context); with 40, single rows take their keys in chunks
    of 32 merged like splits: paged (checked and unchecked tables, split
    keys) and packed attention still match the float64 reference."""
    monkeypatch.setattr(AP, "PIECE_BYTES", pairs * AP.paged_pair_bytes(4, 2, 64, 4))
    g = torch.Generator().manual_seed(3)
    q, k, v, q_lens, k_lens = mixed_batch(g)
    kc, vc, tables, lens = scatter_to_pages(k, v, k_lens, 16, g)
    launched = []
    real = kernelforge.kernels.attention.launch

    def spy(kdef, *args, **kw):
        if "paged" in kdef.name and "combine" not in kdef.name:   # rows x table positions
            launched.append(args[0].shape[0] * args[3].shape[1] * 16)
        return real(kdef, *args, **kw)

    monkeypatch.setattr(kernelforge.kernels.attention, "launch", spy)
    for window in (None, 7):
        ref = reference.attention(q, k, v, cu(q_lens), cu(k_lens), 64 ** -0.5, window=window)
        for check_tables in (True, False):
            for splits in (1, 3):
                launched.clear()
                out = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, cu(q_lens),
                                                      window=window, splits=splits,
                                                      check_tables=check_tables,
                                                      backend=backend)
                what = f"paged window={window} check_tables={check_tables} splits={splits}"
                assert_close(out, ref, q.dtype, f"{what} [{backend}]")
                assert len(launched) > 3 and max(launched) <= max(pairs, 16), (what, launched)
        out = kernelforge.ops.attention(q, k, v, cu(q_lens), cu(k_lens), window=window,
                                        backend=backend)
        assert_close(out, ref, q.dtype, f"packed window={window} [{backend}]")


CHILD = r"""
import resource, sys, torch
sys.path.insert(0, {tests!r})
import kernelforge
from kernelforge.kernels import attention_plan as AP
AP.PIECE_BYTES = 64 << 20
from test_attention import cu, scatter_to_pages
import reference
g = torch.Generator().manual_seed(9)
hkv, group, D, n_new, cached = 2, 4, 128, 128, 1408
k_len = n_new + cached
q = torch.randn(n_new, hkv * group, D, generator=g).to(torch.bfloat16)
k, v = (torch.randn(k_len, hkv, D, generator=g).to(torch.bfloat16) for _ in range(2))
kc, vc, tables, lens = scatter_to_pages(k, v, [k_len], 16, g)
small = kernelforge.ops.paged_attention(q[:1], kc, vc, tables, lens, cu([1]),
                                        backend="eager")       # imports, first launch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, cu([n_new]), backend="eager")
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
ref = reference.attention(q, k, v, cu([n_new]), cu([k_len]), D ** -0.5)
err = (out.double() - ref).abs().max().item()
print(grew, err)
"""


@pytest.mark.skipif(DEVICE.type != "cpu", reason="peak host memory of the eager lowering")
def test_eager_peak_memory_follows_the_budget(tmp_path):
    """128 new tokens over 1408 cached (Hq 8, Hkv 2, D 128, bf16) on eager,
    in a child process with a 64 MiB budget: one launch would hold ~3 GB
    (128 x 1536 pairs of ~15.6 KB); in pieces the process's peak grows by
    less than 512 MiB, and the result still matches float64."""
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", CHILD.format(tests=tests)], cwd=tests,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    grew, err = (float(x) for x in r.stdout.split()[-2:])
    assert grew < 512 * 2 ** 20, f"peak grew by {grew / 2 ** 20:.0f} MiB"
    assert err < 2 ** -7 * 4, err
