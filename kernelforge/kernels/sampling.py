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

import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.dispatch import NewTensor, launch
from kernelforge.ir import lib
from kernelforge.spec import Arg, Backend, Bad, Bool, Call, Host, OpSpec, Output, Tensor, bench

from . import sampling_reference

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
    if kind == "float":
        try:
            v = float(v)
        except OverflowError:
            checks.fail(op, name, f"a finite number or a [{B}] tensor", repr(v))
    dtype = torch.int64 if kind == "int" else torch.float64
    return torch.full((B,), v, dtype=dtype, device=logits.device)


def _check_range(op, name, v, lo, hi, lo_open, why):
    """Every entry of ``v`` finite and in the interval (one host sync)."""
    v64 = v.double()
    bad = ~((v64 > lo) if lo_open else (v64 >= lo)) | ~(v64 <= hi) | ~torch.isfinite(v64)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        checks.fail(op, name, why, f"{float(v64[i])!r} at row {i}")


class PerRow(Arg):
    """A per-request parameter: a number for every row or a [B] (or 0-d)
    tensor on the logits' device; the custom op takes it as a [B] tensor."""
    schema = "Tensor"

    def __init__(self, name, kind, fill, op="sample", **kw):
        super().__init__(name, kw_only=True, **kw)
        self.kind, self.fill, self.op = kind, fill, op

    def schema_text(self, index=0, mutated=False):
        return f"Tensor {self.name}"

    def check(self, op, a):
        self.tensor(a)

    def tensor(self, a) -> torch.Tensor:
        v = getattr(a, self.name)
        if v is None:
            if self.fill is None:       # seeds: one per row from torch's global generator
                return torch.randint(0, _I64_MAX, (a.logits.shape[0],), device=a.logits.device)
            v = self.fill
        if self.name == "top_k" and isinstance(v, int) and not isinstance(v, bool):
            v = max(min(v, _I64_MAX), 0)       # any k >= V (or <= 0) keeps every token
        return _per_row(self.op, self.name, v, a.logits.shape[0], a.logits, self.kind)

    def graph_value(self, a):
        return self.tensor(a)


_RANGES = (("temperature", 0.0, float("inf"), False, "a finite number >= 0 (0: greedy)"),
           ("top_p", 0.0, 1.0, True, "a number in (0, 1]"),
           ("min_p", 0.0, 1.0, False, "a number in [0, 1]"))


def _check(op, a):
    V = a.logits.shape[1]
    if V < 1:
        checks.fail(op, "logits", "a vocabulary of at least 1 token",
                    f"shape {list(a.logits.shape)}")
    if a.logprobs is not None and (not isinstance(a.logprobs, int) or
                                   isinstance(a.logprobs, bool) or not 0 <= a.logprobs <= V):
        checks.fail(op, "logprobs", f"None or an int in [0, {V}]", repr(a.logprobs))
    if a.validate and a.logits.shape[0] and not torch.compiler.is_compiling():
        for name, lo, hi, lo_open, why in _RANGES:
            _check_range(op, name, _BY_NAME[name].tensor(a), lo, hi, lo_open, why)


def _run(a):
    t, k, p, mp, s, o = (_BY_NAME[n].tensor(a) for n in _PER_ROW)
    return _sample_impl(a.logits, t, k, p, mp, s, o, a.validate, a.backend)


def _returns(a, res):
    tokens, tok_lp, lse = res
    if a.logprobs is None:
        return tokens
    top = torch.topk(a.logits, a.logprobs, dim=-1)
    return tokens, tok_lp, top.indices, top.values.float() - lse[:, None]


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


def _penalties_run(a):
    op, logits = "apply_penalties", a.logits
    B, V = logits.shape
    counts = []
    for name in ("prompt_tokens", "output_tokens"):
        ids64 = getattr(a, name).to(torch.int64)
        if ids64.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids64))
            if lo < -1 or hi >= V:
                checks.fail(op, name, f"token ids in [0, {V}) or -1 (padding)",
                            f"{lo if lo < -1 else hi}")
        c = torch.zeros(B, V + 1, dtype=torch.float32, device=logits.device)
        c.scatter_add_(1, torch.where(ids64 < 0, V, ids64), torch.ones_like(ids64, dtype=c.dtype))
        counts.append(c[:, :V])
    # the math is fp32: each penalty must be finite there, and rep > 0 once rounded
    rep, freq, pres = (_PENALTY[n].tensor(a).to(torch.float32) for n in _PENALTIES)
    _check_range(op, "repetition_penalty", rep, 0.0, float("inf"), True,
                 "a number > 0 and finite in float32 (|v| <= 3.4e38)")
    for name, v in (("frequency_penalty", freq), ("presence_penalty", pres)):
        _check_range(op, name, v, -float("inf"), float("inf"), False,
                     "a number finite in float32 (|v| <= 3.4e38)")
    x = logits.float()
    seen = (counts[0] > 0) | (counts[1] > 0)
    r = torch.where(seen, rep.float()[:, None], 1.0)
    x = torch.where(x > 0, x / r, x * r)
    x = x - freq.float()[:, None] * counts[1] - pres.float()[:, None] * (counts[1] > 0).float()
    return x.to(logits.dtype)


