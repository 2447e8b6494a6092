"""CPU benchmarks: kernelforge's attention (packed prefill, paged decode) against torch peers, in one run.

    python3 -m pytest bench/test_attention_bench.py --benchmark-only

Two groups, fp32:

* ``attention prefill S=1024 H=8 D=64 fp32``: ``kernelforge.ops.attention``
  on one causal sequence of 1024 tokens, 8 query and 8 kv heads, head size
  64, packed [S, H, D] with ``cu_seqlens = [0, 1024]``.
* ``paged decode B=32 ctx=1024 Hq=32 Hkv=8 D=128 fp32``:
  ``kernelforge.ops.paged_attention``, 32 sequences of one new query token
  each over a context of 1024 positions (new token included), 32 query
  heads, 8 kv heads, head size 128, a paged cache of block size 16 whose
  2048 blocks are handed to the sequences in a random permutation.

Per group the implementations are:

    kf_cpp               kernelforge.ops.*(..., backend="cpp") (the default on CPU
                         where a C++ compiler is found: the C++ lowering, loops kept)
    kf_inductor          backend="inductor" (torch.compile of the torch lowering)
    kf_eager             (prefill only) backend="eager"; left out of the decode
                         group: it materialises [T, Hkv, G, D, ctx] products,
                         512 MiB each, and an eager decode call takes longer
                         than the 2 s per call this suite allows
                         (docs/benchmarks.md, "Attention")
    torch_sdpa           (prefill) peers.sdpa_prefill: F.scaled_dot_product_attention
                         with is_causal=True on [1, H, S, D] tensors (transposed
                         and made contiguous once, outside the timed region)
    gather_sdpa_gqa      (decode) peers.gather_sdpa: each sequence's K/V blocks
                         gathered through the block table (index_select) into
                         [B, Hkv, ctx, D], then SDPA with the single query and
                         enable_gqa=True
    gather_sdpa_repeat   (decode) the same with the kv heads repeated to the 32
                         query heads (repeat_interleave) instead of enable_gqa

Work and traffic (the same for every implementation of a group):

* FLOPs = 4 x D x Hq x (query, key) pairs attended, counting only the
  unmasked pairs: S (S + 1) / 2 per head for causal prefill, B x ctx for
  decode. GFLOP/s = FLOPs / median.
* Bytes = q + k + v + out, each once (decode: the used cache blocks of K and
  V, B x 64 blocks x 16 x Hkv x D each). GB/s = bytes / median.

Every case runs once outside the timed region and is checked against a
float64 reference written here (per sequence softmax(Q K^T * scale + mask) V,
causal aligned bottom-right; for decode each sequence's keys and values are
read from the cache through its block table in float64) with
``kernelforge.tolerance.assert_close``, so a broken kernel can't post a fast
number. The copy bandwidth comes from the copy benchmark of
test_rmsnorm_bench.py when it ran first in this run, else from the
``copy_bandwidth`` fixture's own shorter copy (see conftest.py).

Goals (reported in the summary, not asserted), for the default CPU backend:
prefill kf_cpp at least 0.8x torch_sdpa (kf time <= 1.25 x SDPA time); decode
kf_cpp at least 2x gather_sdpa_gqa (the faster of the two gather peers).

There is no ``smoke`` case here: tests/test_bench_flow.py selects ``-k smoke``
over all of bench/ and expects exactly the RMSNorm smoke cases.

Compiles (never timed): one Inductor graph per kernel (packed, paged).
"""
from __future__ import annotations


import pytest
import torch

import kernelforge
from timing import run_timed  # noqa: E402  (bench/ is on sys.path under pytest)
from kernelforge.tolerance import assert_close

from peers import gather_sdpa, sdpa_prefill  # bench/ is on sys.path under pytest

# prefill: one causal sequence
S, H, D_PREFILL = 1024, 8, 64
# decode: B sequences, one new token each, over `CTX` positions of a paged cache
B, CTX, HQ, HKV, D_DECODE, BLOCK = 32, 1024, 32, 8, 128, 16
TARGET_S = 1.0          # aim for about this much timed work per case
MIN_ROUNDS, MAX_ROUNDS = 10, 200

