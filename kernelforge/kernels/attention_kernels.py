"""The attention kernels, written once in the IR (the public ops, which plan
and launch them, are in ``attention.py``; host planning in ``attention_plan.py``).

All are flash-style: one pass over the keys with an online softmax (a
carried running max, sum and accumulator, ``kl.ir.lib.online_softmax_step``).
Which keys a query row sees (causal limit, sliding window, the end of its
sequence) is one contiguous range per row, computed by the op and handed to
the kernel as ``key_lo``/``key_hi``; the key loop visits exactly that range
(``seq_for(start=, stop=)``), so masks never need to be written in the kernel.

* ``attention_kernel``: packed variable-length sequences (prefill). Programs
  own blocks of query rows of one query head; scores are a ``dot`` (tensor
  cores in Triton, a batched matmul in the torch lowerings).
* ``paged_attention_kernel``: keys and values in a paged cache read through
  a block table. One program per (query token, kv head) covers the group of
  query heads sharing that kv head, so each key and value row is read once
  per group; a decode row and a chunked-prefill row are the same program.
* ``paged_split_kernel`` + ``paged_combine_kernel`` (flash-decoding): a
  decode batch has few (token, kv head) rows (32 sequences x 8 kv heads is
  256 programs, two per streaming multiprocessor of an H100, too few loads
  in flight to fill HBM bandwidth), so each row's key range is cut into
  ``S`` splits walked by separate programs, each leaving its running max,
  sum and unnormalised output; the combine merges them with the rescaling
  the online softmax uses between chunks:

      M = max_s m_s,   L = sum_s l_s exp(m_s - M),   O = sum_s acc_s exp(m_s - M) / L

  the same result as ``attention_paged`` up to fp32 summation order.

The torch lowerings collapse the key loop into one masked pass over the
whole key axis (numerically the same softmax); Triton and C++ keep the loop.
"""
import kernelforge.lang as kl
from kernelforge.dispatch import kernel_factory
from kernelforge.ir import lib


def _cap(s, cap, softcap: bool):
    """Logit soft-capping (Gemma 2): cap * tanh(s / cap)."""
    return cap * kl.tanh(s / cap) if softcap else s


def _flash_loop(axis: str, step, lo, hi):
    """Walk keys ``[lo, hi)`` of ``axis`` carrying each (token, kv head, group
    head) row's running max, sum and output; returns the normalised output,
    0 for a row that sees no key (a causal query longer than its keys)."""
    rows = ("T", "HK", "G")
    init = (kl.full(float("-inf"), kl.f32, *rows), kl.zeros(kl.f32, *rows),
            kl.zeros(kl.f32, *rows, "D"))
    _, l_i, acc = kl.seq_for(axis, step, init=init, start=lo, stop=hi)
    # only a row with no weight is 0: a NaN sum (NaN in its query or in a key
    # or value it sees) stays NaN, as in SDPA and FlashAttention
    return kl.where(l_i == 0.0, 0.0, acc / l_i)