def _ids(op, a):
    B = a.logits.shape[0]
    for name in ("prompt_tokens", "output_tokens"):
        ids = getattr(a, name)
        if ids.dim() != 2 or ids.shape[0] != B or ids.dtype.is_floating_point \
                or ids.dtype == torch.bool:
            checks.fail(op, name, f"an integer tensor [{B}, length] padded with -1",
                        f"{ids.dtype} of shape {list(ids.shape)}")


def _penalties_reference(a):
    B = a.logits.shape[0]
    rep, freq, pres = ([float(v) for v in _PENALTY[n].tensor(a)] for n in _PENALTIES)
    out = a.logits.double().clone().cpu()
    for b in range(B):
        p_ids = [t for t in a.prompt_tokens[b].tolist() if t >= 0]
        o_ids = [t for t in a.output_tokens[b].tolist() if t >= 0]
        for v in range(out.shape[1]):
            if v in p_ids or v in o_ids:
                out[b, v] = out[b, v] / rep[b] if out[b, v] > 0 else out[b, v] * rep[b]
            c = o_ids.count(v)
            out[b, v] -= freq[b] * c + (pres[b] if c else 0.0)
    return (out,)


def _penalties_samples(st, budget):
    @st.composite
    def draw(draw):
        B = budget.force_rows if budget.force_rows is not None else draw(st.integers(0, 5))
        V = draw(st.integers(1, 40))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        dev = budget.device
        ids = [torch.randint(-1, V, (B, draw(st.integers(0, 6))), generator=g).to(dev)
               for _ in range(2)]
        kw = dict(logits=(torch.randn(B, V, generator=g) * 3).to(
            draw(st.sampled_from(budget.dtypes))).to(dev), prompt_tokens=ids[0],
            output_tokens=ids[1])
        for n, values in (("repetition_penalty", [1.0, 1.3, 0.7]),
                          ("frequency_penalty", [0.0, 0.5, -0.2]),
                          ("presence_penalty", [0.0, 0.4])):
            kw[n] = draw(st.sampled_from(values)) if draw(st.booleans()) or not B else \
                torch.tensor([draw(st.sampled_from(values)) for _ in range(B)], device=dev)
        return Call(kw, f"[{B}, {V}]")
    return draw()


_PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")
_PENALTY = {
    "repetition_penalty": PerRow("repetition_penalty", "float", 1.0, default=1.0,
                                 op="apply_penalties", doc=(
        "a number or [B], > 0 (1 disables): a token seen in the prompt or the output has "
        "its logit divided by it when > 0, multiplied by it otherwise")),
    "frequency_penalty": PerRow("frequency_penalty", "float", 0.0, default=0.0,
                                op="apply_penalties", doc=(
        "a number or [B]: subtracted times the token's count in the output")),
    "presence_penalty": PerRow("presence_penalty", "float", 0.0, default=0.0,
                               op="apply_penalties", doc=(
        "a number or [B]: subtracted once if the token occurs in the output")),
}

