"""The public attention ops: ``attention`` (packed variable-length
sequences) and ``paged_attention`` (a paged KV cache, decode and chunked
prefill in one batch), with their argument checks, launch decisions and
``torch.library`` custom ops.

The modules form one chain: ``attention_kernels`` (the IR kernels) <-
``attention_plan`` (host planning: each row's key range, launch pieces,
offsets, the per-step plan, split counts) <- this module.
"""
from typing import Optional

import torch

from kernelforge import checks
from kernelforge.backends import registry
from kernelforge.dispatch import NewTensor, launch
from kernelforge.spec import (Backend, Bad, Bool, Call, Float, Host, Int, OpSpec, Output, Tensor,
                              bench)
from kernelforge.tolerance import tolerance

from . import attention_plan, attention_reference
from .attention_kernels import (attention_decode_kernel, attention_kernel, packed_kernels,
                                paged_attention_kernel, paged_combine_kernel, paged_kernels, paged_split_kernel,
                                split_kernels)
from .attention_plan import clamp_ranges, lengths, pieces, row_ranges
from .attention_reference import HEAD_SIZES
from .kv_cache import distinct_caches


def _query_block(q: torch.Tensor, backend=None) -> int:
    """Query rows per program of the packed kernel: 128 on GPUs for 16-bit
    inputs with head size <= 128 (tensor-core tiles; docs/gpu-results.md,
    "Run 1"); 16 elsewhere: fp32 or head size 256 tiles of 128 rows
    overflow shared memory, and the torch lowerings and the interpreter gain
    nothing from more. A backend may choose (``Backend.block_rows``: the C++
    lowering's 128), cut to the power of two that holds all the rows (at
    least 16): the C++ tiles have a fixed row count, so a few-token call on
    128-row tiles does mostly padding (docs/benchmarks.md, "Query tiles for
    small calls")."""
    if backend is not None and backend.block_rows:
        rows = max(16, 1 << max(q.shape[0] - 1, 0).bit_length())
        return min(backend.block_rows, rows)
    if q.device.type == "cuda" and q.element_size() == 2 and q.shape[-1] <= 128:
        return 128
    return 16


def rounds_p(round_p: Optional[bool], dtype: torch.dtype, backend) -> bool:
    """Whether p is rounded to ``dtype`` before p.v: never for fp32 inputs
    (p is already fp32); else ``round_p``, and None leaves it to the backend
    (``Backend.half_products_faster``: Triton, where p rounded is one 16-bit
    tensor-core product and p kept in fp32 two, ``hi + lo``)."""
    if dtype == torch.float32:
        return False
    if round_p is not None:
        return round_p
    return bool(backend is not None and backend.half_products_faster)


# -- checks across arguments ------------------------------------------------------------

def _heads(op, a, k_name, v_name):
    """q's head size and head count against the keys' (every attention op)."""
    q, k, v = a.q, getattr(a, k_name), getattr(a, v_name)
    D = q.shape[2]
    if D not in HEAD_SIZES:
        checks.fail(op, "q", f"a head size in {HEAD_SIZES}", f"head size {D}")
    for name, x in ((k_name, k), (v_name, v)):
        if x.shape[-1] != D:
            checks.fail(op, name, f"head size {D} (the last dim of `q`)", list(x.shape))
    checks.shape(op, v_name, v, tuple(k.shape), f" (the shape of `{k_name}`)")
    hkv = k.shape[-2]
    if not hkv:
        checks.fail(op, k_name, "at least 1 kv head", list(k.shape))
    if q.shape[1] % hkv or not q.shape[1]:
        checks.fail(op, "q", f"a number of heads that is a multiple of the {hkv} kv heads",
                    f"{q.shape[1]} heads")


def _scalars(a):
    D = a.q.shape[2]
    return float(D ** -0.5 if a.scale is None else a.scale), float(a.softcap or 1.0)


# -- packed attention -------------------------------------------------------------------

