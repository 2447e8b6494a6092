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

from . import attention_plan
from .attention_kernels import (attention_kernel, paged_attention_kernel, paged_combine_kernel,
                                paged_split_kernel)
from .attention_plan import clamp_ranges, lengths, pieces, row_ranges
from .kv_cache import distinct_caches

HEAD_SIZES = (64, 80, 96, 128, 256)


def _query_block(q: torch.Tensor, backend=None) -> int:
    """Query rows per program of the packed kernel: 128 on GPUs for 16-bit
    inputs with head size <= 128 (tensor-core tiles; 3x faster than 16 on an
    H200, docs/benchmarks.md); 16 elsewhere: fp32 or head size 256 tiles of
    128 rows overflow shared memory (327 KB asked of 232 KB for fp32, D=80),
    and the torch lowerings and the interpreter gain nothing from more. A
    backend may choose (``Backend.block_rows``: the C++ lowering's 128), cut
    to the power of two that holds all the rows (at least 16): the C++ tiles
    have a fixed row count, and a 4-token call on 128-row tiles took 208 us
    against 92 us on 16-row ones (20 tokens: 207 / 108 us on 32 rows, 50:
    206 / 139 us on 64; from 100 tokens 128 rows are as fast or faster)."""
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


def _check_round_p(op, round_p):
    if round_p is not None and not isinstance(round_p, bool):
        checks.fail(op, "round_p", "None or a bool", repr(round_p))


# -- the public ops ------------------------------------------------------------------