APPLY_PENALTIES = OpSpec(
    "apply_penalties",
    "Repetition, frequency and presence penalties with vLLM's semantics, out of\n"
    "place, in plain torch (a scatter-add of token counts and one elementwise\n"
    "pass; no IR kernel), math in float32.",
    args=(Tensor("logits", dims=2, layout="a 2-D tensor [batch, vocab]", doc="[B, V] float"),
          Tensor("prompt_tokens", dtypes=None, last_contiguous=False,
                 doc="int [B, P], each row's prompt ids padded with -1"),
          Tensor("output_tokens", dtypes=None, last_contiguous=False,
                 doc="int [B, O], each row's generated ids padded with -1"),
          *(_PENALTY[n] for n in _PENALTIES)),
    outputs=(Output("logits", lambda a: a.logits.shape, "logits",
                    "the penalised logits, [B, V] in the logits' dtype"),),
    run=_penalties_run, check=_ids, kernels=lambda: (),
    reference=_penalties_reference, samples=_penalties_samples,
    bad=(Bad("a token id past the vocabulary", lambda c: c.with_(
        output_tokens=torch.full((c.kwargs["logits"].shape[0], 1), c.kwargs["logits"].shape[1],
                                 device=c.kwargs["logits"].device)), ("`output_tokens`",)),
         Bad("repetition_penalty of 0", lambda c: c.with_(repetition_penalty=0.0),
             ("`repetition_penalty`", "> 0"))),
    vllm="apply_penalties (vLLM's sampler metadata: repetition, frequency, presence)",
)


# -- the specs -------------------------------------------------------------------------

_PER_ROW = ("temperature", "top_k", "top_p", "min_p", "seeds", "offsets")
_BY_NAME = {
    "temperature": PerRow("temperature", "float", None, doc=(
        "a number or [B], finite and >= 0. Below ``SAMPLING_EPS`` (1e-5, vLLM's) the row is "
        "greedy (argmax, the lowest index on ties; filters and seed ignored). Otherwise "
        "``1/T`` is taken in fp32 and at least 2**-126, so a temperature above 2**126 "
        "samples near-uniformly from the kept tokens")),
    "top_k": PerRow("top_k", "int", 0, default=None, doc=(
        "None, an int (any size) or int [B]; <= 0 (or >= V) keeps every token. Tokens equal "
        "to the k-th largest logit are all kept")),
    "top_p": PerRow("top_p", "float", 1.0, default=None, doc=(
        "None, a number or [B] in (0, 1]; keeps a token iff the probability of the tokens "
        "with a strictly larger logit is < top_p (tie groups whole), after min_p and top_k, "
        "over their renormalised distribution (vLLM's order); at least 2**-126 in fp32")),
    "min_p": PerRow("min_p", "float", 0.0, default=None,
                    doc="None, a number or [B] in [0, 1]: keeps ``p >= min_p * p_max``"),
    "seeds": PerRow("seeds", "int", None, default=None, doc=(
        "None, an int in [-2**63, 2**63) or int64 [B]: each row's generator key (all 64 "
        "bits); None draws one per row from torch's global generator")),
    "offsets": PerRow("offsets", "int", 0, default=None, doc=(
        "None, an int in [-2**63, 2**63) or int64 [B] (the step number, say): the same (seed, "
        "offset, logits row, parameters) gives the same token on every backend, whatever "
        "the batch around it")),
}


def _samples(st, budget):
    @st.composite
    def draw(draw):
        V = draw(budget.sizes([1000], st.integers(1, 64)))
        B = budget.force_rows if budget.force_rows is not None else \
            draw(st.integers(0, budget.rows))
        dtype = draw(st.sampled_from(budget.dtypes))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        x = torch.randn(B, V, generator=g) * draw(st.sampled_from([0.5, 3.0]))
        if draw(st.booleans()):                 # ties: quarters
            x = (x * 4).round() / 4
        kw = dict(logits=x.to(dtype).to(budget.device))

        def per_row(values):
            if draw(st.booleans()) or not B:
                return draw(st.sampled_from(values))
            picks = [draw(st.sampled_from([v for v in values if v is not None])) for _ in range(B)]
            return torch.tensor(picks, device=budget.device)
        kw["temperature"] = per_row([0.0, 1e-6, 0.5, 1.0, 2.0, 1e30])
        kw["top_k"] = per_row([None, 0, 1, 5, 2 ** 62])
        kw["top_p"] = per_row([None, 1e-30, 0.5, 0.9, 1.0])
        kw["min_p"] = per_row([None, 0.0, 0.05, 1.0])
        kw["seeds"] = per_row([0, 1, 12345, 2 ** 62, -7])
        kw["offsets"] = per_row([None, 0, 3, 2 ** 40])
        kw["logprobs"] = draw(st.sampled_from([None, 0, min(3, V)]))
        return Call(kw, f"[{B}, {V}] {dtype}")
    return draw()


