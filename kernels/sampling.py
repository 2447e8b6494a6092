"""Sampling a token per row from logits, written once in the IR.

Per request (row): temperature (0 = greedy), top-k, top-p, min-p, and a
(seed, offset) pair that keys a counter-based generator (Philox 4x32-10,
``kernelforge.ir.lib.philox4x32``) written in the IR, so the random words are
the same on every backend bit for bit. The pipeline per row:

1. one pass: max ``m`` and ``sum(exp(x - m))`` of the raw logits (the
   log-normaliser for logprobs) and the validity of the row (no NaN, max
   finite);
2. top-k: the k-th largest logit by a radix search over the logits' order
   keys (f32 bits mapped to u32 so that unsigned order is float order), from
   counts ``#{key >= c}``: exact, no sort; every token equal to the k-th
   value is kept (ties are kept whole);
3. min-p: keep ``s >= log(min_p)`` where ``s = (x - m) / T`` (``p >= min_p * p_max``);
4. top-p: the same radix search over the masses ``sum(exp(s), key >= c)`` of
   the tokens kept so far: keep token i iff the mass of tokens with a strictly
   larger logit is < top_p of the kept mass (tie groups again kept whole);
5. Gumbel-max over the kept tokens: ``argmax(s_i - log(-log(u_i)))`` with
   ``u_i`` from Philox keyed by the seed and counted by (vocab index, offset):
   an exact draw from the renormalised kept distribution, no cumsum. Ties in
   the key go to the lower index; greedy rows take ``argmax(x)`` (lower index
   on ties).

Each search step is one pass over the row with ``2**RADIX_BITS - 1``
candidate thresholds at once, so the kernel makes ``2 + 2 * 32 / RADIX_BITS``
passes. See docs/sampling.md.
"""
import functools
from typing import Optional

import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.backends import registry
from kernelforge.dispatch import NewTensor, launch
from kernelforge.ir import lib

RADIX_BITS = 2          # bits of the threshold found per pass (1, 2, 4 or 8)
_U32_MASK = 0xFFFFFFFF


# Order keys: a float's bits as i32, negative floats with their magnitude bits
# flipped, so that signed i32 order is float order; they run from
# key(-inf) = _KEY_LO to key(+inf) = _KEY_HI (NaN keys lie outside).
_KEY_LO, _KEY_HI = -0x7F800001, 0x7F800000
_SIGN = -0x80000000


def _as_float(key):
    """An order key (i32) back to the float it orders: ``x >= _as_float(k)``
    iff ``key(x) >= k`` for every non-NaN x (-0.0 and +0.0 compare equal,
    which the search never needs to tell apart); keys past +-inf clamp to
    +-inf. Thresholds are found as keys but compared as floats, so the passes
    over a row stay in f32; only per-row values touch the integer keys."""
    key = kl.minimum(kl.maximum(key, _KEY_LO), _KEY_HI)
    return kl.where(key < 0, key ^ 0x7FFFFFFF, key).bitcast(kl.f32)