@kernel_factory
def attention_kernel(softcap: bool, block_q: int = 16, round_p: bool = False) -> kl.KernelDef:
    """Packed attention; ``softcap`` adds tanh capping of the scores;
    ``block_q`` query rows per program; ``round_p`` rounds the softmax
    weights to the inputs' 16-bit type before p.v (``attention(round_p=)``)."""

    def attention_packed(q: kl.In("T", "HK", "G", "D"), k: kl.In("TK", "HK", "D"),
                         v: kl.In("TK", "HK", "D"), key_lo: kl.In("T"), key_hi: kl.In("T"),
                         out: kl.Out("T", "HK", "G", "D"), scale: kl.f32, cap: kl.f32):
        # last blocks first: with causal masks later rows see more keys, and
        # the longest programs should not be the last to start
        t = kl.parallel("T", block=block_q, descending=True)
        hk, g = kl.parallel("HK"), kl.parallel("G")
        d = kl.tile("D")
        qt = kl.load(q[t, hk, g, d])
        # the softmax of qk * scale in base 2, the scale folded into the
        # exponent: exp2(qk * c - m * c), one fused multiply-add per score
        # (lib.online_softmax_step); capping needs the scaled score first
        c = lib.LOG2E if softcap else scale * lib.LOG2E

        def step(n, m_i, l_i, acc):
            # q.k in the input dtype, accumulated in fp32: the products of bf16 or
            # fp16 values are exact in fp32, so this equals casting first (and
            # runs on tensor cores)
            qk = kl.dot(qt, kl.load(k[n, hk, d]), "D")
            s = _cap(qk * scale, cap, True) if softcap else qk
            m_new, l_new, p, alpha = lib.online_softmax_step(m_i, l_i, s, "TK", log2_scale=c)
            vt = kl.load(v[n, hk, d])
            # p.v: p rounded once to v's type (FlashAttention's choice: one 16-bit
            # tensor-core product), or kept in fp32 (Triton multiplies p as hi + lo
            # halves, triton_dots.py)
            pv = kl.dot(p.to(v.dtype), vt, "TK") if round_p else kl.dot(p, vt.to(kl.f32), "TK")
            return m_new, l_new, acc * alpha + pv

        o = _flash_loop("TK", step, kl.load(key_lo[t]), kl.load(key_hi[t]))
        kl.store(out[t, hk, g, d], o.to(out.dtype))

    fn = attention_packed
    fn.__name__ = fn.__qualname__ = ("attention_packed" + ("_softcap" if softcap else "")
                                     + ("" if block_q == 16 else f"_q{block_q}")
                                     + ("_p16" if round_p else ""))
    return kl.kernel(fn, static=("HK", "G", "D"),
                     examples=({"HK": 8, "G": 4, "D": 128}, {"HK": 8, "G": 1, "D": 64}),
                     example_dtypes={"key_lo": kl.i32, "key_hi": kl.i32})


@kernel_factory
def attention_decode_kernel(softcap: bool, round_p: bool = False) -> kl.KernelDef:
    """Packed attention for a few query rows (decode: one row per sequence):
    one program per (query row, kv head) over the group of query heads that
    share it, as ``paged_attention_kernel`` without the block table, so a row
    is not padded to a tile of query rows. ``softcap`` and ``round_p`` as in
    ``attention_kernel``."""

    def attention_decode(q: kl.In("T", "HK", "G", "D"), k: kl.In("TK", "HK", "D"),
                         v: kl.In("TK", "HK", "D"), key_lo: kl.In("T"), key_hi: kl.In("T"),
                         out: kl.Out("T", "HK", "G", "D"), scale: kl.f32, cap: kl.f32):
        t, hk = kl.parallel("T"), kl.parallel("HK")
        g, d = kl.tile("G"), kl.tile("D")
        qv = kl.load(q[t, hk, g, d]).to(kl.f32)

        def step(n, m_i, l_i, acc):
            kn = kl.load(k[n, hk, d]).to(kl.f32)
            s = _cap(kl.sum(qv * kn, "D") * scale, cap, softcap)           # [G, TK]
            m_new, l_new, p, alpha = lib.online_softmax_step(m_i, l_i, s, "TK")
            vn = kl.load(v[n, hk, d]).to(kl.f32)
            if round_p:
                p = p.to(v.dtype).to(kl.f32)
            return m_new, l_new, acc * alpha + kl.sum(p * vn, "TK")        # [G, D]

        o = _flash_loop("TK", step, kl.load(key_lo[t]), kl.load(key_hi[t]))
        kl.store(out[t, hk, g, d], o.to(out.dtype))

    fn = attention_decode
    fn.__name__ = fn.__qualname__ = ("attention_decode" + ("_softcap" if softcap else "")
                                     + ("_p16" if round_p else ""))
    return kl.kernel(fn, static=("HK", "G", "D"),
                     examples=({"HK": 8, "G": 4, "D": 128}, {"HK": 8, "G": 1, "D": 64}),
                     example_dtypes={"key_lo": kl.i32, "key_hi": kl.i32})