def _resize(call, rows):
    kw = dict(call.kwargs)
    x = kw["logits"]
    idx = torch.arange(rows) % max(x.shape[0], 1)
    kw["logits"] = x[idx].contiguous() if x.shape[0] else \
        torch.randn(rows, x.shape[1]).to(x.dtype).to(x.device)
    for n in _PER_ROW:
        v = kw.get(n)
        if isinstance(v, torch.Tensor) and v.dim():
            kw[n] = v[idx] if v.shape[0] else v.new_zeros(rows)
    return Call(kw, call.label)


def _peer(a):
    """The sort-based sampler of vLLM's native path: temperature, top-k, top-p
    by sorting, then a multinomial draw."""
    x = a.logits.float() / 0.8
    vals, order = torch.sort(x, descending=True)
    vals[:, 50:] = -float("inf")
    p = torch.softmax(vals, -1)
    vals[(p.cumsum(-1) - p) >= 0.9] = -float("inf")
    pick = torch.multinomial(torch.softmax(vals, -1), 1)
    return order.gather(1, pick)[:, 0]


SAMPLE = OpSpec(
    "sample",
    "Sample one token per row of ``logits``, each row with its own parameters\n"
    "(temperature, top-k, top-p, min-p; seeded by a counter-based generator, so a\n"
    "row's token does not depend on the batch or the backend).",
    args=(Tensor("logits", dims=2, layout="a 2-D tensor [batch, vocab]",
                 doc="[B, V] float32, bfloat16 or float16, the last dim contiguous"),
          *(_BY_NAME[n] for n in _PER_ROW),
          Host("logprobs", default=None, kw_only=True, doc=(
              "None, or n >= 0: also return logprobs of the raw logits "
              "(``log_softmax(logits)``, before temperature and filters): the sampled "
              "token's and the top n (ids and values)")),
          Bool("validate", default=True, kw_only=True, doc=(
              "check parameter values and rows on the host (a device sync) and raise "
              "``OpArgError`` naming the argument; with False a row holding NaN or +inf, or "
              "all -inf, gets token -1 (logprob NaN) and out-of-range parameters give an "
              "unspecified (but in-range) token")),
          Backend()),
    outputs=(Output("tokens", lambda a: (a.logits.shape[0],), lambda a: torch.int64,
                    "int64 [B]; with ``logprobs=n`` a tuple ``(tokens, token_logprobs [B], "
                    "top_ids int64 [B, n], top_logprobs [B, n])``"),
             Output("token_logprob", lambda a: (a.logits.shape[0],), lambda a: torch.float32,
                    "(custom op) the sampled token's logprob"),
             Output("lse", lambda a: (a.logits.shape[0],), lambda a: torch.float32,
                    "(custom op) logsumexp of each row")),
    run=_run, check=_check, returns=_returns,
    kernels=lambda: (sample_kernel(),),
    example=">>> tok = kernelforge.ops.sample(logits, temperature=0.8, top_k=50, top_p=0.9,\n"
            "...                              seeds=seeds, offsets=step)",
    reference=sampling_reference.reference, compare=sampling_reference.compare,
    samples=_samples, resize=_resize, peer=_peer,
    bench=bench(lambda device, dtype, B, V: dict(
        logits=torch.randn(B, V, device=device).to(dtype), temperature=0.8, top_k=50, top_p=0.9,
        seeds=torch.arange(B, device=device), offsets=1), (1, 49152), (32, 128256)),
    cost=lambda a: (a.logits.numel() * a.logits.element_size() * (3 + 4 * 32 // RADIX_BITS),
                    None),
    bad=(Bad("a temperature < 0", lambda c: c.with_(temperature=-1.0),
             ("`temperature`", ">= 0")),
         Bad("top_p of 0", lambda c: c.with_(top_p=0.0), ("`top_p`", "(0, 1]")),
         Bad("min_p above 1", lambda c: c.with_(min_p=1.5), ("`min_p`", "[0, 1]")),
         Bad("a [B+1] temperature", lambda c: c.with_(temperature=torch.ones(
             c.kwargs["logits"].shape[0] + 1, device=c.kwargs["logits"].device)),
             ("`temperature`", "one per row")),
         Bad("logprobs above V", lambda c: c.with_(logprobs=c.kwargs["logits"].shape[1] + 1),
             ("`logprobs`",)),
         Bad("a seed beyond int64", lambda c: c.with_(seeds=2 ** 64), ("`seeds`", "int64"))),
    vllm="the sampler of vLLM's v1 engine (temperature, top-k, top-p, min-p, per-request seeds)",
)

sample = SAMPLE.op
apply_penalties = APPLY_PENALTIES.op
SPECS = (SAMPLE, APPLY_PENALTIES)
