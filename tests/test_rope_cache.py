"""kernelforge.rope: the rotary cos/sin cache against transformers' rope
initialisation functions (every variant), against float64 formulas written
here, and its argument checks."""
import inspect
import math

import numpy as np
import pytest
import torch

from kernelforge.rope import cos_sin_cache, inv_freq_and_attention_factor
from kernelforge.tolerance import assert_close

DIM = 64
HALF = DIM // 2
SHORT = [1.0 + 0.05 * i for i in range(HALF)]
LONG = [1.0 + 0.75 * i for i in range(HALF)]
# every cache compared here stays at or below 512 x 64 elements: larger ones
# cross torch's threading grain and cost 0.2 s per comparison on busy 2-core CI
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}


def _hf_params(scaling, base, dim, max_position_embeddings, seq_len):
    """inv_freq and attention scaling from transformers' own init function."""
    transformers = pytest.importorskip("transformers")
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    scaling = dict(scaling or {"rope_type": "default"})  # transformers edits the dict it gets
    rope_type = scaling.get("rope_type", scaling.get("type"))
    fn = rope_utils.ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        # transformers 5 moved the default function into each model; linear
        # scaling by 1.0 is that same formula (the division by 1.0 is exact),
        # and importing modeling_llama would cost seconds
        assert rope_type == "default"
        scaling = {"rope_type": "linear", "factor": 1.0}
        fn = rope_utils.ROPE_INIT_FUNCTIONS["linear"]
    if rope_type == "yarn" and "truncate" in scaling and "truncate" not in inspect.getsource(fn):
        pytest.skip("this transformers predates yarn's `truncate`")
    # rope_theta / rope_scaling are read by transformers 4 and converted into
    # rope_parameters by transformers 5
    cfg = transformers.LlamaConfig(hidden_size=2 * dim, num_attention_heads=2, head_dim=dim,
                                   max_position_embeddings=max_position_embeddings,
                                   rope_theta=base, rope_scaling=scaling)
    inv_freq, attention = fn(cfg, torch.device("cpu"), seq_len=seq_len)
    return inv_freq, attention


def _hf_cache(inv_freq, attention, n):
    # as LlamaRotaryEmbedding.forward: float32 positions times float32 inv_freq
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos() * attention, freqs.sin() * attention), dim=-1)


# (name, scaling, base, our max_position, our seq_len, HF max_position_embeddings, HF seq_len)
LR = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
      "original_max_position_embeddings": 128}
HF_CASES = [
    ("default", None, 10000.0, 512, None, 512, None),
    ("default-explicit", {"rope_type": "default"}, 500000.0, 512, None, 512, None),
    ("linear", {"rope_type": "linear", "factor": 4.0}, 10000.0, 512, None, 512, None),
    ("linear-legacy-type", {"type": "linear", "factor": 2.5}, 10000.0, 512, None, 512, None),
    # dynamic: HF's config.max_position_embeddings is the original length
    ("dynamic-below", {"rope_type": "dynamic", "factor": 2.0,
                       "original_max_position_embeddings": 1024}, 10000.0, 512, None, 1024, 512),
    ("dynamic-above", {"rope_type": "dynamic", "factor": 2.0,
                       "original_max_position_embeddings": 128}, 10000.0, 512, None, 128, 512),
    ("dynamic-seq-len", {"rope_type": "dynamic", "factor": 4.0,
                         "original_max_position_embeddings": 128}, 10000.0, 512, 350, 128, 350),
    ("dynamic-no-orig", {"rope_type": "dynamic", "factor": 2.0}, 10000.0, 512, None, 512, 512),
    ("yarn", YARN, 10000.0, 512, None, 512, None),
    ("yarn-mscale", {**YARN, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                     "beta_fast": 16, "beta_slow": 2}, 10000.0, 512, None, 512, None),
    ("yarn-mscale-equal", {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}, 10000.0, 512, None,
     512, None),
    ("yarn-attention-factor", {**YARN, "attention_factor": 1.5}, 10000.0, 512, None, 512, None),
    ("yarn-no-truncate", {**YARN, "truncate": False}, 1000000.0, 512, None, 512, None),
    ("llama3", LLAMA3, 500000.0, 512, None, 512, None),
    # longrope: HF's factor is max_position_embeddings / original, whatever the length
    ("longrope-long", LR, 10000.0, 512, None, 512, 512),
    ("longrope-short", LR, 10000.0, 512, 128, 512, 128),
    ("longrope-unscaled", LR, 10000.0, 128, None, 128, 128),
    ("longrope-explicit", {**LR, "factor": 8.0, "attention_factor": 1.25}, 10000.0, 512, None,
     512, 512),
]


@pytest.mark.parametrize("name,scaling,base,n,seq_len,hf_max,hf_seq_len", HF_CASES,
                         ids=[c[0] for c in HF_CASES])
