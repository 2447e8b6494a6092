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
def test_prefix_prefill_plan_stays_within_the_budget(check_tables):
    """4 prompts of 2048 tokens over 8192 cached (Hq 32, Hkv 8, D 128,
    bf16): one launch would hold ~2.5 TB of temporaries. The planned pieces
    cover every row once, in
    order, each within PIECE_BYTES (a piece of one row may exceed it only
    when that row alone does), and each piece's table rows and columns hold
    every key its rows see (row ranges from row_ranges, per row)."""
    hq, hkv, D, bs = 32, 8, 128, 16
    tables, lens, qsl, k_len = prefix_prefill()
    T, mb = int(qsl[-1]), tables.shape[1]
    pair = AP.paged_pair_bytes(hq, hkv, D, 2)
    assert T * mb * bs * pair > 2e12
    plan = AP.paged_attention_plan(tables, lens, qsl, check_tables=check_tables)
    max_pairs = AP.PIECE_BYTES // pair
    planned = plan.launch_pieces(T, bs, mb, max_pairs, torch.device("cpu"))
    assert [r for p in planned for r in range(p[0], p[1])] == list(range(T))
    seq, lo, hi = AP.row_ranges(qsl.long(), qsl.diff().long(), lens.long(), True, None,
                                torch.device("cpu"), T)
    for r0, r1, tab, s, l, h, width in planned:
        rows = r1 - r0
        assert rows == 1 or rows * width * pair <= AP.PIECE_BYTES, (r0, r1, width)
        assert tab.shape[1] * bs == width
        for r in (r0, (r0 + r1) // 2, r1 - 1):
            b = int(seq[r])
            # the piece's table row of sequence b, from its start column, reads
            # the same blocks as the full table over the row's keys
            c0 = int(lo[r] - l[r - r0]) // bs
            assert int(h[r - r0] - l[r - r0]) == int(hi[r] - lo[r])
            used = slice(int(lo[r]) // bs, -(-int(hi[r]) // bs))
            mine = slice(int(l[r - r0]) // bs, -(-int(h[r - r0]) // bs))
            assert torch.equal(tab[int(s[r - r0])][mine], tables[b][used]), r
            assert c0 >= 0
    launched = sum((p[1] - p[0]) * p[6] for p in planned)
    if check_tables:
        # trimmed to what the rows see, up to whole blocks at either end
        assert launched <= int((hi - lo).sum()) + 2 * bs * T
    else:
        assert launched == T * mb * bs


def mixed_batch(g, dtype=torch.float32, hkv=2, group=2, D=64):
    k_lens = [300, 1, 0, 170, 45]          # long chunk, decode, empty, chunk, whole prompt
    q_lens = [40, 1, 0, 17, 45]
    q = randn((sum(q_lens), hkv * group, D), dtype, g)
    k, v = (randn((sum(k_lens), hkv, D), dtype, g) for _ in range(2))
    return q, k, v, q_lens, k_lens


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_small_budget_pieces_match_float64(backend, monkeypatch):
    """With a budget of a few thousand pairs every call runs in many pieces
    (rows trimmed to their keys, table rows and columns sliced, one-row
    pieces over a whole context): paged (checked and unchecked tables,
    split keys) and packed attention still match the float64 reference."""
    monkeypatch.setattr(AP, "PIECE_BYTES", 600 * AP.paged_pair_bytes(4, 2, 64, 4))
    g = torch.Generator().manual_seed(3)
    q, k, v, q_lens, k_lens = mixed_batch(g)
    kc, vc, tables, lens = scatter_to_pages(k, v, k_lens, 16, g)
    launched = []
    real = kernelforge.kernels.attention.launch

    def spy(kdef, *args, **kw):
        if "paged" in kdef.name and "combine" not in kdef.name:
            launched.append((args[0].shape[0], args[7].shape[0] * (
                -(-(args[3].shape[1] * 16) // args[7].shape[0]) if "split" in kdef.name
                else 1)))
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
                assert len(launched) > 3, (what, launched)
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