PREFILL_GROUP = f"attention prefill S={S} H={H} D={D_PREFILL} fp32"
DECODE_GROUP = f"paged decode B={B} ctx={CTX} Hq={HQ} Hkv={HKV} D={D_DECODE} fp32"


# -- float64 reference ------------------------------------------------------------------

def ref_one(q, k, v, scale, causal=True):
    """One sequence in float64: q [Sq, Hq, D], k and v [Sk, Hkv, D] ->
    softmax(Q K^T * scale + mask) V as [Sq, Hq, D]; kv heads shared by
    Hq / Hkv consecutive query heads (GQA); causal aligned bottom-right
    (query i sees keys 0 .. Sk - Sq + i); a row that sees no key is 0."""
    Sq, Hq, _ = q.shape
    Sk, Hkv, _ = k.shape
    qh = q.double().transpose(0, 1)                                  # [Hq, Sq, D]
    kh = k.double().transpose(0, 1).repeat_interleave(Hq // Hkv, 0)  # [Hq, Sk, D]
    vh = v.double().transpose(0, 1).repeat_interleave(Hq // Hkv, 0)
    s = qh @ kh.transpose(1, 2) * scale                              # [Hq, Sq, Sk]
    if causal:
        i = torch.arange(Sq)[:, None]
        j = torch.arange(Sk)[None, :]
        s = s.masked_fill(j > i + (Sk - Sq), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                     # all-masked rows -> 0
    return (p @ vh).transpose(0, 1)


def ref_paged(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale):
    """Each sequence's keys and values read from the cache through its block
    table (row n of the context = row n % bs of block table[n // bs]), then
    ref_one; q [T, Hq, D] holds the sequences' new tokens one after another."""
    bs = key_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    starts = query_start_loc.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        blocks = block_tables[b, :(n + bs - 1) // bs].long()
        k = key_cache[blocks].reshape(-1, *key_cache.shape[2:])[:n]
        v = value_cache[blocks].reshape(-1, *value_cache.shape[2:])[:n]
        out[starts[b]:starts[b + 1]] = ref_one(q[starts[b]:starts[b + 1]], k, v, scale)
    return out


def causal_pairs(q_len: int, k_len: int) -> int:
    """(query, key) pairs a causal bottom-right-aligned sequence attends to."""
    return sum(max(0, min(k_len, k_len - q_len + i + 1)) for i in range(q_len))


# -- inputs, built once per group ------------------------------------------------------

_INPUTS: dict = {}


def prefill_inputs():
    """Packed q, k, v [S, H, D], cu_seqlens, their [1, H, S, D] copies for
    SDPA, the reference, FLOPs and bytes; only the current group is kept."""
    if PREFILL_GROUP not in _INPUTS:
        _INPUTS.clear()
        g = torch.Generator().manual_seed(4)
        q, k, v = (torch.randn(S, H, D_PREFILL, generator=g) for _ in range(3))
        cu = torch.tensor([0, S], dtype=torch.int32)
        bhsd = tuple(x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
        ref = ref_one(q, k, v, D_PREFILL ** -0.5)
        flops = 4 * D_PREFILL * H * causal_pairs(S, S)
        nbytes = 4 * q.numel() * q.element_size()                   # q, k, v, out
        _INPUTS[PREFILL_GROUP] = dict(q=q, k=k, v=v, cu=cu, bhsd=bhsd, ref=ref, flops=flops,
                                      nbytes=nbytes)
    return _INPUTS[PREFILL_GROUP]


def decode_inputs():
    """A paged cache of B x CTX / BLOCK blocks in a random permutation, one
    new query token per sequence, the reference, FLOPs and bytes."""
    if DECODE_GROUP not in _INPUTS:
        _INPUTS.clear()
        g = torch.Generator().manual_seed(5)
        nblk = (CTX + BLOCK - 1) // BLOCK
        num_blocks = B * nblk
        key_cache = torch.randn(num_blocks, BLOCK, HKV, D_DECODE, generator=g)
        value_cache = torch.randn(num_blocks, BLOCK, HKV, D_DECODE, generator=g)
        block_tables = torch.randperm(num_blocks, generator=g).to(torch.int32).view(B, nblk)
        seq_lens = torch.full((B,), CTX, dtype=torch.int32)
        query_start_loc = torch.arange(B + 1, dtype=torch.int32)
        q = torch.randn(B, HQ, D_DECODE, generator=g)
        ref = ref_paged(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                        D_DECODE ** -0.5)
        flops = 4 * D_DECODE * HQ * B * CTX
        el = q.element_size()
        nbytes = (2 * q.numel() * el                                 # q, out
                  + 2 * B * nblk * BLOCK * HKV * D_DECODE * el)      # used K and V blocks
        _INPUTS[DECODE_GROUP] = dict(q=q, key_cache=key_cache, value_cache=value_cache,
                                     block_tables=block_tables, seq_lens=seq_lens,
                                     query_start_loc=query_start_loc, ref=ref, flops=flops,
                                     nbytes=nbytes)
    return _INPUTS[DECODE_GROUP]


def make_fn(kind: str, impl: str, x: dict):
    """(the timed callable, a function that turns its result into [T, Hq, D])."""
    ops = kernelforge.ops
    same = lambda o: o  # noqa: E731
    if kind == "prefill":
        q, k, v, cu = x["q"], x["k"], x["v"], x["cu"]
        qt, kt, vt = x["bhsd"]
        return {
            "kf_cpp": (lambda: ops.attention(q, k, v, cu, cu, backend="cpp"), same),
            "kf_inductor": (lambda: ops.attention(q, k, v, cu, cu, backend="inductor"), same),
            "kf_eager": (lambda: ops.attention(q, k, v, cu, cu, backend="eager"), same),
            "torch_sdpa": (lambda: sdpa_prefill(qt, kt, vt), lambda o: o[0].transpose(0, 1)),
        }[impl]
    args = (x["q"], x["key_cache"], x["value_cache"], x["block_tables"], x["seq_lens"])
    qsl = x["query_start_loc"]
    return {
        "kf_cpp": (lambda: ops.paged_attention(*args, qsl, backend="cpp"), same),
        "kf_inductor": (lambda: ops.paged_attention(*args, qsl, backend="inductor"), same),
        "gather_sdpa_gqa": (lambda: gather_sdpa(*args, gqa=True), same),
        "gather_sdpa_repeat": (lambda: gather_sdpa(*args, gqa=False), same),
    }[impl]


# -- the cases ------------------------------------------------------------------------

CASES = (("prefill", ("kf_cpp", "kf_inductor", "kf_eager", "torch_sdpa")),
         ("decode", ("kf_cpp", "kf_inductor", "gather_sdpa_gqa", "gather_sdpa_repeat")))


def _params():
    for kind, impls in CASES:
        shape = f"S{S}" if kind == "prefill" else f"B{B}-ctx{CTX}"
        for impl in impls:
            yield pytest.param(kind, impl, id=f"attention-{kind}-{shape}-fp32-{impl}")


@pytest.mark.parametrize("kind,impl", list(_params()))
def test_attention(benchmark, copy_bandwidth, record_case, kind, impl):
    if kind == "prefill":
        group, op, x = PREFILL_GROUP, "attention", prefill_inputs()
    else:
        group, op, x = DECODE_GROUP, "paged_attention", decode_inputs()
    fn, to_thd = make_fn(kind, impl, x)

    # compile / warm up, then check the result once, all outside the timed region
    got = to_thd(fn())
    assert got.dtype == torch.float32
    assert_close(got, x["ref"], torch.float32, f"{group} {impl}")
    del got
    run_timed(benchmark, fn, group=group, target_s=TARGET_S, min_rounds=MIN_ROUNDS,
              max_rounds=MAX_ROUNDS)
    record_case(benchmark, group=group, impl=impl, nbytes=x["nbytes"], op=op,
                flops=x["flops"])