def test_matches_transformers(name, scaling, base, n, seq_len, hf_max, hf_seq_len):
    inv_hf, att_hf = _hf_params(scaling, base, DIM, hf_max, hf_seq_len)
    inv, att = inv_freq_and_attention_factor(DIM, base, scaling, n, seq_len=seq_len)
    assert inv.dtype == torch.float32 and inv.shape == (HALF,)
    assert_close(inv, inv_hf, torch.float32, f"{name}: inv_freq")
    assert att == pytest.approx(float(att_hf), rel=1e-15), name
    cache = cos_sin_cache(DIM, n, base, scaling, seq_len=seq_len)
    assert cache.dtype == torch.float32 and cache.shape == (n, DIM)
    assert_close(cache, _hf_cache(inv_hf, att_hf, n), torch.float32, f"{name}: cache")


def test_dynamic_is_default_up_to_the_original_length():
    plain = cos_sin_cache(DIM, 512)
    below = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 1024}
    assert torch.equal(cos_sin_cache(DIM, 512, scaling=below), plain)
    above = {**below, "original_max_position_embeddings": 128}
    assert not torch.equal(cos_sin_cache(DIM, 512, scaling=above), plain)


def test_longrope_picks_factors_by_length():
    inv_long, a_long = inv_freq_and_attention_factor(DIM, 1e4, LR, 512)
    inv_short, a_short = inv_freq_and_attention_factor(DIM, 1e4, LR, 512, seq_len=128)
    assert a_long == a_short == pytest.approx(math.sqrt(1 + math.log(4) / math.log(128)))
    base = 1e4 ** (-np.arange(0, DIM, 2) / DIM)
    np.testing.assert_allclose(inv_long.double().numpy(), base / np.array(LONG), rtol=1e-6)
    np.testing.assert_allclose(inv_short.double().numpy(), base / np.array(SHORT), rtol=1e-6)


# ---- float64 formulas written here, independent of transformers and of rope.py

def _f64_default(base, dim):
    return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


def _f64_llama3(base, dim, s):
    inv = _f64_default(base, dim)
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"]:
            out.append(f)  # high frequencies: unchanged
        elif wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"]:
            out.append(f / s["factor"])  # low frequencies: interpolated
        else:
            t = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                 / (s["high_freq_factor"] - s["low_freq_factor"]))
            out.append((1 - t) * f / s["factor"] + t * f)
    return np.array(out)


def _f64_yarn(base, dim, s):
    # YaRN (arXiv 2309.00071): dimension d rotates orig * f_d / 2pi times over the
    # original context; above beta_fast rotations keep f_d, below beta_slow use
    # f_d / factor, ramp linearly (in d) in between, the bounds rounded outwards
    inv = _f64_default(base, dim)
    orig, factor = s["original_max_position_embeddings"], s["factor"]

    def d_at(rot):
        return dim * math.log(orig / (2 * math.pi * rot)) / (2 * math.log(base))
    lo, hi = max(math.floor(d_at(32)), 0), min(math.ceil(d_at(1)), dim - 1)
    r = np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0.0, 1.0)
    return inv * (1 - r) + inv / factor * r, 0.1 * math.log(factor) + 1.0


F64_CASES = [
    ("default", None, 10000.0, lambda: (_f64_default(10000.0, DIM), 1.0)),
    ("linear", {"rope_type": "linear", "factor": 4.0}, 10000.0,
     lambda: (_f64_default(10000.0, DIM) / 4.0, 1.0)),
    ("llama3", LLAMA3, 500000.0, lambda: (_f64_llama3(500000.0, DIM, LLAMA3), 1.0)),
    ("yarn", YARN, 10000.0, lambda: _f64_yarn(10000.0, DIM, YARN)),
]
N64 = 4096
# The float32 inv_freq carries a few ulps of relative error (pow, the division
# by factor, yarn's and llama3's blends: 2.9 ulps measured at most on these
# cases, 16 allowed for other libms), and p * inv_freq adds one more rounding;
# cos and sin have slope <= 1, so |error| <= attention * p * inv_freq *
# (INV_ULPS + 1) * 2**-24, plus the rounding of cos/sin and of the attention
# product (2**-22 covers both). At p = 4095, inv_freq = 1 that is ~4e-3.
INV_ULPS = 16


@pytest.mark.parametrize("name,scaling,base,ref", F64_CASES, ids=[c[0] for c in F64_CASES])
def test_matches_float64_formula(name, scaling, base, ref):
    inv64, att64 = ref()
    inv, att = inv_freq_and_attention_factor(DIM, base, scaling, N64)
    assert att == pytest.approx(att64, rel=1e-12)
    rel = np.abs(inv.double().numpy() - inv64) / inv64
    assert rel.max() <= INV_ULPS * 2 ** -24, f"{name}: inv_freq off by {rel.max() / 2**-24:.1f} ulps"

    p = np.arange(N64, dtype=np.float64)[:, None]
    angle = p * inv64[None, :]
    expected = np.concatenate((np.cos(angle), np.sin(angle)), axis=1) * att64
    cache = cos_sin_cache(DIM, N64, base, scaling).double().numpy()
    bound = att64 * (np.tile(angle, 2) * (INV_ULPS + 1) * 2 ** -24 + 2 ** -22)
    worst = np.max(np.abs(cache - expected) - bound)
    assert worst <= 0, f"{name}: exceeds the float32-argument bound by {worst:.3e}"
    # near position 0 the argument rounding is negligible: the plain policy holds
    assert_close(torch.from_numpy(cache[:32]), torch.from_numpy(expected[:32]), torch.float32,
                 f"{name}: first rows")