def _check_packed(op, a):
    _heads(op, a, "k", "v")
    if not torch.compiler.is_compiling():    # (traced: checked when the custom op runs)
        decision = registry.select(a.q.device, a.backend)
        # a lowering that collapses the key loop plans its launches from the host copy
        host = a.check_seqlens or decision.backend.collapses_loops
        cq, a._cq_host = lengths(op, "cu_seqlens_q", a.cu_seqlens_q, a.q, a.q.shape[0], "q",
                                 host)
        ck, a._ck_host = lengths(op, "cu_seqlens_k", a.cu_seqlens_k, a.q, a.k.shape[0], "k",
                                 host)
        if cq.shape != ck.shape:
            checks.fail(op, "cu_seqlens_k", f"{cq.shape[0]} entries (as `cu_seqlens_q`)",
                        f"{ck.shape[0]}")
        a._cq, a._ck, a._decision = cq, ck, decision


def _run_packed(a):
    q, k, v, backend = a.q, a.k, a.v, a.backend
    cq, ck, decision = a._cq, a._ck, a._decision
    T, D = q.shape[0], q.shape[2]
    hkv = k.shape[1]
    if not T:
        return torch.empty_like(q)
    if cq.shape[0] == 1:          # (unchecked) no sequence: no row sees a key
        return torch.zeros_like(q)
    lo, hi = _key_ranges(a, cq, ck, T, k.shape[0])
    G = q.shape[1] // hkv
    qg = q.view(T, hkv, G, D) if q.stride(-1) == 1 else q.reshape(T, hkv, G, D)
    rp = rounds_p(a.round_p, q.dtype, decision.backend)
    scalars = _scalars(a)
    if not decision.backend.collapses_loops and T < cq.shape[0]:
        # at most one query row per sequence (decode): a program per row and
        # kv head, not a tile of query rows that would be mostly padding
        (out,) = launch(attention_decode_kernel(a.softcap is not None, rp), qg, k, v, lo, hi,
                        NewTensor(qg.shape, q.dtype, q.device), *scalars, backend=backend)
        return out.view(T, hkv * G, D)
    kdef = attention_kernel(a.softcap is not None, _query_block(q, decision.backend), rp)
    if not decision.backend.collapses_loops:
        (out,) = launch(kdef, qg, k, v, lo, hi, NewTensor(qg.shape, q.dtype, q.device), *scalars,
                        backend=backend)
        return out.view(T, hkv * G, D)
    # a lowering that walks every key of the launch for every row: launch per
    # block of rows over just their keys (causal skipping, no cross-sequence pairs)
    outs = []
    max_pairs = attention_plan.PIECE_BYTES // attention_plan.packed_pair_bytes(q.shape[1])
    for r0, r1, k0, k1, _, _ in pieces(a._cq_host, a._ck_host, a.causal, a.window,
                                       attention_plan.PIECE_ROWS, max_pairs):
        (o,) = launch(kdef, qg[r0:r1], k[k0:k1], v[k0:k1], lo[r0:r1] - k0, hi[r0:r1] - k0,
                      NewTensor((r1 - r0, hkv, G, D), q.dtype, q.device), *scalars,
                      backend=backend)
        outs.append(o)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(T, hkv * G, D)


#: the last call's key ranges: (cu_seqlens_q, cu_seqlens_k, their versions, the
#: other inputs of the ranges, lo, hi). A model's layers pass the same offsets.
_LAST_RANGES: list = [None]


