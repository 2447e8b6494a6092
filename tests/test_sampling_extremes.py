"""Sampling at the fp32 edges: the Philox word whose uniform used to round to
1.0, parameters whose fp32 images are 0 or inf (temperature 1e-40 and 1e300,
top_p 1e-50), min_p tiny, top_k and seeds/offsets at the int64 limits, rows
with one finite logit, a vocabulary of 1. Every expected token comes from an
independent Philox 4x32-10 in Python integers and float64 Gumbel scores, and
every case runs on every backend."""
import math

import numpy as np
import pytest
import torch

import kernelforge
import kernelforge.lang as kl
from kernelforge.checks import OpArgError
from kernelforge.kernels import sampling, sampling_reference
from conftest import BACKENDS, DEVICE
from test_sampling import kept_reference

ops = kernelforge.ops
V = 1000        # the vocabulary of tests/test_sampling.py's Inductor graph: one compile
MASK = 0xFFFFFFFF


# -- an independent Philox 4x32-10 and the documented draw -----------------------------

philox_word = sampling_reference.philox_word


def philox_words_np(seed: int, offsets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """philox_word over a grid of offsets (column) x indices (row), in NumPy
    uint64 (the 32x32 products fit): for searching many words at once."""
    m = np.uint64(MASK)
    k0, k1 = np.uint64(seed & MASK), np.uint64((seed >> 32) & MASK)
    c0, c2 = np.broadcast_arrays(indices[None, :].astype(np.uint64),
                                 (offsets[:, None].astype(np.uint64) & m))
    c1 = np.zeros_like(c0)
    c3 = (offsets[:, None].astype(np.uint64) >> np.uint64(32)) + c1
    for _ in range(10):
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0), p1 & m, \
            ((p0 >> np.uint64(32)) ^ c3 ^ k1), p0 & m
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m, (k1 + np.uint64(0xBB67AE85)) & m
    return c0


def search_extreme_words(seeds=range(16), offsets=4096, top=0xFFFFFF00):
    """(seed, offset, index < V) whose word is >= ``top``: one word in 2**24,
    so ~17M words per hit (about 15 s here). Run this file as a script to
    repeat the search that gave EXTREME."""
    idx = np.arange(V)
    for seed in seeds:
        r = philox_words_np(seed, np.arange(offsets), idx)
        for o, i in np.argwhere(r >= top):
            yield seed, int(o), int(i)


# found by search_extreme_words(): each word is >= 0xFFFFFF00 (checked below)
EXTREME = [(2, 1937, 513), (3, 2800, 962)]


gumbel64 = sampling_reference.gumbel


def expected_token(x, temperature, top_k, top_p, min_p, seed, offset):
    """The token the documented rules give for row ``x``: greedy below 1e-5;
    else 1/T at least 2**-126 and the Gumbel-max over the kept set of
    kept_reference, in float64. Asserts the best score is clear of the next
    by 1e-3, so fp32 rounding cannot decide it."""
    x = x.double().cpu()
    if temperature < 1e-5:
        return int(torch.argmax(x))                 # the first maximum
    inv_t = max(1.0 / temperature, 2.0 ** -126)
    t_eff = 1.0 / inv_t
    finite = torch.isfinite(x)
    kept = kept_reference(x, t_eff, top_k, top_p, min_p) & set(torch.nonzero(finite)
                                                                .flatten().tolist())
    m = float(x.max())
    scores = sorted(((float(x[i]) - m) * inv_t + gumbel64(philox_word(seed, offset, i)), i)
                    for i in kept)
    if len(scores) > 1:
        assert scores[-1][0] - scores[-2][0] > 1e-3, "ambiguous case: pick another seed"
    return scores[-1][1]


