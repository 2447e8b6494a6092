"""Sampling a token per row from logits, written once in the IR.

Per request (row): temperature (0 = greedy), top-k, top-p, min-p, and a
(seed, offset) pair that keys a counter-based generator (Philox 4x32-10,
``kernelforge.ir.lib.philox4x32``) written in the IR, so the random words are
the same on every backend bit for bit. The pipeline per row:

1. one pass: max ``m`` and ``sum(exp(x - m))`` of the raw logits (the
   log-normaliser for logprobs) and the validity of the row (no NaN, max
   finite);
2. top-k: the k-th largest logit by a radix search over order keys (f32
   bits mapped to i32 so that integer order is float order), from counts
   ``#{x >= float(c)}``: exact, no sort; every token equal to the k-th value
   is kept (ties are kept whole);
3. min-p: keep ``s >= log(min_p)`` where ``s = (x - m) / T`` (``p >= min_p * p_max``);
4. top-p: the same radix search over the masses ``sum(exp(s), key >= c)`` of
   the tokens kept so far: keep token i iff the mass of tokens with a strictly
   larger logit is < top_p of the kept mass (tie groups again kept whole);
5. Gumbel-max over the kept tokens: ``argmax(s_i - log(-log(u_i)))`` with
   ``u_i`` from Philox keyed by the seed and counted by (vocab index, offset),
   strictly inside (0, 1) in fp32 (``uniform``), so every score is finite:
   an exact draw from the renormalised kept distribution, no cumsum. Ties in
   the key go to the lower index; greedy rows take ``argmax(x)`` (lower index
   on ties).

Each search step is one pass over the row with ``2**RADIX_BITS - 1``
candidate thresholds at once, so the kernel makes ``3 + 2 * 32 / RADIX_BITS``
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

RADIX_BITS = 2          # bits of a threshold found per pass over the row (1, 2 or 4)
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


def uniform(r):
    """A u32 word to an fp32 strictly inside (0, 1): its top 23 bits ``j`` give
    ``(j + 0.5) * 2**-23``, exact in fp32 (24 significant bits), from
    ``2**-24`` to ``1 - 2**-24``. (24 bits would round ``2**24 - 0.5`` up to
    ``2**24``: u = 1, an infinite Gumbel score.)"""
    return ((r >> 9).to(kl.i32).to(kl.f32) + 0.5) * (1.0 / 8388608.0)


# -log(u) >= -log(1 - 2**-24) ~ 5.96e-8 for every u above; the floor (half of
# that) only acts where a backend's log rounds log(u) to 0 just below 1
_EXP_FLOOR = 2.0 ** -25


def gumbel(r):
    """A standard Gumbel variate ``-log(-log(u))`` from a u32 word, finite for
    every word: in [-2.82, 17.33]."""
    return -kl.log(kl.maximum(-kl.log(uniform(r)), _EXP_FLOOR))


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
            sn = s_at(n)
            v = sn + gumbel(r)
            # a kept token scores v; a filtered one, or a NaN v, scores -inf so
            # no NaN reaches a chunk's max
            kept = (xn >= t) & (sn >= lmp) & (v > float("-inf"))
            score = kl.where(greedy, xn, kl.where(kept, v, float("-inf")))
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


# -- the public ops ------------------------------------------------------------------

_I64_MAX = 2 ** 63 - 1
#: temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
SAMPLING_EPS = 1e-5
_FLT_MIN = 2.0 ** -126     # the smallest normal fp32


def _per_row(op, name, v, B, logits, kind):
    """A parameter as a [B] tensor on the logits' device: a Python number or a
    [B] (or 0-d) tensor; ``kind`` "float" or "int"."""
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            v = v.reshape(1).expand(B)
        if v.dim() != 1 or v.shape[0] != B:
            checks.fail(op, name, f"a number or a tensor of shape [{B}] (one per row of "
                        "`logits`)", f"shape {list(v.shape)}")
        checks.same_device(op, name, v, "logits", logits)
        if kind == "int" and (v.dtype.is_floating_point or v.dtype == torch.bool
                              or v.is_complex()):
            checks.fail(op, name, "an integer tensor", v.dtype)
        if kind == "float" and (v.dtype == torch.bool or v.is_complex()):
            checks.fail(op, name, "a float tensor", v.dtype)
        return v
    ok = isinstance(v, int) if kind == "int" else isinstance(v, (int, float))
    if not ok or isinstance(v, bool):
        checks.fail(op, name, f"{'an int' if kind == 'int' else 'a number'} or a [{B}] tensor",
                    repr(v))
    if kind == "int" and not -2 ** 63 <= v <= _I64_MAX:
        checks.fail(op, name, f"an int in [-2**63, 2**63) (int64) or a [{B}] tensor", repr(v))
    dtype = torch.int64 if kind == "int" else torch.float64
    return torch.full((B,), v, dtype=dtype, device=logits.device)


def _check_range(op, name, v, lo, hi, lo_open, why):
    """Every entry of ``v`` finite and in the interval (one host sync)."""
    v64 = v.double()
    bad = ~((v64 > lo) if lo_open else (v64 >= lo)) | ~(v64 <= hi) | ~torch.isfinite(v64)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        checks.fail(op, name, why, f"{float(v64[i])!r} at row {i}")


def sample(logits: torch.Tensor, *, temperature, top_k=None, top_p=None, min_p=None,
           seeds=None, offsets=None, logprobs: Optional[int] = None, validate: bool = True,
           backend: Optional[str] = None):
    """Sample one token per row of ``logits``, each row with its own parameters.

    Args:
        logits: [B, V] float32, bfloat16 or float16, the last dim contiguous.
        temperature: a number or [B], finite and >= 0. Below ``SAMPLING_EPS``
            (1e-5, vLLM's) the row is greedy (argmax, the lowest index on ties;
            filters and seed ignored). Otherwise ``1/T`` is taken in fp32 and at
            least 2**-126 (the smallest normal fp32), so a temperature above
            2**126 (whose reciprocal underflows) samples near-uniformly from
            the kept tokens.
        top_k: None, an int (any size) or int [B]; <= 0 (or >= V) keeps every
            token. Tokens equal to the k-th largest logit are all kept.
        top_p: None, a number or [B] in (0, 1]; 1 keeps every token. Keeps a
            token iff the probability of the tokens with a strictly larger
            logit is < top_p (so tie groups are kept whole). Applied after
            min_p and top_k, over their renormalised distribution (vLLM's order).
            Rounded to fp32 and at least 2**-126: a top_p that is 0 in fp32
            keeps the most likely tie group.
        min_p: None, a number or [B] in [0, 1]: keeps ``p >= min_p * p_max``.
        seeds: None, an int in [-2**63, 2**63) or int64 [B]: the generator key
            of each row (all 64 bits); None draws one per row from torch's
            global generator.
        offsets: None, an int in [-2**63, 2**63) or int64 [B] (the step number,
            say): the same (seed, offset, logits row, parameters) gives the
            same token on every backend, whatever the batch around it.
        logprobs: None, or n >= 0: also return logprobs of the raw logits
            (``log_softmax(logits)``, before temperature and filters): the
            sampled token's and the top n (ids and values; plain torch.topk).
        validate: check parameter values and rows on the host (a device sync)
            and raise ``OpArgError`` naming the argument. With False a row
            holding NaN or +inf, or all -inf, gets token -1 (logprob NaN), and
            parameters out of range give an unspecified (but in-range) token.
        backend: "eager", "inductor", "triton" or None (chosen per device).
    Returns:
        int64 [B] tokens; with ``logprobs=n`` a tuple ``(tokens,
        token_logprobs [B], top_ids int64 [B, n], top_logprobs [B, n])``.

    Example:
        >>> tok = kernelforge.ops.sample(logits, temperature=0.8, top_k=50, top_p=0.9,
        ...                              seeds=seeds, offsets=step)
    """
    op = "sample"
    checks.tensor(op, "logits", logits)
    checks.float_dtype(op, "logits", logits)
    if logits.dim() != 2:
        checks.fail(op, "logits", "a 2-D tensor [batch, vocab]", f"shape {list(logits.shape)}")
    checks.last_dim_contiguous(op, "logits", logits)
    B, V = logits.shape
    if V < 1:
        checks.fail(op, "logits", "a vocabulary of at least 1 token", f"shape {list(logits.shape)}")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= V):
        checks.fail(op, "logprobs", f"None or an int in [0, {V}]", repr(logprobs))
    if not isinstance(validate, bool):
        checks.fail(op, "validate", "a bool", repr(validate))
    t = _per_row(op, "temperature", temperature, B, logits, "float")
    if isinstance(top_k, int) and not isinstance(top_k, bool):
        top_k = max(min(top_k, _I64_MAX), 0)       # any k >= V (or <= 0) keeps every token
    k = _per_row(op, "top_k", 0 if top_k is None else top_k, B, logits, "int")
    p = _per_row(op, "top_p", 1.0 if top_p is None else top_p, B, logits, "float")
    mp = _per_row(op, "min_p", 0.0 if min_p is None else min_p, B, logits, "float")
    if seeds is None:
        seeds = torch.randint(0, _I64_MAX, (B,), device=logits.device)
    s = _per_row(op, "seeds", seeds, B, logits, "int")
    o = _per_row(op, "offsets", 0 if offsets is None else offsets, B, logits, "int")
    if not torch.compiler.is_compiling():
        registry.select(logits.device, backend)
        if validate and B:
            _check_range(op, "temperature", t, 0.0, float("inf"), False,
                         "a finite number >= 0 (0: greedy)")
            _check_range(op, "top_p", p, 0.0, 1.0, True, "a number in (0, 1]")
            _check_range(op, "min_p", mp, 0.0, 1.0, False, "a number in [0, 1]")
    tokens, tok_lp, lse = _sample_call(logits, t, k, p, mp, s, o, validate, backend)
    if logprobs is None:
        return tokens
    top = torch.topk(logits, logprobs, dim=-1)
    return tokens, tok_lp, top.indices, top.values.float() - lse[:, None]


def _sample_call(logits, t, k, p, mp, s, o, validate, backend):
    if torch.compiler.is_compiling():
        return torch.ops.kernelforge.sample(logits, t, k, p, mp, s, o, validate, backend)
    return _sample_impl(logits, t, k, p, mp, s, o, validate, backend)


def _sample_impl(logits, t, k, p, mp, s, o, validate, backend):
    B, V = logits.shape
    dev = logits.device
    if not B:
        return (torch.empty(0, dtype=torch.int64, device=dev),
                torch.empty(0, dtype=torch.float32, device=dev),
                torch.empty(0, dtype=torch.float32, device=dev))
    # per-row parameters, computed here once (the same torch ops whatever the backend)
    # greedy below SAMPLING_EPS (0 marks it); else 1/T in fp32, at least the
    # smallest normal fp32, so a huge T samples near-uniformly instead of reading as 0
    inv_temp = torch.where(t.double() < SAMPLING_EPS, 0.0,
                           (1.0 / t.to(torch.float32)).clamp_min(_FLT_MIN))
    k64 = k.to(torch.int64)
    top_k = torch.where((k64 <= 0) | (k64 > V), V, k64).to(torch.int32)
    log_min_p = torch.log(mp.to(torch.float32))               # log(0) = -inf keeps all
    # a top_p that rounds to 0 in fp32 would keep nothing: the floor keeps the top tie group
    top_p = p.to(torch.float32).clamp_min(_FLT_MIN)
    s64, o64 = s.to(torch.int64), o.to(torch.int64)
    lo32 = 0xFFFFFFFF
    (tokens, tok_lp, lse) = launch(
        sample_kernel(), logits, inv_temp, top_k, top_p, log_min_p,
        s64 & lo32, (s64 >> 32) & lo32, o64 & lo32, (o64 >> 32) & lo32,
        NewTensor((B,), torch.int64, dev), NewTensor((B,), torch.float32, dev),
        NewTensor((B,), torch.float32, dev), backend=backend)
    if validate:
        bad = (tokens < 0).nonzero()
        if bad.numel():
            i = int(bad[0])
            row = logits[i].float()
            what = ("a NaN" if bool(row.isnan().any()) else "+inf" if bool(row.isposinf().any())
                    else "only -inf")
            checks.fail("sample", "logits", "rows without NaN or +inf and with at least one "
                        "finite logit", f"row {i} holding {what}")
    return tokens, tok_lp, lse


def apply_penalties(logits: torch.Tensor, prompt_tokens: torch.Tensor,
                    output_tokens: torch.Tensor, *, repetition_penalty=1.0,
                    frequency_penalty=0.0, presence_penalty=0.0) -> torch.Tensor:
    """Repetition, frequency and presence penalties with vLLM's semantics,
    out of place, in plain torch (a scatter-add of token counts and one
    elementwise pass; no IR kernel).

    Args:
        logits: [B, V] float.
        prompt_tokens: int [B, P], each row's prompt ids padded with -1.
        output_tokens: int [B, O], each row's generated ids padded with -1.
        repetition_penalty: a number or [B], > 0 (1 disables): a token seen in
            the prompt or the output has its logit divided by it when > 0,
            multiplied by it otherwise.
        frequency_penalty: a number or [B]: subtracted times the token's count
            in the output.
        presence_penalty: a number or [B]: subtracted once if the token occurs
            in the output.
    Returns:
        the penalised logits, [B, V] in the logits' dtype (math in float32).
    """
    op = "apply_penalties"
    checks.tensor(op, "logits", logits)
    checks.float_dtype(op, "logits", logits)
    if logits.dim() != 2:
        checks.fail(op, "logits", "a 2-D tensor [batch, vocab]", f"shape {list(logits.shape)}")
    B, V = logits.shape
    counts = []
    for name, ids in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)):
        checks.tensor(op, name, ids)
        checks.same_device(op, name, ids, "logits", logits)
        if ids.dim() != 2 or ids.shape[0] != B or ids.dtype.is_floating_point \
                or ids.dtype == torch.bool:
            checks.fail(op, name, f"an integer tensor [{B}, length] padded with -1",
                        f"{ids.dtype} of shape {list(ids.shape)}")
        ids64 = ids.to(torch.int64)
        if ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids64))
            if lo < -1 or hi >= V:
                checks.fail(op, name, f"token ids in [0, {V}) or -1 (padding)",
                            f"{lo if lo < -1 else hi}")
        c = torch.zeros(B, V + 1, dtype=torch.float32, device=logits.device)
        c.scatter_add_(1, torch.where(ids64 < 0, V, ids64), torch.ones_like(ids64, dtype=c.dtype))
        counts.append(c[:, :V])
    rep = _per_row(op, "repetition_penalty", repetition_penalty, B, logits, "float")
    freq = _per_row(op, "frequency_penalty", frequency_penalty, B, logits, "float")
    pres = _per_row(op, "presence_penalty", presence_penalty, B, logits, "float")
    _check_range(op, "repetition_penalty", rep, 0.0, float("inf"), True, "a finite number > 0")
    for name, v in (("frequency_penalty", freq), ("presence_penalty", pres)):
        _check_range(op, name, v, -float("inf"), float("inf"), False, "a finite number")
    x = logits.float()
    seen = (counts[0] > 0) | (counts[1] > 0)
    r = torch.where(seen, rep.float()[:, None], 1.0)
    x = torch.where(x > 0, x / r, x * r)
    x = x - freq.float()[:, None] * counts[1] - pres.float()[:, None] * (counts[1] > 0).float()
    return x.to(logits.dtype)


# -- torch.library custom op: opaque, compile-safe entry point for engines -------------

@torch.library.custom_op("kernelforge::sample", mutates_args=())
def _sample_op(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
               offsets: torch.Tensor, validate: bool,
               backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B] tensors for every parameter; returns (tokens, token logprobs, log-normaliser)."""
    if validate and logits.shape[0]:
        for name, v, lo, hi, open_, why in (
                ("temperature", temperature, 0.0, float("inf"), False, "a finite number >= 0"),
                ("top_p", top_p, 0.0, 1.0, True, "a number in (0, 1]"),
                ("min_p", min_p, 0.0, 1.0, False, "a number in [0, 1]")):
            _check_range("sample", name, v, lo, hi, open_, why)
    return _sample_impl(logits, temperature, top_k, top_p, min_p, seeds, offsets, validate,
                        backend)


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, min_p, seeds, offsets, validate, backend):
    B = logits.shape[0]
    return (torch.empty(B, dtype=torch.int64, device=logits.device),
            torch.empty(B, dtype=torch.float32, device=logits.device),
            torch.empty(B, dtype=torch.float32, device=logits.device))