def _key_ranges(a, cq, ck, T, TK):
    """Each query row's key range [lo, hi) as positions in k (int32); reused
    while the call passes the very same offset tensors, unmodified, as the
    last one (every layer of a forward does), else computed on the device."""
    cu_q, cu_k = a.cu_seqlens_q, a.cu_seqlens_k
    eager = not torch.compiler.is_compiling()
    if eager:
        key = (cu_q._version, cu_k._version, T, TK, a.causal, a.window, a._ck_host is None)
        last = _LAST_RANGES[0]
        if last is not None and last[0] is cu_q and last[1] is cu_k and last[2] == key:
            return last[3], last[4]
    seq, lo, hi = row_ranges(cq, cq.diff(), ck.diff(), a.causal, a.window, cq.device, T)
    lo, hi = ck[seq] + lo, ck[seq] + hi
    if a._ck_host is None:
        # unchecked offsets may name rows outside k: each range is clamped into
        # [0, Tk] here, so no lowering reads outside k and v or walks an absurd range
        lo, hi = clamp_ranges(lo, hi, TK)
    lo, hi = lo.to(torch.int32), hi.to(torch.int32)
    if eager:
        _LAST_RANGES[0] = (cu_q, cu_k, key, lo, hi)
    return lo, hi


# -- paged attention --------------------------------------------------------------------

def _check_paged(op, a):
    _heads(op, a, "key_cache", "value_cache")
    distinct_caches(op, a.key_cache, a.value_cache)
    checks.no_host_check_inline(op, "check_tables", a.check_tables)
    if a.splits is not None and (not isinstance(a.splits, int) or isinstance(a.splits, bool)
                                 or not 1 <= a.splits <= 64):
        checks.fail(op, "splits", "None or an int in [1, 64]", repr(a.splits))
    if checks.opaque():       # traced into an opaque call: the custom op checks when it runs
        return
    plan = a.plan
    if plan is None:
        plan = attention_plan.build(a.block_tables, a.seq_lens, a.query_start_loc, a.causal,
                                    a.window, a.check_tables, op)
    elif not isinstance(plan, attention_plan.PagedAttentionPlan):
        checks.fail(op, "plan", "None or a PagedAttentionPlan (ops.paged_attention_plan)",
                    type(plan).__name__)
    else:
        plan.matches(op, a.block_tables, a.seq_lens, a.query_start_loc, a.causal, a.window,
                     a.check_tables)
    T = a.q.shape[0]
    if plan.qsl_host is not None and plan.qsl_host[-1] != T:
        checks.fail(op, "query_start_loc", f"to end at {T} (the tokens in `q`)",
                    f"{plan.qsl_host[-1]}")
    nb, bs = a.key_cache.shape[:2]
    mb = a.block_tables.shape[1]
    if a.check_tables and plan.q_lens.shape[0] and (nb, bs) not in plan.checked:
        attention_plan.check_block_tables(op, a.block_tables, plan.lens, plan.q_lens, nb, bs, mb)
        plan.checked.add((nb, bs))
    a._plan = plan


