"""Split-key paged attention (flash-decoding), written once in the IR.

A decode batch has few (token, kv head) rows: 32 sequences x 8 kv heads is
256 programs, two per streaming multiprocessor of an H100, each walking its
whole context alone, too few loads in flight to fill HBM bandwidth. Here
each row's key range is cut into ``S`` splits walked by separate programs
(``attention_paged_split``), each leaving its running max, sum and
unnormalised output; a second kernel (``attention_paged_combine``) merges
the splits with the same rescaling the online softmax uses between chunks:

    M = max_s m_s,   L = sum_s l_s exp(m_s - M),   O = sum_s acc_s exp(m_s - M) / L

Same result as ``attention_paged`` up to fp32 summation order. The op picks
it (``paged_attention(..., splits=)``) for GPUs when rows are few and
contexts long; see ``choose_splits``.
"""
import functools

import torch

import kernelforge.lang as kl
from kernelforge.dispatch import kernel_factory
from .attention import paged_step

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
        # value in it varies along S, so each split's lanes are masked by its
        # own range (a walk over all positions with a per-split range let the
        # torch lowerings take the max of scores outside it)
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

#: key positions per split at least (shorter splits cost more in the combine than they gain)
MIN_SPLIT_LEN = 256
#: split counts the op uses (each a specialisation of the combine kernel)
SPLIT_COUNTS = (4, 16)


def choose_splits(rows: int, max_len: int, device: torch.device) -> int:
    """Splits per row for a GPU batch of ``rows`` (token, kv head) programs:
    enough programs to cover the card a few times over, each split at least
    MIN_SPLIT_LEN keys; 1 (no split) on other devices, where the torch
    lowerings walk the keys in one pass anyway."""
    if device.type != "cuda" or max_len < 2 * MIN_SPLIT_LEN:
        return 1
    sms = _multiprocessors(device.index)
    if rows >= 4 * sms:
        return 1
    for n in reversed(SPLIT_COUNTS):
        if max_len >= n * MIN_SPLIT_LEN:
            return n
    return 1


@functools.lru_cache(maxsize=None)
def _multiprocessors(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def all_kernels() -> tuple:
    return tuple(paged_split_kernel(c, r) for c in (False, True) for r in (False, True)) + (
        paged_combine_kernel,)
