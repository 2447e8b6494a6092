"""Sampling: the kept set against a float64 reference built from a sort, the
same token on every backend, a chi-square goodness-of-fit test (which must
catch a planted bias), greedy = argmax, logprobs, and penalties against a
plain Python reference."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernelforge
from kernelforge.kernels import sampling_reference
from conftest import DEVICE

ops = kernelforge.ops
# Inductor compiles once per (dtype, vocab): every Inductor call here uses these
INDUCTOR_V = 1000


# -- float64 reference of the kept set ------------------------------------------------

def kept_reference(x, temperature, top_k, top_p, min_p):
    """The op's spec reference (kernelforge/kernels/sampling_reference.py): the tokens a
    row may produce, from a descending sort, in float64."""
    return sampling_reference.kept(x, temperature, top_k, top_p, min_p)


@st.composite
def rows(draw, max_v=64):
    V = draw(st.sampled_from([1, 2, 7, 40, max_v]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    ties = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) * 0.2      # spread <= ~1 (64 normals within 2.6 sigma)
    if ties:                                    # many equal logits: the tie rule matters
        x = torch.round(x * 10) / 10
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0]))
    top_k = draw(st.integers(-1, V + 1))
    top_p = draw(st.one_of(st.just(1.0), st.floats(0.05, 1.0)))
    min_p = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.6)))
    return x, temperature, top_k, top_p, min_p


@settings(max_examples=8)
@given(case=rows())
def test_kept_set_matches_sort_reference(case):
    """Many draws of one row (one launch, a seed per copy): every token drawn
    is in the reference set, and every token of the set is drawn. Logits
    spread ~1 unit (at T=0.5, 2 in probability space), so each kept token
    has p >= ~1/(64 e^2) and 8000 draws miss one with probability < 1e-7."""
    x, temperature, top_k, top_p, min_p = case
    want = kept_reference(x, temperature, top_k, top_p, min_p)
    n = 8000
    tok = ops.sample(x[None].expand(n, -1).contiguous().to(DEVICE), temperature=temperature,
                     top_k=top_k, top_p=top_p, min_p=min_p, seeds=torch.arange(n).to(DEVICE),
                     backend="eager")
    assert set(tok.cpu().tolist()) == want


def _params(B, V, g, dtype=torch.float32):
    x = (torch.randn(B, V, generator=g) * 2).to(dtype)
    t = torch.tensor([0.0, 0.7, 1.0, 1.5])[torch.randint(0, 4, (B,), generator=g)]
    k = torch.randint(-1, 60, (B,), generator=g)
    p = torch.rand(B, generator=g) * 0.9 + 0.1
    p[::3] = 1.0
    mp = torch.rand(B, generator=g) * 0.2
    seeds = torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g)
    offs = torch.randint(0, 2 ** 40, (B,), generator=g)
    dev = DEVICE
    return (x.to(dev), dict(temperature=t.to(dev), top_k=k.to(dev), top_p=p.to(dev),
                            min_p=mp.to(dev), seeds=seeds.to(dev), offsets=offs.to(dev)))


@settings(max_examples=4)
@given(seed=st.integers(0, 2 ** 31 - 1), V=st.sampled_from([300, 1500]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_same_token_eager_and_triton(seed, V, dtype):
    """Triton chunks the row (1024-wide chunks in tests), the torch lowering does not."""
    x, kw = _params(5, V, torch.Generator().manual_seed(seed), dtype)
    a = ops.sample(x, backend="eager", logprobs=0, **kw)
    b = ops.sample(x, backend="triton", logprobs=0, **kw)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)


@settings(max_examples=10)
@given(seed=st.integers(0, 2 ** 31 - 1), B=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_same_token_eager_and_cpp(seed, B, dtype):
    """The C++ lowering walks the row in chunks (Philox draws counted by vocab
    index, so chunking cannot change a token)."""
    x, kw = _params(B, 1500, torch.Generator().manual_seed(seed), dtype)
    a = ops.sample(x, backend="eager", logprobs=0, **kw)
    b = ops.sample(x, backend="cpp", logprobs=0, **kw)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)


def test_same_token_inductor():
    g = torch.Generator().manual_seed(7)
    for B in (1, 9, 33):                       # one graph for every row count
        x, kw = _params(B, INDUCTOR_V, g)
        a = ops.sample(x, backend="eager", **kw)
        assert torch.equal(a, ops.sample(x, backend="inductor", **kw))
        if B == 9:
            assert torch.equal(a, ops.sample(x, backend="triton", **kw))


@pytest.mark.parametrize("V", [32000, 49152, 128256, 151936])
def test_large_vocabularies(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, V, generator=g) * 3
    x[1, V - 1] = 50.0                          # greedy must find the very last token
    tok = ops.sample(x, temperature=torch.tensor([1.0, 0.0, 0.8]), top_k=torch.tensor([50, 0, 1]),
                     top_p=0.9, seeds=torch.tensor([1, 2, 3]), backend="eager")
    assert tok[1] == V - 1 and tok[2] == int(x[2].argmax())
    assert int(tok[0]) in kept_reference(x[0], 1.0, 50, 0.9, 0.0)


# -- distribution -------------------------------------------------------------------------

# chi-square critical values at alpha = 0.001 for df = 1..7 (standard tables)
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def chi_square(counts, expected_p):
    n = counts.sum()
    e = expected_p * n
    return float(((counts - e) ** 2 / e).sum())


def test_chi_square_goodness_of_fit():
    """30000 draws of an 8-token row with top_k=6, top_p=0.97, T=0.8 match
    the filtered, renormalised softmax (df = kept - 1, alpha = 0.001); the
    same counts against a distribution with 1.5% of the mass moved from one
    token to another fail."""
    x = torch.tensor([1.0, 0.7, 0.4, 0.1, -0.2, -0.5, -0.8, -3.0])
    T, k, p = 0.8, 6, 0.97
    kept = sorted(kept_reference(x, T, k, p, 0.0))
    assert kept == [0, 1, 2, 3, 4, 5]
    q = torch.softmax(x.double()[kept] / T, 0)
    n = 30000
    tok = ops.sample(x[None].expand(n, -1).contiguous(), temperature=T, top_k=k, top_p=p,
                     seeds=12345, offsets=torch.arange(n), backend="eager")
    counts = torch.bincount(tok, minlength=8).double()
    assert counts[6:].sum() == 0
    df = len(kept) - 1
    assert chi_square(counts[kept], q) < CHI2_CRIT_001[df]
    biased = q.clone()
    biased[0] -= 0.015
    biased[3] += 0.015
    assert chi_square(counts[kept], biased) > CHI2_CRIT_001[df]


def test_seed_offset_and_batch_position():
    x = torch.randn(1, 500)
    a = ops.sample(x, temperature=1.0, seeds=42, offsets=3, backend="eager")
    many = ops.sample(x.expand(4, -1).contiguous(), temperature=1.0,
                      seeds=torch.tensor([7, 42, 9, 42]), offsets=torch.tensor([3, 3, 3, 4]),
                      backend="eager")
    assert many[1] == a[0]                      # position in the batch does not matter
    steps = ops.sample(x.expand(64, -1).contiguous(), temperature=1.0, seeds=42,
                       offsets=torch.arange(64), backend="eager")
    assert len(set(steps.tolist())) > 10       # offsets give fresh draws


# -- greedy and logprobs ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["eager", "triton", "cpp"])
def test_greedy_is_argmax(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 777, generator=g).to(DEVICE)
    x[2, 10] = x[2, 500] = 9.0                  # ties go to the lower index
    x[3] = float("-inf")
    x[3, 776] = -1e30
    tok = ops.sample(x, temperature=0.0, top_k=3, top_p=0.5, seeds=torch.arange(6).to(DEVICE),
                     backend=backend)
    assert tok.tolist() == x.argmax(-1).tolist() and tok[2] == 10


def test_logprobs_match_log_softmax():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 300, generator=g).bfloat16()
    tok, lp, ids, top = ops.sample(x, temperature=0.9, top_k=20, logprobs=3, backend="eager")
    ref = torch.log_softmax(x.double(), -1)
    torch.testing.assert_close(lp.double(), ref.gather(1, tok[:, None])[:, 0], rtol=0, atol=1e-5)
    want = torch.topk(ref, 3, -1)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(top.double(), want.values, rtol=0, atol=1e-5)


def test_custom_op_in_compiled_graph():
    x = torch.randn(3, 64)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, seeds):
        return ops.sample(x, temperature=1.0, top_k=5, seeds=seeds, backend="eager")

    seeds = torch.tensor([1, 2, 3])
    assert torch.equal(f(x, seeds), ops.sample(x, temperature=1.0, top_k=5, seeds=seeds,
                                               backend="eager"))


# -- penalties ----------------------------------------------------------------------------

def penalties_reference(logits, prompt, output, rep, freq, pres):
    out = logits.double().clone()
    for b in range(out.shape[0]):
        p_ids = [t for t in prompt[b].tolist() if t >= 0]
        o_ids = [t for t in output[b].tolist() if t >= 0]
        for v in range(out.shape[1]):
            if v in p_ids or v in o_ids:
                out[b, v] = out[b, v] / rep[b] if out[b, v] > 0 else out[b, v] * rep[b]
            c = o_ids.count(v)
            out[b, v] -= freq[b] * c + (pres[b] if c else 0.0)
    return out


@settings(max_examples=15)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_penalties_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, V = 3, 20
    x = torch.randn(B, V, generator=g) * 2
    prompt = torch.randint(-1, V, (B, 6), generator=g)
    output = torch.randint(-1, V, (B, 9), generator=g)
    rep = (torch.rand(B, generator=g) + 0.5).tolist()
    freq = (torch.rand(B, generator=g) - 0.2).tolist()
    pres = (torch.rand(B, generator=g) - 0.2).tolist()
    got = ops.apply_penalties(x, prompt, output, repetition_penalty=torch.tensor(rep),
                              frequency_penalty=torch.tensor(freq),
                              presence_penalty=torch.tensor(pres))
    want = penalties_reference(x, prompt, output, rep, freq, pres)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    same = ops.apply_penalties(x, prompt, output)          # defaults change nothing
    assert torch.equal(same, x)
    assert not math.isnan(float(got.sum()))