def _run_paged(a):
    q, key_cache, value_cache, backend, plan = a.q, a.key_cache, a.value_cache, a.backend, a._plan
    chosen = None
    if not torch.compiler.is_compiling():        # (inline: no backend runs it)
        chosen = registry.select(q.device, backend).backend
    rp = rounds_p(a.round_p, q.dtype, chosen)
    T, D = q.shape[0], q.shape[2]
    hkv = key_cache.shape[2]
    bs, mb = key_cache.shape[1], a.block_tables.shape[1]
    if not T:
        return torch.empty_like(q)
    if not plan.q_lens.shape[0]:      # (unchecked) no sequence: no row sees a key
        return torch.zeros_like(q)
    G = q.shape[1] // hkv
    qg = q.view(T, hkv, G, D) if q.stride(-1) == 1 else q.reshape(T, hkv, G, D)
    scalars = _scalars(a)
    splits = a.splits if a.splits is not None else \
        attention_plan.choose_splits(T * hkv, mb * bs, q.device)
    f32, dev = torch.float32, q.device
    softcap = a.softcap is not None

    def split_parts(qp, tables, seq, lo, hi, n_keys, parts):
        """The split kernel's running max, sum and output over ``parts`` splits."""
        rows = qp.shape[0]
        return launch(paged_split_kernel(softcap, rp), qp, key_cache, value_cache, tables, seq,
                      lo, hi, plan.split_length(-(-n_keys // parts), dev),
                      NewTensor((rows, hkv, parts, G), f32, dev),
                      NewTensor((rows, hkv, parts, G), f32, dev),
                      NewTensor((rows, hkv, parts, G, D), f32, dev), *scalars, backend=backend)

    def run(qp, tables, seq, lo, hi, n_keys):
        """One launch (or split + combine) over rows ``qp`` and ``n_keys`` positions."""
        if splits == 1:
            return launch(paged_attention_kernel(softcap, rp), qp, key_cache, value_cache,
                          tables, seq, lo, hi, plan.context(n_keys, dev),
                          NewTensor(qp.shape, q.dtype, dev), *scalars, backend=backend)[0]
        part = split_parts(qp, tables, seq, lo, hi, n_keys, splits)
        return launch(paged_combine_kernel, *part, NewTensor(qp.shape, q.dtype, dev),
                      backend=backend)[0]

    if chosen is None or not chosen.collapses_loops:
        seq, lo, hi = plan.key_ranges(T, mb * bs, dev)
        return run(qg, plan.tables, seq, lo, hi, mb * bs).view(T, hkv * G, D)
    # a lowering that holds every (row, key) pair of a launch at once: launches
    # of a bounded size, each over only the keys its rows see where the host knows
    max_pairs = attention_plan.PIECE_BYTES // attention_plan.paged_pair_bytes(
        q.shape[1], hkv, D, q.element_size())
    outs = []
    for r0, r1, chunks in plan.launch_pieces(T, bs, mb, max_pairs, dev):
        qp = qg[r0:r1]
        if len(chunks) == 1:
            tables, seq, lo, hi, n_keys = chunks[0]
            outs.append(run(qp, tables, seq, lo, hi, n_keys) if n_keys else
                        torch.zeros(qp.shape, dtype=q.dtype, device=dev))
            continue
        # keys in chunks, each one split's partial softmax, merged by the
        # combine (padded to a power of two of empty splits: fewer specialisations)
        parts = [split_parts(qp, *c, 1) for c in chunks]
        n = 1 << (len(parts) - 1).bit_length()
        pad = [torch.full((r1 - r0, hkv, n - len(parts), G), float("-inf"), device=dev),
               torch.zeros((r1 - r0, hkv, n - len(parts), G), device=dev),
               torch.zeros((r1 - r0, hkv, n - len(parts), G, D), device=dev)]
        merged = [torch.cat([p[i] for p in parts] + [pad[i]], dim=2) for i in range(3)]
        outs.append(launch(paged_combine_kernel, *merged, NewTensor(qp.shape, q.dtype, dev),
                           backend=backend)[0])
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(T, hkv * G, D)


# -- the specs -----------------------------------------------------------------------------

def _allowance(reference):
    """With p rounded (``round_p``), one ulp of the inputs' dtype times
    softmax|V| more than the policy (docs/tolerance.md)."""
    def allowance(a, ref):
        chosen = registry.select(a.q.device, a.backend).backend
        if not rounds_p(a.round_p, a.q.dtype, chosen):
            return (None,)
        _, mag = reference(a, abs_v=True)
        return (tolerance(a.q.dtype).rtol * mag,)
    return allowance


def _packed_reference(a, abs_v=False):
    D = a.q.shape[-1]
    return attention_reference.attention(a.q, a.k, a.v, a.cu_seqlens_q.cpu(),
                                         a.cu_seqlens_k.cpu(), D ** -0.5 if a.scale is None
                                         else a.scale, a.causal, a.window, a.softcap, abs_v)


def _draw_common(st, draw, budget):
    hkv, group, D, dtype, softcap, q_lens, k_lens = attention_reference.draw_batch(st, draw,
                                                                                   budget)
    kw = dict(causal=draw(st.booleans()), window=draw(st.one_of(st.none(), st.integers(0, 20))),
              softcap=softcap, round_p=draw(st.sampled_from([None, False, True])))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))

    def randn(*shape):
        return torch.randn(shape, generator=g).to(dtype)
    return hkv, group, D, dtype, q_lens, k_lens, kw, g, randn