def test_llama3_case_covers_all_three_bands():
    wavelen = 2 * math.pi / _f64_default(500000.0, DIM)
    orig = LLAMA3["original_max_position_embeddings"]
    assert (wavelen < orig / 4).any() and (wavelen > orig).any()
    assert ((wavelen >= orig / 4) & (wavelen <= orig)).any()


def test_layout_dtype_and_device():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cache = cos_sin_cache(DIM, 128, scaling=scaling)
    att = 0.1 * math.log(4.0) + 1.0
    # position 0: cos = 1 and sin = 0, times the attention factor
    assert torch.equal(cache[0, :HALF], torch.full((HALF,), att, dtype=torch.float32))
    assert torch.equal(cache[0, HALF:], torch.zeros(HALF))
    bf16 = cos_sin_cache(DIM, 128, scaling=scaling, dtype=torch.bfloat16, device="cpu")
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, cache.to(torch.bfloat16))


def test_transformers5_rope_parameters_dict_accepted():
    params = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0,
              "partial_rotary_factor": 1.0}
    assert torch.equal(cos_sin_cache(DIM, 64, 500000.0, params),
                       cos_sin_cache(DIM, 64, 500000.0, {"rope_type": "linear", "factor": 2.0}))


# ---- bad input: the message names the argument, the expectation and the value

def _bad(words, **kw):
    args = {"rotary_dim": DIM, "max_position": 128, **kw}
    with pytest.raises(ValueError) as e:
        cos_sin_cache(**args)
    msg = str(e.value)
    assert msg.startswith("cos_sin_cache: "), msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("words,kw", [
    (["`rotary_dim`", "even", "63"], {"rotary_dim": 63}),
    (["`rotary_dim`", "0"], {"rotary_dim": 0}),
    (["`rotary_dim`", "64.0"], {"rotary_dim": 64.0}),
    (["`max_position`", "0"], {"max_position": 0}),
    (["`max_position`", "-5"], {"max_position": -5}),
    (["`seq_len`", "0"], {"seq_len": 0}),
    (["`base`", "> 1", "-10000.0"], {"base": -10000.0}),
    (["`dtype`", "torch.int32"], {"dtype": torch.int32}),
    (["`scaling`", "list"], {"scaling": [("rope_type", "linear")]}),
    (["`scaling['rope_type']`", "llama3", "'ntk'"], {"scaling": {"rope_type": "ntk"}}),
    (["`scaling['type']`", "'su'"], {"scaling": {"type": "su"}}),
    (["`scaling['factor']`", "> 0", "got -1"], {"scaling": {"rope_type": "linear", "factor": -1}}),
    (["`scaling['factor']`", "got 0"], {"scaling": {"rope_type": "dynamic", "factor": 0}}),
    (["`scaling['factor']`", "got None"], {"scaling": {"rope_type": "yarn"}}),
    (["`scaling['factor']`", "'2'"], {"scaling": {"rope_type": "linear", "factor": "2"}}),
    (["`scaling['original_max_position_embeddings']`", "integer", "None"],
     {"scaling": {"rope_type": "yarn", "factor": 2.0}}),
    (["`scaling['truncate']`", "'no'"], {"scaling": {**YARN, "truncate": "no"}}),
    (["`scaling['attention_factor']`", "-1.0"], {"scaling": {**YARN, "attention_factor": -1.0}}),
    (["`scaling['high_freq_factor']`", "low_freq_factor", "1.0"],
     {"scaling": {**LLAMA3, "high_freq_factor": 1.0}}),
    (["`scaling['low_freq_factor']`", "None"],
     {"scaling": {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}}),
    (["`scaling['long_factor']`", f"{HALF} numbers", "length 31"],
     {"scaling": {**LR, "long_factor": LONG[:31]}}),
    (["`scaling['short_factor']`", "None"],
     {"scaling": {k: v for k, v in LR.items() if k != "short_factor"}}),
    (["`scaling['rope_theta']`", "500000.0"],
     {"scaling": {"rope_type": "default", "rope_theta": 500000.0}}),
    (["`rotary_dim`", ">= 4", "dynamic"],
     {"rotary_dim": 2, "scaling": {"rope_type": "dynamic", "factor": 2.0}}),
])
def test_bad_input(words, kw):
    _bad(words, **kw)


def test_helper_names_itself():
    with pytest.raises(ValueError, match=r"^inv_freq_and_attention_factor: `scaling\['factor'\]`"):
        inv_freq_and_attention_factor(DIM, 10000.0, {"rope_type": "linear", "factor": -1}, 128)