def _common(op, q, k, v, k_name, v_name, window, softcap, scale, causal, k_dims, k_layout):
    checks.tensor(op, "q", q)
    checks.float_dtype(op, "q", q)
    if q.dim() != 3:
        checks.fail(op, "q", "[tokens, q_heads, head_size]", list(q.shape))
    checks.last_dim_contiguous(op, "q", q)
    D = q.shape[2]
    if D not in HEAD_SIZES:
        checks.fail(op, "q", f"a head size in {HEAD_SIZES}", f"head size {D}")
    for name, x in ((k_name, k), (v_name, v)):
        checks.tensor(op, name, x)
        if x.dim() != k_dims:
            checks.fail(op, name, k_layout, list(x.shape))
        checks.same_dtype(op, name, x, "q", q)
        checks.same_device(op, name, x, "q", q)
        if x.shape[-1] != D:
            checks.fail(op, name, f"head size {D} (the last dim of `q`)", list(x.shape))
        checks.last_dim_contiguous(op, name, x)
    checks.shape(op, v_name, v, tuple(k.shape), f" (the shape of `{k_name}`)")
    hkv = k.shape[-2]
    if not hkv:
        checks.fail(op, k_name, "at least 1 kv head", list(k.shape))
    if q.shape[1] % hkv or not q.shape[1]:
        checks.fail(op, "q", f"a number of heads that is a multiple of the {hkv} kv heads",
                    f"{q.shape[1]} heads")
    attention_plan.check_mask_args(op, causal, window)
    for name, x in (("softcap", softcap), ("scale", scale)):
        if x is not None:
            checks.positive(op, name, x)
            if x == float("inf"):
                checks.fail(op, name, "a finite number > 0", repr(x))
    return D, hkv


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
              cu_seqlens_k: torch.Tensor, *, scale: Optional[float] = None, causal: bool = True,
              window: Optional[int] = None, softcap: Optional[float] = None,
              round_p: Optional[bool] = None, check_seqlens: bool = True,
              backend: Optional[str] = None) -> torch.Tensor:
    """Attention over packed variable-length sequences (FlashAttention's varlen form).

    Args:
        q: [Tq, Hq, D]; k, v: [Tk, Hkv, D], q's dtype (fp32, bf16, fp16); Hq a
            multiple of Hkv (GQA, MQA); D in (64, 80, 96, 128, 256).
        cu_seqlens_q, cu_seqlens_k: int32 [B+1], each sequence's first row
            (0, then cumulative lengths). Zero-length sequences are allowed.
        scale: score scale, default D ** -0.5.
        causal: query i of a sequence sees keys up to position
            ``k_len - q_len + i`` (aligned to the end of the keys).
        window: sliding window: keys at most ``window`` positions left of the
            query's own position (FlashAttention's ``window_size[0]``).
        softcap: scores become ``softcap * tanh(scores / softcap)``.
        round_p: for 16-bit inputs, round the softmax weights p to the
            inputs' type before p.v, as FlashAttention does (sums stay fp32):
            one 16-bit tensor-core product instead of two. Each output may
            then move by up to 2^-8 (bf16; fp16: 2^-11) of
            ``sum_j p_j |v_j| / sum_j p_j`` (docs/tolerance.md). False keeps
            p in fp32; None lets the backend choose (Triton rounds; the torch
            and C++ lowerings, which multiply in fp32 at no extra cost, do
            not).
        check_seqlens: verify both ``cu_seqlens`` on the host first (start
            at 0, never decrease, end at the token count): two
            device-to-host copies. With False the Triton and C++ lowerings
            make no host sync (the call can be captured in a CUDA graph);
            with bad offsets nothing is read or written outside the tensors
            (each row's key range is clamped into k's rows on the device),
            but the result is undefined. The torch lowerings plan their
            launches on the host and check anyway.
    Returns:
        [Tq, Hq, D] in q's dtype; rows that see no key are 0. A NaN in a
        query row or in a key or value it sees makes the row NaN; nothing
        it does not see reaches it, except that a NaN or inf value row
        reaches the rows of its launch block that do not see it
        (docs/attention.md, "NaN and inf").

    Example:
        >>> o = kernelforge.ops.attention(q, k, v, cu, cu)   # causal prefill
    """
    if torch.compiler.is_compiling():       # opaque in the caller's graph, inline or not:
        # its launch plan needs cu_seqlens on the host; checked when it runs
        return torch.ops.kernelforge.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale,
                                               causal, window, softcap, round_p, check_seqlens,
                                               backend)
    op = "attention"
    D, hkv = _common(op, q, k, v, "k", "v", window, softcap, scale, causal, 3,
                     "[tokens, kv_heads, head_size]")
    _check_round_p(op, round_p)
    if not isinstance(check_seqlens, bool):
        checks.fail(op, "check_seqlens", "a bool", repr(check_seqlens))
    decision = registry.select(q.device, backend)
    # a lowering that collapses the key loop plans its launches from the host copy
    host = check_seqlens or decision.backend.collapses_loops
    cq, cq_host = lengths(op, "cu_seqlens_q", cu_seqlens_q, q, q.shape[0], "q", host)
    ck, ck_host = lengths(op, "cu_seqlens_k", cu_seqlens_k, q, k.shape[0], "k", host)
    if cq.shape != ck.shape:
        checks.fail(op, "cu_seqlens_k", f"{cq.shape[0]} entries (as `cu_seqlens_q`)",
                    f"{ck.shape[0]}")
    T = q.shape[0]
    if not T:
        return torch.empty_like(q)
    if cq.shape[0] == 1:          # (unchecked) no sequence: no row sees a key
        return torch.zeros_like(q)
    seq, lo, hi = row_ranges(cq, cq.diff(), ck.diff(), causal, window, q.device, T)
    lo, hi = ck[seq] + lo, ck[seq] + hi
    if ck_host is None:
        # unchecked offsets may name rows outside k: each range is clamped into
        # [0, Tk] here, so no lowering reads outside k and v or walks an absurd range
        lo, hi = clamp_ranges(lo, hi, k.shape[0])
    lo, hi = lo.to(torch.int32), hi.to(torch.int32)
    G = q.shape[1] // hkv
    qg = q.view(T, hkv, G, D) if q.stride(-1) == 1 else q.reshape(T, hkv, G, D)
    kdef = attention_kernel(softcap is not None, _query_block(q, decision.backend),
                            rounds_p(round_p, q.dtype, decision.backend))
    scalars = (float(D ** -0.5 if scale is None else scale), float(softcap or 1.0))
    if not decision.backend.collapses_loops:
        (out,) = launch(kdef, qg, k, v, lo, hi, NewTensor(qg.shape, q.dtype, q.device), *scalars,
                        backend=backend)
        return out.view(T, hkv * G, D)
    # a lowering that walks every key of the launch for every row: launch per
    # block of rows over just their keys (causal skipping, no cross-sequence pairs)
    outs = []
    max_pairs = attention_plan.PIECE_BYTES // attention_plan.packed_pair_bytes(q.shape[1])
    for r0, r1, k0, k1, _, _ in pieces(cq_host, ck_host, causal, window,
                                       attention_plan.PIECE_ROWS, max_pairs):
        (o,) = launch(kdef, qg[r0:r1], k[k0:k1], v[k0:k1], lo[r0:r1] - k0, hi[r0:r1] - k0,
                      NewTensor((r1 - r0, hkv, G, D), q.dtype, q.device), *scalars,
                      backend=backend)
        outs.append(o)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(T, hkv * G, D)


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, *, scale: Optional[float] = None,
                    causal: bool = True, window: Optional[int] = None,
                    softcap: Optional[float] = None, check_tables: bool = True,
                    splits: Optional[int] = None, plan=None, round_p: Optional[bool] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Attention of new query tokens over a paged KV cache, for a batch that
    mixes decode rows (one query token) and chunked-prefill rows.

    Args:
        q: [T, Hq, D]: the batch's query tokens, sequence after sequence.
        key_cache, value_cache: [num_blocks, block_size, Hkv, D], q's dtype;
            the new tokens' keys and values already written
            (``reshape_and_cache``).
        block_tables: int32 [B, max_blocks]: block b of sequence i is
            ``block_tables[i, b]``; entries past a sequence's length are ignored.
        seq_lens: int32 [B]: each sequence's context length, new tokens included.
        query_start_loc: int32 [B+1]: each sequence's first row in q.
        scale, causal, window, softcap: as in ``attention``; the new tokens are
            the last ``q_len`` positions of the context.
        check_tables: verify block-table entries, lengths and
            ``query_start_loc`` on the host first (device-to-host copies).
            With False the call makes no host sync (it can be captured in a
            CUDA graph); with a bad table, lengths or offsets nothing is read
            outside the cache (each row's key range is clamped into the
            table's positions on the device), but the result is undefined
            and differs by backend
            (Triton reads 0 for an out-of-range block, the torch lowerings
            clamp it into the cache).
        splits: cut each row's keys into this many parts walked by separate
            programs, then merged (flash-decoding, ``kernels/attention_kernels.py``);
            None chooses: several on GPUs when rows are few and contexts long,
            1 elsewhere.
        plan: from ``paged_attention_plan(block_tables, seq_lens,
            query_start_loc, ...)``: what every layer of a step shares (each
            row's key range, the checked tables), derived once instead of per
            call (``kernels/attention_plan.py``). None derives it here.
        round_p: as in ``attention``.
    Returns:
        [T, Hq, D] in q's dtype. A NaN in a query row or in a key or value
        it sees makes the row NaN; nothing it does not see (other positions,
        sequences, unused cache slots) reaches it; a row with no visible
        key is 0 (docs/attention.md, "NaN and inf").

    Example:
        >>> o = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, qsl)
    """
    if checks.opaque():        # (a plan only saves work outside graphs: not passed on)
        return torch.ops.kernelforge.paged_attention(q, key_cache, value_cache, block_tables,
                                                     seq_lens, query_start_loc, scale, causal,
                                                     window, softcap, check_tables, round_p,
                                                     backend)
    op = "paged_attention"
    D, hkv = _common(op, q, key_cache, value_cache, "key_cache", "value_cache", window,
                     softcap, scale, causal, 4, "[num_blocks, block_size, kv_heads, head_size]")
    distinct_caches(op, key_cache, value_cache)
    _check_round_p(op, round_p)
    if not isinstance(check_tables, bool):
        checks.fail(op, "check_tables", "a bool", repr(check_tables))
    checks.no_host_check_inline(op, "check_tables", check_tables)
    if splits is not None and (not isinstance(splits, int) or isinstance(splits, bool)
                               or not 1 <= splits <= 64):
        checks.fail(op, "splits", "None or an int in [1, 64]", repr(splits))
    for name, x in (("query_start_loc", query_start_loc), ("block_tables", block_tables),
                    ("seq_lens", seq_lens)):
        checks.tensor(op, name, x)
        checks.same_device(op, name, x, "q", q)
    if plan is None:
        plan = attention_plan.build(block_tables, seq_lens, query_start_loc, causal, window,
                                    check_tables, op)
    elif not isinstance(plan, attention_plan.PagedAttentionPlan):
        checks.fail(op, "plan", "None or a PagedAttentionPlan (ops.paged_attention_plan)",
                    type(plan).__name__)
    else:
        plan.matches(op, block_tables, seq_lens, query_start_loc, causal, window, check_tables)
    T = q.shape[0]
    if plan.qsl_host is not None and plan.qsl_host[-1] != T:
        checks.fail(op, "query_start_loc", f"to end at {T} (the tokens in `q`)",
                    f"{plan.qsl_host[-1]}")
    chosen = None
    if not torch.compiler.is_compiling():        # (inline: no backend runs it)
        chosen = registry.select(q.device, backend).backend
    rp = rounds_p(round_p, q.dtype, chosen)
    nb, bs = key_cache.shape[:2]
    mb = block_tables.shape[1]
    if check_tables and plan.q_lens.shape[0] and (nb, bs) not in plan.checked:
        attention_plan.check_block_tables(op, block_tables, plan.lens, plan.q_lens, nb, bs, mb)
        plan.checked.add((nb, bs))
    if not T:
        return torch.empty_like(q)
    if not plan.q_lens.shape[0]:      # (unchecked) no sequence: no row sees a key
        return torch.zeros_like(q)
    G = q.shape[1] // hkv
    qg = q.view(T, hkv, G, D) if q.stride(-1) == 1 else q.reshape(T, hkv, G, D)
    scalars = (float(D ** -0.5 if scale is None else scale), float(softcap or 1.0))
    if splits is None:
        splits = attention_plan.choose_splits(T * hkv, mb * bs, q.device)
    f32, dev = torch.float32, q.device

    def split_parts(qp, tables, seq, lo, hi, n_keys, parts):
        """The split kernel's running max, sum and output over ``parts`` splits."""
        args = (qp, key_cache, value_cache, tables, seq, lo, hi)
        rows = qp.shape[0]
        return launch(paged_split_kernel(softcap is not None, rp), *args,
                      plan.split_length(-(-n_keys // parts), dev),
                      NewTensor((rows, hkv, parts, G), f32, dev),
                      NewTensor((rows, hkv, parts, G), f32, dev),
                      NewTensor((rows, hkv, parts, G, D), f32, dev), *scalars, backend=backend)

    def run(qp, tables, seq, lo, hi, n_keys):
        """One launch (or split + combine) over rows ``qp`` and ``n_keys`` positions."""
        if splits == 1:
            return launch(paged_attention_kernel(softcap is not None, rp), qp, key_cache,
                          value_cache, tables, seq, lo, hi, plan.context(n_keys, dev),
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


# -- torch.library custom ops: opaque, compile-safe entry points for engines ---------

@torch.library.custom_op("kernelforge::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, scale: Optional[float], causal: bool,
                  window: Optional[int], softcap: Optional[float], round_p: Optional[bool],
                  check_seqlens: bool, backend: Optional[str]) -> torch.Tensor:
    return attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, causal=causal,
                     window=window, softcap=softcap, round_p=round_p,
                     check_seqlens=check_seqlens, backend=backend)


@_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window, softcap, round_p,
      check_seqlens, backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("kernelforge::paged_attention", mutates_args=())
def _paged_op(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
              scale: Optional[float], causal: bool, window: Optional[int],
              softcap: Optional[float], check_tables: bool, round_p: Optional[bool],
              backend: Optional[str]) -> torch.Tensor:
    return paged_attention(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                           scale=scale, causal=causal, window=window, softcap=softcap,
                           check_tables=check_tables, round_p=round_p, backend=backend)


@_paged_op.register_fake
def _(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, causal, window,
      softcap, check_tables, round_p, backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