def _packed_samples(st, budget):
    @st.composite
    def draw(draw):
        hkv, group, D, dtype, q_lens, k_lens, kw, g, randn = _draw_common(st, draw, budget)
        dev = budget.device
        kw.update(q=randn(sum(q_lens), hkv * group, D).to(dev),
                  k=randn(sum(k_lens), hkv, D).to(dev), v=randn(sum(k_lens), hkv, D).to(dev),
                  cu_seqlens_q=attention_reference.cu_of(q_lens, dev),
                  cu_seqlens_k=attention_reference.cu_of(k_lens, dev))
        return Call(kw, f"q_lens={q_lens} k_lens={k_lens} {hkv}x{group}x{D} {dtype}")
    return draw()


def _paged_reference(a, abs_v=False):
    return attention_reference.paged(a, abs_v)


def _paged_samples(st, budget):
    @st.composite
    def draw(draw):
        hkv, group, D, dtype, q_lens, k_lens, kw, g, randn = _draw_common(st, draw, budget)
        dev = budget.device
        bs = draw(budget.sizes([16, 32]))
        k, v = randn(sum(k_lens), hkv, D), randn(sum(k_lens), hkv, D)
        kc, vc, tables, lens = attention_reference.scatter_to_pages(k, v, k_lens, bs, g, dev)
        kw.update(q=randn(sum(q_lens), hkv * group, D).to(dev), key_cache=kc, value_cache=vc,
                  block_tables=tables, seq_lens=lens,
                  query_start_loc=attention_reference.cu_of(q_lens, dev),
                  splits=draw(st.sampled_from([None, 1, 3])))
        return Call(kw, f"q_lens={q_lens} k_lens={k_lens} {hkv}x{group}x{D} bs={bs} {dtype}")
    return draw()


def _bench_packed(device, dtype, S, hq, hkv, D):
    cu = attention_reference.cu_of([S], device)
    q = torch.randn(S, hq, D, device=device).to(dtype)
    k, v = (torch.randn(S, hkv, D, device=device).to(dtype) for _ in range(2))
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu)


def _bench_paged(device, dtype, B, ctx, hq, hkv, D, bs=16):
    """B decode rows, each over ``ctx`` cached positions in its own blocks."""
    per = -(-ctx // bs)
    kc, vc = (torch.randn(B * per, bs, hkv, D, device=device).to(dtype) for _ in range(2))
    return dict(q=torch.randn(B, hq, D, device=device).to(dtype), key_cache=kc, value_cache=vc,
                block_tables=torch.arange(B * per, dtype=torch.int32, device=device).view(B, per),
                seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=device),
                query_start_loc=attention_reference.cu_of([1] * B, device))


def _packed_cost(a):
    T, hq, D = a.q.shape
    pairs = T * T / 2 if a.causal else T * T       # one sequence, the benchmark's shape
    return (a.q.numel() * 2 + a.k.numel() * 2) * a.q.element_size(), 4 * pairs * hq * D


def _packed_peer(a):
    """SDPA on the one sequence (GQA expanded), as a model file calls it."""
    q, k, v = (x.transpose(0, 1)[None] for x in (a.q, a.k, a.v))
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=a.causal, enable_gqa=True)[0].transpose(0, 1)


_Q = Tensor("q", dims=3, layout="[tokens, q_heads, head_size]", doc=(
    "[T, Hq, D] float32, bfloat16 or float16; D in (64, 80, 96, 128, 256)"))