def test_reference_philox_matches_known_answer():
    """Philox4x32-10 known-answer vectors from Random123's kat_vectors
    (counter, key -> first word), so the reference itself is checked."""
    def first(ctr, key):
        k0, k1 = key
        c = list(ctr)
        for _ in range(10):
            p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
            c = [((p1 >> 32) ^ c[1] ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k1) & MASK,
                 p0 & MASK]
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        return c
    assert first([0, 0, 0, 0], [0, 0]) == [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    assert first([MASK] * 4, [MASK] * 2) == [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    assert first([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                 [0xa4093822, 0x299f31d0]) == [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    # the layout helper and the vectorised search agree with it
    assert philox_word(-1, -1, MASK) == first([MASK, 0, MASK, MASK], [MASK, MASK])[0]
    grid = philox_words_np(5, np.array([0, 7, 2 ** 40 + 3]), np.array([0, 1, 999]))
    assert grid.tolist() == [[philox_word(5, o, i) for i in (0, 1, 999)]
                             for o in (0, 7, 2 ** 40 + 3)]


def test_extreme_words_are_extreme():
    """The words the tests below plant a token on: the old uniform,
    ``((r >> 8) + 0.5) * 2**-24`` in fp32, is exactly 1.0 there."""
    for seed, offset, i in EXTREME:
        r = philox_word(seed, offset, i)
        assert r >= 0xFFFFFF00
        old = (np.float32(r >> 8) + np.float32(0.5)) * np.float32(2.0 ** -24)
        assert old == np.float32(1.0)
        assert 0.0 < ((r >> 9) + 0.5) / 2 ** 23 < 1.0


# -- the uniform and the Gumbel variate on every backend, word by word --------------------

@kl.kernel()
def _gumbel_of_words(words: kl.In("M"), u: kl.Out("M"), g: kl.Out("M")):
    m = kl.parallel("M", block=1024)
    r = kl.load(words[m]).to(kl.u32)
    kl.store(u[m], sampling.uniform(r))
    kl.store(g[m], sampling.gumbel(r))


def _check_words(words: torch.Tensor, backend: str):
    u = torch.empty(words.shape, dtype=torch.float32, device=DEVICE)
    g = torch.empty_like(u)
    kernelforge.launch(_gumbel_of_words, words.to(DEVICE), u, g, backend=backend)
    u, g = u.cpu().double(), g.cpu().double()
    j = (words >> 9).double()
    assert bool(((u > 0) & (u < 1)).all()), f"u outside (0, 1): {u[(u <= 0) | (u >= 1)][:4]}"
    assert torch.equal(u, (j + 0.5) / 2 ** 23)          # exact in fp32
    assert bool(torch.isfinite(g).all())
    want = -torch.log(-torch.log((j + 0.5) / 2 ** 23))
    torch.testing.assert_close(g, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_inside_open_interval_at_extreme_words(backend):
    """Every word in [0, 2**16) and [2**32 - 2**16, 2**32): the uniform is in
    (0, 1) in fp32, exactly (j + 0.5) / 2**23, and the Gumbel variate finite."""
    lo = torch.arange(0, 2 ** 16, dtype=torch.int64)
    words = torch.cat([lo, lo + (2 ** 32 - 2 ** 16)])
    _check_words(words, backend)


@pytest.mark.parametrize("backend", [b for b in ("eager", "cpp") if b in BACKENDS])
def test_uniform_inside_open_interval_for_every_word(backend):
    """The uniform reads only the top 23 bits, so one word per value of them
    (low 9 bits varied) covers all 2**32 words."""
    j = torch.arange(0, 2 ** 23, dtype=torch.int64)
    _check_words((j << 9) | (j * 37 & 511), backend)


# -- the draw at the extreme words ------------------------------------------------------

def _rows_at(i, j_other):
    """Rows of zeros with an unlikely or filtered token at ``i``, each with the
    top_k it is drawn under."""
    rows, ks = [], []
    x = torch.zeros(V)
    x[i] = -1e4                                  # finite, ~e^-10000 of a zero token
    rows.append(x), ks.append(0)
    x = torch.zeros(V)
    x[i] = float("-inf")                         # kept by the masks: -inf >= -inf
    rows.append(x), ks.append(0)
    x = torch.zeros(V)
    x[i] = x[j_other] = float("-inf")            # the V-1-th largest is -inf: kept by top_k
    rows.append(x), ks.append(V - 1)
    x = torch.zeros(V)
    x[i] = float("-inf")                         # filtered by top_k
    rows.append(x), ks.append(10)
    return rows, ks


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_on_extreme_word_is_never_drawn(backend):
    """A word >= 0xFFFFFF00 under a -1e4 or -inf logit: the old uniform was 1.0,
    its Gumbel score +inf (the -1e4 token won) or NaN (-inf + inf: the row fell
    back to token 0). The token drawn is the float64 Gumbel-max of the others."""
    for seed, offset, i in EXTREME:
        rows, ks = _rows_at(i, (i + 1) % V)
        x = torch.stack(rows)
        tok = ops.sample(x.to(DEVICE), temperature=1.0, top_k=torch.tensor(ks).to(DEVICE),
                         seeds=seed, offsets=offset, backend=backend).cpu()
        want = [expected_token(r, 1.0, k, 1.0, 0.0, seed, offset) for r, k in zip(rows, ks)]
        assert i not in want
        assert tok.tolist() == want, (seed, offset, i)


# -- extreme parameters -----------------------------------------------------------------

def _random_rows(B, g, ties=True):
    x = torch.randn(B, V, generator=g) * 2
    if ties:                                      # a tie at the maximum in every row
        top = x.argmax(-1)
        x[torch.arange(B), (top + 7) % V] = x[torch.arange(B), top]
    return x


def _top_group(x):
    """Per row, the indices holding the row's maximum."""
    return [set(torch.nonzero(r == r.max()).flatten().tolist()) for r in x]


def _check(x, backend, temperature, top_k=0, top_p=1.0, min_p=0.0, seeds=None, offsets=0,
           param_dtype=torch.float64):
    """Sample ``x`` on ``backend`` and compare every row with expected_token."""
    B = x.shape[0]
    seeds = list(range(100, 100 + B)) if seeds is None else seeds
    dev = DEVICE

    def col(v, dtype=param_dtype):
        return torch.tensor(v if isinstance(v, list) else [v] * B, dtype=dtype).to(dev)

    tok = ops.sample(x.to(dev), temperature=col(temperature), top_k=col(top_k, torch.int64),
                     top_p=col(top_p), min_p=col(min_p), seeds=col(seeds, torch.int64),
                     offsets=col(offsets, torch.int64), backend=backend).cpu()

    def at(v, b):
        return v[b] if isinstance(v, list) else v
    want = [expected_token(x[b], float(col(temperature)[b]), at(top_k, b),
                           float(col(top_p)[b]), float(col(min_p)[b]), at(seeds, b),
                           at(offsets, b)) for b in range(B)]
    assert tok.tolist() == want
    return tok


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperatures_are_greedy(backend):
    """1e-40 (1/T is inf in fp32: every row fell back to token 0), 1e-6 and
    9.9e-6 are below SAMPLING_EPS = 1e-5: argmax, the first of the tied
    maximum, whatever the filters and seeds."""
    g = torch.Generator().manual_seed(1)
    x = _random_rows(6, g)
    for t in (1e-40, 1e-6, 9.9e-6):
        tok = _check(x, backend, t, top_k=5, top_p=0.3)
        assert tok.tolist() == x.argmax(-1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_at_eps_samples(backend):
    """T = 1e-5 samples: the two tied maximum tokens of each row are both
    drawn over the seeds (greedy would always give the first)."""
    g = torch.Generator().manual_seed(2)
    x = _random_rows(1, g).expand(16, -1).contiguous()
    tok = _check(x, backend, 1e-5)
    assert set(tok.tolist()) == _top_group(x)[0] and len(_top_group(x)[0]) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1e300, 1e39, 2.0 ** 127])
def test_huge_temperature_samples_near_uniformly(backend, t):
    """1/T underflows fp32 (1e300: 0, which the kernel read as greedy) or is
    subnormal: it is taken as 2**-126, so the scores are the Gumbel variates
    alone and the token is the kept token with the largest word."""
    g = torch.Generator().manual_seed(3)
    x = _random_rows(12, g, ties=False) * 10
    tok = _check(x, backend, t, top_k=[0, 0, 0, 0, 5, 5, 5, 5, 40, 40, 40, 40],
                 top_p=[1.0] * 8 + [0.5] * 4)
    assert tok.tolist() != x.argmax(-1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p, dtype", [(1e-50, torch.float64), (1e-45, torch.float32),
                                      (2.0 ** -126, torch.float32)])
def test_tiny_top_p_keeps_the_top_tie_group(backend, p, dtype):
    """top_p 1e-50 is 0 in fp32 (the row kept nothing: token 0), 1e-45 is
    subnormal: clamped to 2**-126, they keep the most likely tie group, here
    the two tied maximum tokens."""
    g = torch.Generator().manual_seed(4)
    x = _random_rows(10, g)
    tok = _check(x, backend, 1.0, top_p=p, param_dtype=dtype)
    assert all(int(t) in grp for t, grp in zip(tok, _top_group(x)))
    assert tok.tolist() != x.argmax(-1).tolist()      # both of the tie group are drawn


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_and_full_min_p(backend):
    """min_p 1e-50 (0 in fp32) and 1e-40 (subnormal) filter nothing drawable:
    the tokens of min_p = 0; min_p = 1 keeps the tied maximum only."""
    g = torch.Generator().manual_seed(5)
    x = _random_rows(8, g)
    base = _check(x, backend, 1.5)
    for mp in (1e-50, 1e-40):
        assert torch.equal(_check(x, backend, 1.5, min_p=mp), base)
    tok = _check(x, backend, 1.5, min_p=1.0)
    assert all(int(t) in grp for t, grp in zip(tok, _top_group(x)))
    assert tok.tolist() != x.argmax(-1).tolist()


# -- int64 limits -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_at_int64_limits(backend):
    """top_k 2**63-1, -2**63 (tensors) and 2**64, -2**70 (Python ints, which
    overflowed building the tensor) all keep every token: the tokens of top_k=0."""
    g = torch.Generator().manual_seed(6)
    x = _random_rows(4, g, ties=False).to(DEVICE)
    kw = dict(temperature=2.0, seeds=torch.arange(4).to(DEVICE), offsets=9, backend=backend)
    base = ops.sample(x, top_k=0, **kw)
    assert base.cpu().tolist() == [expected_token(x[b], 2.0, 0, 1.0, 0.0, b, 9)
                                   for b in range(4)]
    for k in (torch.tensor([2 ** 63 - 1, -2 ** 63, 2 ** 63 - 1, -1]).to(DEVICE), 2 ** 64,
              -2 ** 70, 2 ** 63 - 1, V, V + 1):
        assert torch.equal(ops.sample(x, top_k=k, **kw), base), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_and_offsets_at_int64_limits(backend):
    """The key and counter take all 64 bits of seeds and offsets: at 2**63-1,
    -2**63 and -1 the token is the independent Philox's."""
    g = torch.Generator().manual_seed(7)
    lim = [2 ** 63 - 1, -2 ** 63, -1, 2 ** 32]
    seeds = [s for s in lim for _ in lim]
    offsets = [o for _ in lim for o in lim]
    x = (torch.randn(1, V, generator=g) * 0.5).expand(len(seeds), -1).contiguous()
    tok = _check(x, backend, 1.0, seeds=seeds, offsets=offsets)
    assert len(set(tok.tolist())) > len(seeds) // 2          # the pairs draw apart
    one = ops.sample(x[:1].to(DEVICE), temperature=1.0, seeds=2 ** 63 - 1, offsets=-2 ** 63,
                     backend=backend)                         # Python ints: the same bits
    assert int(one) == int(tok[1])                            # seeds[1], offsets[1]


@pytest.mark.parametrize("name, v", [("seeds", 2 ** 63), ("seeds", -2 ** 63 - 1),
                                     ("offsets", 2 ** 64)])
def test_seeds_and_offsets_beyond_int64_name_the_argument(name, v):
    with pytest.raises(OpArgError, match=f"`{name}` expected an int in \\[-2\\*\\*63, 2\\*\\*63\\)"):
        ops.sample(torch.zeros(2, 5), temperature=1.0, backend="eager", **{name: v})


# -- degenerate rows -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_one_finite_logit_is_always_drawn(backend):
    """Rows of -inf but one token: it is drawn under any parameters, and its
    logprob is 0. The first row sits on an extreme word (seed 2, offset 1937,
    index 513), which made the -inf token's score NaN and gave token 0."""
    seed, offset, i = EXTREME[0]
    params = [(t, k, p, mp) for t in (1.0, 1e300, 1e-40, 0.0) for k, p, mp in
              ((0, 1.0, 0.0), (3, 0.5, 0.9), (V - 1, 1e-50, 1.0))]
    B = len(params)
    x = torch.full((B, V), float("-inf"))
    where = torch.tensor([700 + b for b in range(B)])
    x[torch.arange(B), where] = torch.linspace(-50, 50, B)
    col = [torch.tensor([p[c] for p in params], dtype=torch.float64) for c in range(4)]
    tok, lp, _, _ = ops.sample(x.to(DEVICE), temperature=col[0].to(DEVICE),
                               top_k=col[1].long().to(DEVICE), top_p=col[2].to(DEVICE),
                               min_p=col[3].to(DEVICE), seeds=seed, offsets=offset,
                               logprobs=0, backend=backend)
    assert philox_word(seed, offset, i) >= 0xFFFFFF00 and x[0, i] == float("-inf")
    assert tok.cpu().tolist() == where.tolist()
    assert torch.equal(lp.cpu(), torch.zeros(B))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_of_one(backend):
    params = [(1.0, 0, 1.0, 0.0), (1e300, 5, 1e-50, 1.0), (1e-40, -1, 0.5, 0.5),
              (0.0, 1, 1.0, 0.0)]
    for x0 in (0.0, -1e30, 3e38):
        x = torch.full((len(params), 1), x0)
        col = [torch.tensor([p[c] for p in params], dtype=torch.float64).to(DEVICE)
               for c in range(4)]
        tok, lp, ids, top = ops.sample(x.to(DEVICE), temperature=col[0], top_k=col[1].long(),
                                       top_p=col[2], min_p=col[3],
                                       seeds=torch.arange(4).to(DEVICE) + -2 ** 63,
                                       logprobs=1, backend=backend)
        assert tok.cpu().tolist() == [0] * 4
        assert torch.equal(lp.cpu(), torch.zeros(4)) and torch.equal(top.cpu(), torch.zeros(4, 1))


# -- the runtime follows the op's rules ---------------------------------------------------

def test_runtime_greedy_rule_is_the_ops():
    from kernelforge.runtime import SamplingParams
    assert sampling.SAMPLING_EPS == 1e-5
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-40).greedy
    assert SamplingParams(temperature=9.99e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    assert not SamplingParams(temperature=1e300).greedy


def test_runtime_sampler_at_fp32_edges():
    """SamplingParams accepts top_p=1e-50 and top_k=2**64; the sampler built
    fp32 / int64 tensors from them (top_p 0, which the op rejected; top_k
    overflowed). Each row now gives the op's token, by the independent rules."""
    from kernelforge.runtime import SamplingParams
    from kernelforge.runtime.sampler import sample as runtime_sample
    from kernelforge.runtime.sequence import Sequence
    params = [SamplingParams(temperature=1e-6, seed=11), SamplingParams(top_p=1e-50, seed=12),
              SamplingParams(temperature=1e300, top_k=2 ** 64, seed=13),
              SamplingParams(temperature=0.7, min_p=1e-50, top_k=-2 ** 70, seed=14)]
    seqs = [Sequence([1, 2, 3], p) for p in params]
    for i, s in enumerate(seqs):
        s.output_ids = list(range(i))             # offsets 0..3
    g = torch.Generator().manual_seed(8)
    x = _random_rows(4, g)
    got = runtime_sample(x, seqs)
    want = [expected_token(x[i], p.temperature, 0, p.top_p, p.min_p, p.seed, i)
            for i, p in enumerate(params)]
    assert got == want
    assert got[0] == int(x[0].argmax()) and got[1] in _top_group(x[1:2])[0]


if __name__ == "__main__":
    import itertools
    print(list(itertools.islice(search_extreme_words(), 4)))