def paged_step(q, key_cache, value_cache, block_tables, seq_idx, t, hk, scale, cap, softcap,
               round_p=False, axis="N", offset=None):
    """The online-softmax step over the keys of token ``t``'s sequence, read
    through its block table, for the group of query heads of kv head ``hk``
    (shared by the paged kernel and its split-key form). The loop walks
    ``axis``; its index plus ``offset`` (None: 0) is the key position.
    ``round_p`` rounds p to the cache's 16-bit type before p.v."""
    g, d = kl.tile("G"), kl.tile("D")
    b = kl.load(seq_idx[t])
    qv = kl.load(q[t, hk, g, d]).to(kl.f32)
    block_size = kl.size("BS")

    def step(n, m_i, l_i, acc):
        pos = n if offset is None else n + offset
        block = kl.load(block_tables[b, pos // block_size])
        row = pos % block_size
        kn = kl.load(key_cache[block, row, hk, d]).to(kl.f32)
        s = _cap(kl.sum(qv * kn, "D") * scale, cap, softcap)           # [G, N]
        m_new, l_new, p, alpha = lib.online_softmax_step(m_i, l_i, s, axis)
        vn = kl.load(value_cache[block, row, hk, d]).to(kl.f32)
        if round_p:
            p = p.to(value_cache.dtype).to(kl.f32)
        return m_new, l_new, acc * alpha + kl.sum(p * vn, axis)          # [G, D]

    return step


@kernel_factory
def paged_attention_kernel(softcap: bool, round_p: bool = False) -> kl.KernelDef:
    """Attention over a paged cache; ``softcap`` adds tanh capping; ``round_p``
    rounds p to the cache's 16-bit type before p.v."""

    def attention_paged(q: kl.In("T", "HK", "G", "D"),
                        key_cache: kl.In("NB", "BS", "HK", "D"),
                        value_cache: kl.In("NB", "BS", "HK", "D"),
                        block_tables: kl.In("B", "MB"), seq_idx: kl.In("T"),
                        key_lo: kl.In("T"), key_hi: kl.In("T"),
                        context: kl.In("N"),      # only its length is read: MB * BS positions
                        out: kl.Out("T", "HK", "G", "D"), scale: kl.f32, cap: kl.f32):
        t, hk = kl.parallel("T"), kl.parallel("HK")
        step = paged_step(q, key_cache, value_cache, block_tables, seq_idx, t, hk, scale, cap,
                          softcap, round_p)
        o = _flash_loop("N", step, kl.load(key_lo[t]), kl.load(key_hi[t]))
        g, d = kl.tile("G"), kl.tile("D")
        kl.store(out[t, hk, g, d], o.to(out.dtype))

    fn = attention_paged
    fn.__name__ = fn.__qualname__ = ("attention_paged" + ("_softcap" if softcap else "")
                                     + ("_p16" if round_p else ""))
    return kl.kernel(fn, static=("HK", "G", "D", "BS"),
                     examples=({"HK": 8, "G": 4, "D": 128, "BS": 16},
                               {"HK": 8, "G": 1, "D": 64, "BS": 32}),
                     example_dtypes={"block_tables": kl.i32, "seq_idx": kl.i32,
                                     "key_lo": kl.i32, "key_hi": kl.i32, "context": kl.i32})


ROWS = ("T", "HK", "S", "G")


@kernel_factory
def paged_split_kernel(softcap: bool, round_p: bool = False) -> kl.KernelDef:
    """Partial attention over split ``s`` of each row's keys: keys
    ``[lo + s * L, min(hi, lo + (s + 1) * L))`` with ``L`` the length of
    ``split`` (the split length); ``round_p`` as in ``paged_attention_kernel``."""

    def attention_paged_split(q: kl.In("T", "HK", "G", "D"),
                              key_cache: kl.In("NB", "BS", "HK", "D"),
                              value_cache: kl.In("NB", "BS", "HK", "D"),
                              block_tables: kl.In("B", "MB"), seq_idx: kl.In("T"),
                              key_lo: kl.In("T"), key_hi: kl.In("T"),
                              split: kl.In("L"),     # only its length is read: keys per split
                              m_out: kl.Out("T", "HK", "S", "G"),
                              l_out: kl.Out("T", "HK", "S", "G"),
                              acc_out: kl.Out("T", "HK", "S", "G", "D"),
                              scale: kl.f32, cap: kl.f32):
        t, hk, s = kl.parallel("T"), kl.parallel("HK"), kl.parallel("S")
        hi = kl.load(key_hi[t])
        start = kl.minimum(kl.load(key_lo[t]) + s * kl.size("L"), hi)
        count = kl.minimum(hi - start, kl.size("L"))
        # the loop walks the split's own keys (start + j, j < count): every
        # value in it varies along S, so every lowering masks each split by its
        # own range (the torch printer masks a reduction only by a range over
        # the reduced value's own axes)
        step = paged_step(q, key_cache, value_cache, block_tables, seq_idx, t, hk, scale, cap,
                          softcap, round_p, axis="L", offset=start)
        g, d = kl.tile("G"), kl.tile("D")
        init = (kl.full(float("-inf"), kl.f32, *ROWS), kl.zeros(kl.f32, *ROWS),
                kl.zeros(kl.f32, *ROWS, "D"))
        m_i, l_i, acc = kl.seq_for("L", step, init=init, stop=count)
        kl.store(m_out[t, hk, s, g], m_i)
        kl.store(l_out[t, hk, s, g], l_i)
        kl.store(acc_out[t, hk, s, g, d], acc)

    fn = attention_paged_split
    fn.__name__ = fn.__qualname__ = ("attention_paged_split" + ("_softcap" if softcap else "")
                                     + ("_p16" if round_p else ""))
    # S static: it sizes only outputs, which Inductor allocates itself
    return kl.kernel(fn, static=("HK", "G", "D", "BS", "S"),
                     examples=({"HK": 8, "G": 4, "D": 128, "BS": 16, "S": 16},
                               {"HK": 8, "G": 1, "D": 64, "BS": 32, "S": 4}),
                     example_dtypes={"block_tables": kl.i32, "seq_idx": kl.i32,
                                     "key_lo": kl.i32, "key_hi": kl.i32, "split": kl.i32,
                                     "m_out": kl.f32, "l_out": kl.f32, "acc_out": kl.f32})


def _combine(m_in: kl.In("T", "HK", "S", "G"), l_in: kl.In("T", "HK", "S", "G"),
             acc_in: kl.In("T", "HK", "S", "G", "D"), out: kl.Out("T", "HK", "G", "D")):
    t, hk = kl.parallel("T"), kl.parallel("HK")
    s, g, d = kl.tile("S"), kl.tile("G"), kl.tile("D")
    m = kl.load(m_in[t, hk, s, g])                                  # [S, G]
    m_max = kl.max(m, "S")                                          # [G]
    # a split that saw no key has m = -inf (weight 0); a row that saw none, all -inf
    w = kl.exp(m - kl.where(m_max == float("-inf"), 0.0, m_max))   # [S, G]
    l_sum = kl.sum(kl.load(l_in[t, hk, s, g]) * w, "S")
    acc = kl.sum(kl.load(acc_in[t, hk, s, g, d]) * w, "S")         # [G, D]
    # 0 only for a row with no weight: NaN stays NaN (as _flash_loop)
    kl.store(out[t, hk, g, d], kl.where(l_sum == 0.0, 0.0, acc / l_sum).to(out.dtype))


_combine.__name__ = _combine.__qualname__ = "attention_paged_combine"
paged_combine_kernel = kl.kernel(_combine, static=("HK", "S", "G", "D"),
                                 examples=({"HK": 8, "S": 16, "G": 4, "D": 128},
                                           {"HK": 8, "S": 4, "G": 1, "D": 64}),
                                 example_dtypes={"m_in": kl.f32, "l_in": kl.f32,
                                                 "acc_in": kl.f32})

def packed_kernels() -> tuple:
    """What ``attention`` launches on GPUs (16 or 128 query rows, p kept or
    rounded, with and without softcap; the decode form for calls of at most
    one query row per sequence): ``kernelforge ops``, ``show`` and
    ``aot-check`` list these. The C++ lowering also builds 32- and 64-row
    forms on the host (``attention._query_block``)."""
    both = (False, True)
    return tuple(attention_kernel(c, b, r) for b in (16, 128) for c in both for r in both) + \
        tuple(attention_decode_kernel(c, r) for c in both for r in both)


def paged_kernels() -> tuple:
    """What ``paged_attention`` launches without splits."""
    both = (False, True)
    return tuple(paged_attention_kernel(c, r) for c in both for r in both)


def split_kernels() -> tuple:
    """What ``paged_attention`` launches with splits: the split forms and the combine."""
    both = (False, True)
    return tuple(paged_split_kernel(c, r) for c in both for r in both) + (paged_combine_kernel,)