_COMMON_KW = (
    Float("scale", default=None, positive=True, kw_only=True,
          doc="score scale, default D ** -0.5"),
    Bool("causal", default=True, kw_only=True, doc=(
        "query i of a sequence sees keys up to position ``k_len - q_len + i`` (aligned to "
        "the end of the keys)")),
    Int("window", default=None, low=0, kw_only=True,
        why=" (keys at most `window` positions to the left)", doc=(
            "sliding window: keys at most ``window`` positions left of the query's own "
            "position (FlashAttention's ``window_size[0]``)")),
    Float("softcap", default=None, positive=True, kw_only=True,
          doc="scores become ``softcap * tanh(scores / softcap)``"))
_ROUND_P = Bool("round_p", default=None, kw_only=True, doc=(
    "for 16-bit inputs, round the softmax weights p to the inputs' type before p.v, as "
    "FlashAttention does (sums stay fp32): one 16-bit tensor-core product instead of two; "
    "each output may then move by up to 2^-8 (bf16; fp16: 2^-11) of "
    "``sum_j p_j |v_j| / sum_j p_j`` (docs/tolerance.md). False keeps p in fp32; None lets "
    "the backend choose (Triton rounds; the torch and C++ lowerings do not)"))
_NAN_RULE = ("A NaN in a query row or in a key or value it sees makes the row NaN; nothing "
             "it does not see reaches it (docs/attention.md, \"NaN and inf\", says where a "
             "packed launch block is the exception); a row that sees no key is 0.")


def _kv(name, dims, layout, doc):
    return Tensor(name, dims=dims, layout=layout, dtype_of="q", device_of="q", doc=doc)


ATTENTION = OpSpec(
    "attention",
    "Attention over packed variable-length sequences (FlashAttention's varlen form).",
    args=(_Q,
          _kv("k", 3, "[tokens, kv_heads, head_size]", "[Tk, Hkv, D], q's dtype; Hq a "
              "multiple of Hkv (GQA, MQA)"),
          _kv("v", 3, "[tokens, kv_heads, head_size]", "k's shape and q's dtype"),
          Tensor("cu_seqlens_q", dtypes=None, last_contiguous=False, device_of="q", doc=(
              "int32 [B+1], each sequence's first row (0, then cumulative lengths); "
              "zero-length sequences are allowed")),
          Tensor("cu_seqlens_k", dtypes=None, last_contiguous=False, device_of="q",
                 doc="int32 [B+1], the same for the keys"),
          *_COMMON_KW, _ROUND_P,
          Bool("check_seqlens", default=True, kw_only=True, doc=(
              "verify both ``cu_seqlens`` on the host first (start at 0, never decrease, end "
              "at the token count): two device-to-host copies. With False the Triton and C++ "
              "lowerings make no host sync (the call can be captured in a CUDA graph); with "
              "bad offsets nothing is read or written outside the tensors, but the result is "
              "undefined. The torch lowerings plan their launches on the host and check "
              "anyway")),
          Backend()),
    outputs=(Output("out", lambda a: a.q.shape, "q", "[T, Hq, D] in q's dtype. " + _NAN_RULE),),
    run=_run_packed, check=_check_packed, inline=False,
    kernels=packed_kernels,
    example=">>> o = kernelforge.ops.attention(q, k, v, cu, cu)   # causal prefill",
    reference=lambda a: (_packed_reference(a),), allowance=_allowance(_packed_reference),
    samples=_packed_samples, bench=bench(_bench_packed, (128, 8, 2, 64), (1024, 8, 2, 64)),
    cost=_packed_cost, peer=_packed_peer,
    bad=(Bad("a head size that is not supported", lambda c: c.with_(
        **{n: c.kwargs[n][..., :-8] for n in ("q", "k", "v")}), ("`q`", "head size in")),
         Bad("cu_seqlens_q not ending at the tokens", lambda c: c.with_(
             cu_seqlens_q=c.kwargs["cu_seqlens_q"] + 1), ("`cu_seqlens_q`",)),
         Bad("q heads not a multiple of kv heads", lambda c: c.with_(**{
             n: c.kwargs[n][:, :1].expand(-1, c.kwargs["q"].shape[1] + 1, -1).contiguous()
             for n in ("k", "v")}), ("`q`", "multiple of"))),
    vllm="flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, ...) (prefill)",
)