def _i32(v: int) -> int:
    """A 32-bit pattern as the i32 literal with those bits."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _threshold(x_at, weight, target, bits: int):
    """The largest order key ``k`` with ``sum(weight, x >= _as_float(k)) >=
    target``, found ``bits`` bits per pass over the row (a radix search over
    the unsigned image ``k ^ _SIGN``, most significant digit first). The sum
    is non-increasing in ``k``, so each pass sums the weights above all
    ``2**bits - 1`` candidate digits and counts those that still meet the
    target. The answer is the key of a logit of the row (the sum changes only
    there)."""
    ans = kl.zeros(kl.i32, "B")               # unsigned image, as i32 bits
    for shift in range(32 - bits, -1, -bits):
        cands = [_as_float((ans | _i32(d << shift)) ^ _SIGN) for d in range(1, 1 << bits)]

        def body(n, *acc, cands=cands):
            xn, wn = x_at(n), weight(n)
            return tuple(a + kl.sum(kl.where(xn >= c, wn, 0.0), "V") for a, c in zip(acc, cands))

        sums = kl.seq_for("V", body, init=tuple(kl.zeros(kl.f32, "B") for _ in cands))
        digit = (sums[0] >= target).to(kl.i32)
        for sm in sums[1:]:
            digit = digit + (sm >= target).to(kl.i32)
        ans = ans | (digit << shift)
    return ans ^ _SIGN


@functools.lru_cache(maxsize=None)
def sample_kernel(bits: int = RADIX_BITS) -> kl.KernelDef:
    """The sampling kernel with a radix search of ``bits`` bits per pass."""

    def sample_rows(logits: kl.In("B", "V"), inv_temp: kl.In("B"), top_k: kl.In("B"),
                    top_p: kl.In("B"), log_min_p: kl.In("B"), seed_lo: kl.In("B"),
                    seed_hi: kl.In("B"), off_lo: kl.In("B"), off_hi: kl.In("B"),
                    tokens: kl.Out("B"), token_logprob: kl.Out("B"), lse: kl.Out("B")):
        b = kl.parallel("B")

        def x_at(n):
            return kl.load(logits[b, n]).to(kl.f32)

        # 1. max and normaliser of the raw logits
        def stats(n, m_i, l_i):
            m_new, l_new, _, _ = lib.online_softmax_step(m_i, l_i, x_at(n), "V")
            return m_new, l_new

        m, l_raw = kl.seq_for("V", stats, init=(kl.full(float("-inf"), kl.f32, "B"),
                                                kl.zeros(kl.f32, "B")))
        valid = (m > float("-inf")) & (m < float("inf"))      # NaN compares False
        m_safe = kl.where(valid, m, 0.0)
        it = kl.load(inv_temp[b])
        greedy = it == 0.0
        it = kl.where(greedy, 1.0, it)
        lmp = kl.load(log_min_p[b])

        def s_at(n):
            return (x_at(n) - m_safe) * it

        # 2. top-k: the k-th largest order key (k = V keeps every token)
        t_k = _as_float(_threshold(x_at, lambda n: 1.0, kl.load(top_k[b]).to(kl.f32), bits))

        # 3. min-p, and the kept set so far
        def kept_km(n):
            return (x_at(n) >= t_k) & (s_at(n) >= lmp)

        def mass(n):
            return kl.where(kept_km(n), kl.exp(s_at(n)), 0.0)

        # 4. top-p over the mass kept so far; top_p >= 1 keeps everything
        def total(n, z):
            return z + kl.sum(mass(n), "V")

        z = kl.seq_for("V", total, init=kl.zeros(kl.f32, "B"))
        p = kl.load(top_p[b])
        t_p = _as_float(_threshold(x_at, mass, p * z, bits))
        t = kl.where(p >= 1.0, t_k, kl.maximum(t_k, t_p))

        # 5. Gumbel-max over the kept tokens
        k0, k1 = kl.load(seed_lo[b]).to(kl.u32), kl.load(seed_hi[b]).to(kl.u32)
        c2, c3 = kl.load(off_lo[b]).to(kl.u32), kl.load(off_hi[b]).to(kl.u32)

        def draw(n, best, best_i):
            xn = x_at(n)
            c0 = n.to(kl.u32)
            r, _, _, _ = lib.philox4x32(c0, c0 * 0, c2, c3, k0, k1)
            u = ((r >> 8).to(kl.i32).to(kl.f32) + 0.5) * (1.0 / 16777216.0)   # (0, 1)
            sn = s_at(n)
            kept = (xn >= t) & (sn >= lmp)
            score = kl.where(greedy, xn, kl.where(kept, sn - kl.log(-kl.log(u)),
                                                  float("-inf")))
            c_max, c_arg = kl.max(score, "V"), kl.argmax(score, "V")
            take = c_max > best
            return kl.where(take, c_max, best), kl.where(take, c_arg, best_i)

        _, tok = kl.seq_for("V", draw, init=(kl.full(float("-inf"), kl.f32, "B"),
                                             kl.zeros(kl.i32, "B")))
        lse_row = m + kl.log(l_raw)
        kl.store(tokens[b], kl.where(valid, tok.to(kl.i64), -1))
        kl.store(token_logprob[b], kl.where(valid, x_at(tok) - lse_row, float("nan")))
        kl.store(lse[b], lse_row)

    fn = sample_rows
    if bits != RADIX_BITS:
        fn.__name__ = fn.__qualname__ = f"sample_rows_r{bits}"
    ints = {n: kl.i64 for n in ("seed_lo", "seed_hi", "off_lo", "off_hi", "tokens")}
    return kl.kernel(fn, static=("V",),
                     examples=({"V": 128256}, {"V": 32000}, {"V": 151936}),
                     example_dtypes={"inv_temp": kl.f32, "top_k": kl.i32, "top_p": kl.f32,
                                     "log_min_p": kl.f32, "token_logprob": kl.f32,
                                     "lse": kl.f32, **ints})
