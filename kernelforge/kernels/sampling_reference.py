"""The sampling op's reference, written from the documented rules in plain
Python and float64, sharing nothing with the kernel: Philox 4x32-10 on
Python ints (Salmon et al. 2011; tests check it against Random123's known
answers), the kept set from a descending sort, the Gumbel-max in float64."""
from __future__ import annotations

import math

import torch

MASK = 0xFFFFFFFF
SAMPLING_EPS = 1e-5
FLT_MIN = 2.0 ** -126


def philox_word(seed: int, offset: int, index: int) -> int:
    """The first output word of Philox 4x32-10 for the documented layout: key
    (seed low, seed high 32 bits), counter (vocabulary index, 0, offset low,
    offset high); seed and offset as int64 bit patterns."""
    k0, k1 = seed & MASK, (seed >> 32) & MASK
    c = [index, 0, offset & MASK, (offset >> 32) & MASK]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k1) & MASK,
             p0 & MASK]
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return c[0]


def gumbel(word: int) -> float:
    """The documented uniform (the word's top 23 bits, centred) and its Gumbel variate."""
    u = ((word >> 9) + 0.5) / 2 ** 23
    return -math.log(-math.log(u))


def kept(x, temperature, top_k, top_p, min_p) -> set:
    """The tokens a row may produce, from a descending sort, in float64.
    Order: temperature, min_p, top_k, top_p over the renormalised survivors;
    every token equal to the k-th largest is kept; top_p keeps a token iff
    the mass of tokens with a strictly larger logit is < top_p."""
    x = x.double()
    V = x.shape[0]
    s = (x - x.max()) / temperature
    # p >= min_p * p_max compared as logs: exp(s) rounds to 1 for tiny s (a huge
    # temperature), which would keep every token at min_p = 1
    keep = s >= math.log(min_p) if min_p > 0 else torch.ones_like(s, dtype=torch.bool)
    vals, order = torch.sort(x, descending=True)
    if 0 < top_k < V:
        keep &= x >= vals[top_k - 1]
    if top_p < 1:
        q = torch.where(keep, torch.exp(s), 0.0)
        q = q / q.sum()
        qs = q[order]
        before = torch.cumsum(qs, 0) - qs
        first = torch.ones(V, dtype=torch.bool)
        first[1:] = vals[1:] != vals[:-1]
        group_start = torch.cummax(torch.where(first, torch.arange(V), 0), 0).values
        above = torch.empty(V, dtype=torch.float64)
        above[order] = before[group_start]
        keep &= above < top_p
    return set(torch.nonzero(keep).flatten().tolist())


#: scores closer than this are left undecided: fp32 rounding may order them either way
MARGIN = 1e-3


def token(x, temperature, top_k, top_p, min_p, seed, offset) -> int:
    """The token the documented rules give for row ``x``, or -2 when the two
    best scores are within MARGIN (fp32 may pick either)."""
    x = x.double().cpu()
    if temperature < SAMPLING_EPS:
        return int(torch.argmax(x))                 # the first maximum
    inv_t = max(1.0 / temperature, FLT_MIN)
    p = max(min(top_p, 1.0), FLT_MIN)
    candidates = kept(x, 1.0 / inv_t, top_k, p, min_p) & \
        set(torch.nonzero(torch.isfinite(x)).flatten().tolist())
    m = float(x.max())
    scores = sorted(((float(x[i]) - m) * inv_t + gumbel(philox_word(seed, offset, i)), i)
                    for i in candidates)
    if len(scores) > 1 and scores[-1][0] - scores[-2][0] < MARGIN:
        return -2
    return scores[-1][1]


def reference(a):
    """(tokens, token logprobs, log-normaliser), or with ``logprobs=n`` the
    public 4-tuple; per-row parameters as numbers or [B] tensors."""
    logits = a.logits.double().cpu()
    B, V = logits.shape

    def per_row(v, default):
        v = default if v is None else v
        return v.tolist() if isinstance(v, torch.Tensor) and v.dim() else [
            (v.item() if isinstance(v, torch.Tensor) else v)] * B

    t, k, p = per_row(a.temperature, 0.0), per_row(a.top_k, 0), per_row(a.top_p, 1.0)
    mp, s, o = per_row(a.min_p, 0.0), per_row(a.seeds, 0), per_row(a.offsets, 0)
    tokens = torch.tensor([token(logits[i], t[i], k[i], p[i], mp[i], s[i], o[i])
                           for i in range(B)], dtype=torch.int64)
    lse = torch.logsumexp(logits, -1)
    lp = torch.log_softmax(logits, -1)
    tok_lp = torch.where(tokens >= 0, lp.gather(1, tokens.clamp(min=0)[:, None])[:, 0],
                         float("nan"))
    if a.logprobs is None:
        return (tokens,)
    top = torch.sort(lp, dim=-1, descending=True, stable=True)
    return tokens, tok_lp, top.indices[:, :a.logprobs], top.values[:, :a.logprobs]


def compare(a, outs, ref) -> None:
    """Tokens equal where the reference decided; log-probabilities under the
    fp32 policy (computed in fp32 from the logits as given)."""
    from kernelforge.tolerance import assert_close
    tokens, want = outs[0].cpu(), ref[0]
    decided = want != -2
    if not torch.equal(tokens[decided], want[decided]):
        bad = int((tokens[decided] != want[decided]).sum())
        raise AssertionError(f"sample: {bad} of {int(decided.sum())} decided rows drew another "
                             f"token than the reference: {tokens.tolist()} vs {want.tolist()}")
    if len(ref) > 1:
        assert_close(outs[1][decided], ref[1][decided], torch.float32, "token logprob")
        assert_close(outs[3], ref[3], torch.float32, "top logprobs")
        # ids: each must carry its reported logprob (among equal logprobs any order is right)
        lp = torch.log_softmax(a.logits.double().cpu(), -1)
        assert_close(outs[3], lp.gather(1, outs[2].cpu()), torch.float32, "top ids' logprobs")