PAGED_ATTENTION = OpSpec(
    "paged_attention",
    "Attention of new query tokens over a paged KV cache, for a batch that mixes\n"
    "decode rows (one query token) and chunked-prefill rows.",
    args=(_Q,
          _kv("key_cache", 4, "[num_blocks, block_size, kv_heads, head_size]", (
              "[num_blocks, block_size, Hkv, D], q's dtype; the new tokens' keys already "
              "written (``reshape_and_cache``)")),
          _kv("value_cache", 4, "[num_blocks, block_size, kv_heads, head_size]",
              "key_cache's shape, in memory of its own"),
          Tensor("block_tables", dtypes=None, last_contiguous=False, device_of="q", doc=(
              "int32 [B, max_blocks]: block b of sequence i is ``block_tables[i, b]``; "
              "entries past a sequence's length are ignored")),
          Tensor("seq_lens", dtypes=None, last_contiguous=False, device_of="q",
                 doc="int32 [B]: each sequence's context length, new tokens included"),
          Tensor("query_start_loc", dtypes=None, last_contiguous=False, device_of="q",
                 doc="int32 [B+1]: each sequence's first row in q"),
          *_COMMON_KW,
          Bool("check_tables", default=True, kw_only=True, doc=(
              "verify block-table entries, lengths and ``query_start_loc`` on the host first "
              "(device-to-host copies). With False the call makes no host sync (it can be "
              "captured in a CUDA graph); with a bad table, lengths or offsets nothing is "
              "read outside the cache (each row's key range is clamped into the table's "
              "positions), but the result is undefined and differs by backend")),
          Host("splits", default=None, kw_only=True, doc=(
              "cut each row's keys into this many parts walked by separate programs, then "
              "merged (flash-decoding); None chooses: several on GPUs when rows are few and "
              "contexts long, 1 elsewhere")),
          Host("plan", default=None, kw_only=True, doc=(
              "from ``paged_attention_plan(block_tables, seq_lens, query_start_loc, ...)``: "
              "what every layer of a step shares, derived once instead of per call")),
          _ROUND_P, Backend()),
    outputs=(Output("out", lambda a: a.q.shape, "q", "[T, Hq, D] in q's dtype. " + _NAN_RULE),),
    run=_run_paged, check=_check_paged,
    kernels=lambda: paged_kernels() + split_kernels(),
    example=">>> o = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, qsl)",
    reference=lambda a: (_paged_reference(a),), allowance=_allowance(_paged_reference),
    samples=_paged_samples,
    bench=bench(_bench_paged, (1, 1024, 8, 2, 64), (32, 1024, 8, 2, 64)),
    cost=lambda a: (2 * int(a.seq_lens.sum()) * a.key_cache.shape[2] * a.q.shape[2] *
                    a.q.element_size(), 4 * int(a.seq_lens.sum()) * a.q.shape[1] * a.q.shape[2]),
    bad=(Bad("value_cache is key_cache", lambda c: c.with_(value_cache=c.kwargs["key_cache"]),
             ("`value_cache`", "key_cache")),
         Bad("splits of 0", lambda c: c.with_(splits=0), ("`splits`", "[1, 64]")),
         Bad("a plan that is not one", lambda c: c.with_(plan=object()), ("`plan`",))),
    vllm="paged_attention / unified attention over vLLM's KV cache blocks (decode and "
         "chunked prefill)",
)

attention = ATTENTION.op
paged_attention = PAGED_ATTENTION.op
SPECS = (ATTENTION, PAGED_ATTENTION)

