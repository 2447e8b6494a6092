"""attention(check_seqlens=False) and paged_attention(check_tables=False):
offsets, lengths and block tables nobody checked. The result is undefined
but no lowering may read outside k, v or the cache, nor walk an absurd key
range: each call finishes quickly on every backend (Triton through the
interpreter), rows of well-formed sequences keep their values, and a call
with no sequence gives 0. The calls run in a child process, so a segfault
fails the test instead of ending pytest."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import BACKENDS
import reference
from kernelforge.tolerance import assert_close

D = 64
BIG = 2 ** 31 - 1

# (name, op, lengths): "packed": cu_seqlens_q, cu_seqlens_k over q, k of the
# given token counts; "paged": block_tables, seq_lens, query_start_loc over a
# cache of 4 blocks of 16. Sequence 0 of the first three is well formed.
CASES = [
    ("cu_k past k", "packed", dict(tq=7, tk=7, cq=[0, 3, 5, 7], ck=[0, 3, BIG, 7])),
    ("cu_k far past one key", "packed", dict(tq=1, tk=1, cq=[0, 1], ck=[0, 10 ** 8])),
    ("cu_k negative", "packed", dict(tq=7, tk=7, cq=[0, 3, 5, 7], ck=[0, 3, -BIG - 1, -7])),
    ("cu_q past q", "packed", dict(tq=7, tk=7, cq=[0, 3, BIG, -5], ck=[0, 3, 5, 7])),
    ("no sequence", "packed", dict(tq=3, tk=3, cq=[0], ck=[0])),
    ("tables out of range", "paged", dict(tables=[[0, 1], [10 ** 6, -5]], lens=[20, 32],
                                          qsl=[0, 1, 3])),
    ("lengths past the table", "paged", dict(tables=[[0, 1], [2, 3]], lens=[20, BIG],
                                             qsl=[0, 1, 3])),
    ("lengths far past the table", "paged", dict(tables=[[0, 1], [2, 3]], lens=[20, 10 ** 8],
                                                 qsl=[0, 1, 3], splits=4)),
    ("negative lengths", "paged", dict(tables=[[0, 1], [2, 3]], lens=[20, -BIG - 1],
                                       qsl=[0, 1, 3])),
    ("query offsets past q", "paged", dict(tables=[[0, 1], [2, 3]], lens=[20, 5],
                                           qsl=[0, 1, BIG])),
    ("no sequence, paged", "paged", dict(tables=[], lens=[], qsl=[0], tq=3)),
]

CHILD = r"""
import sys, torch, kernelforge
from kernelforge.checks import OpArgError
backend, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, {tests!r})
from test_attention_unchecked import CASES, inputs
results = {{}}
for name, op, kw in CASES:
    args, extra = inputs(op, kw)
    try:
        if op == "packed":
            out = kernelforge.ops.attention(*args, check_seqlens=False, backend=backend)
        else:
            out = kernelforge.ops.paged_attention(*args, check_tables=False, backend=backend,
                                                  **extra)
        results[name] = out
    except OpArgError as e:      # a lowering that plans on the host may still check
        results[name] = str(e)
    torch.save(results, path)    # after each case: a crash leaves the ones before it
"""


def i32(x):
    return torch.tensor(x, dtype=torch.int32)


def inputs(op, kw):
    """The call's tensors (fp32, 2 query heads over 1 kv head) and keyword extras."""
    g = torch.Generator().manual_seed(0)
    if op == "packed":
        q = torch.randn(kw["tq"], 2, D, generator=g)
        k, v = (torch.randn(kw["tk"], 1, D, generator=g) for _ in range(2))
        return (q, k, v, i32(kw["cq"]), i32(kw["ck"])), {}
    q = torch.randn(kw.get("tq", 3), 2, D, generator=g)
    kc, vc = (torch.randn(4, 16, 1, D, generator=g) for _ in range(2))
    tables = i32(kw["tables"]).reshape(len(kw["lens"]), 2)
    extra = {"splits": kw["splits"]} if "splits" in kw else {}
    return (q, kc, vc, tables, i32(kw["lens"]), i32(kw["qsl"])), extra


def well_formed_rows(op, kw, args):
    """(rows, reference) of sequence 0, when it is well formed, else None."""
    if op == "packed":
        q, k, v, cq, ck = args
        if len(kw["cq"]) < 2:
            return None
        nq, nk = kw["cq"][1], kw["ck"][1]
        return nq, reference.attention(q[:nq], k[:nk], v[:nk], i32([0, nq]), i32([0, nk]),
                                       D ** -0.5)
    q, kc, vc, tables, lens, qsl = args
    if not kw["lens"]:
        return None
    n, nq = kw["lens"][0], kw["qsl"][1]
    k = kc[tables[0].long()].reshape(-1, 1, D)[:n]
    v = vc[tables[0].long()].reshape(-1, 1, D)[:n]
    return nq, reference.attention(q[:nq], k, v, i32([0, nq]), i32([0, n]), D ** -0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_offsets_read_nothing_outside(backend, tmp_path):
    path = tmp_path / "results.pt"
    tests = os.path.dirname(os.path.abspath(__file__))
    child = CHILD.format(tests=tests)
    try:
        r = subprocess.run([sys.executable, "-c", child, backend, str(path)], cwd=tests,
                           capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        done = list(torch.load(path)) if path.exists() else []
        pytest.fail(f"[{backend}] still running after 240 s; finished: {done}")
    done = torch.load(path) if path.exists() else {}
    if r.returncode:
        crashed = next((c[0] for c in CASES if c[0] not in done), "?")
        pytest.fail(f"[{backend}] child exited with {r.returncode} in case {crashed!r}:\n"
                    f"{r.stderr[-2000:]}")
    for name, op, kw in CASES:
        out = done[name]
        if isinstance(out, str):            # refused with an argument error
            assert backend in ("eager", "inductor") and op == "packed", (name, out)
            continue
        args, _ = inputs(op, kw)
        q = args[0]
        assert out.shape == q.shape and out.dtype == q.dtype, name
        assert out.isfinite().all(), f"[{backend}] {name}: non-finite output"
        if name.startswith("no sequence"):
            assert not out.any(), f"[{backend}] {name}: a row that sees no key is not 0"
        good = well_formed_rows(op, kw, args)
        if good is not None:
            nq, ref = good
            assert_close(out[:nq], ref, q.dtype, f"[{backend}] {name}: sequence 0")
