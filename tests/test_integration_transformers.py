"""kernelize(model) on real transformers models: random-weight Llama-3-style
and Qwen2-style checkpoints written and read back by transformers, and
SmolLM2 from its GGUF. Greedy tokens are those of the unpatched model, logits
are within the whole-model policy, a padded batch generates what each prompt
does alone, and torch.compile(fullgraph=True) traces the patched model.
Counters around kernelforge.ops (the real ops run inside) show they ran."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kernelforge  # noqa: E402
from kernelforge.integrations.transformers import kernelize  # noqa: E402
from kernelforge.tolerance import assert_close_rows  # noqa: E402
from test_runtime_gguf import gguf_path, ref, ref_tok  # noqa: E402,F401  (the GGUF fixtures)

VOCAB = 384
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
COMMON = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
MODELS = {
    "llama3": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
               dict(COMMON, head_dim=64, tie_word_embeddings=False, rope_parameters=LLAMA3)),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
              dict(COMMON, tie_word_embeddings=True, num_key_value_heads=1,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
OPS = ("rms_norm", "silu_and_mul", "rotary_embedding", "attention")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, (model_cls, cfg_cls, cfg) in MODELS.items():
        torch.manual_seed(len(name))
        model = model_cls(cfg_cls(**cfg)).eval()
        with torch.no_grad():   # larger weights than the init: peaked, varied greedy output
            for pname, p in model.named_parameters():
                p.normal_(1.0 if "norm" in pname else 0.0, 0.2 if "norm" in pname else 0.25)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture
def counted(monkeypatch):
    calls = dict.fromkeys(OPS, 0)
    for op in OPS:
        real = getattr(kernelforge.ops, op)

        def wrapper(*a, _real=real, _op=op, **k):
            calls[_op] += 1
            return _real(*a, **k)
        monkeypatch.setattr(kernelforge.ops, op, wrapper)
    return calls


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(n, seed=0, lengths=(3, 21, 40, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (lengths[i % len(lengths)],), generator=g)
            for i in range(n)]


def _greedy(model, ids, new=24, mask=None):
    return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          max_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_tokens_and_logits_match_the_stock_model(name, checkpoints, counted):
    stock, kf = _load(checkpoints[name]), kernelize(_load(checkpoints[name]))
    assert kf.kernelforge_swapped == {"rms_norm": 5, "silu_and_mul": 2, "rotary_embedding": 2,
                                     "attention": 2}
    with torch.no_grad():
        for ids in _prompts(3):
            ids = ids[None]
            assert_close_rows(kf(ids).logits[0], stock(ids).logits[0], torch.float32, name)
            assert torch.equal(_greedy(kf, ids), _greedy(stock, ids))
    assert all(counted[op] > 0 for op in OPS), counted
    before = dict(counted)
    with torch.no_grad():
        stock(_prompts(1)[0][None])                # the stock model stays stock
    assert counted == before


def test_a_padded_batch_generates_what_each_prompt_does_alone(checkpoints, counted):
    kf = kernelize(_load(checkpoints["llama3"]))
    prompts = _prompts(4, seed=1)
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):               # left padding, as generate expects
        ids[i, longest - len(p):], mask[i, longest - len(p):] = p, 1
    with torch.no_grad():
        batch = _greedy(kf, ids, mask=mask)[:, longest:]
        assert counted["attention"] > 0            # the padded mask ran kernelforge's attention
        for i, p in enumerate(prompts):
            assert torch.equal(batch[i], _greedy(kf, p[None])[0, len(p):]), i


def test_a_mask_that_is_not_left_padding_still_gives_sdpas_answer(checkpoints, counted):
    """Right padding (or any mask but causal over left padding) runs transformers'
    sdpa attention for that call: the same logits as the stock model."""
    stock, kf = _load(checkpoints["llama3"]), kernelize(_load(checkpoints["llama3"]))
    ids = torch.stack([p[:9] for p in _prompts(2, seed=4, lengths=(9, 9))])
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        got, want = kf(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits
    for b, n in enumerate((9, 6)):
        assert_close_rows(got[b, :n], want[b, :n], torch.float32, "right padding")
    assert counted["attention"] == 0


def test_fullgraph_compile_has_no_graph_break(checkpoints, counted):
    kf = kernelize(_load(checkpoints["qwen2"]))
    ids = _prompts(1, seed=2)[0][None]
    with torch.no_grad():
        want = kf(ids).logits[0]
        torch._dynamo.reset()
        got = torch.compile(kf, fullgraph=True)(ids).logits[0]
    assert_close_rows(got, want, torch.float32, "compiled")


def test_a_copy_and_a_bad_backend(checkpoints):
    with pytest.raises(ValueError, match="`backend` expected one of"):
        kernelize(_load(checkpoints["qwen2"]), backend="no-such-backend")
    kf = kernelize(_load(checkpoints["qwen2"]), backend="eager")
    ids = _prompts(1, seed=3)[0][None]
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(kf)(ids).logits, kf(ids).logits)


def test_smollm2_from_its_gguf(ref, ref_tok, counted):
    """The default model as transformers loads it from the GGUF
    (tests/test_runtime_gguf.py's fixtures): the same greedy tokens with and
    without kernelize."""
    kf = kernelize(copy.deepcopy(ref))
    with torch.no_grad():
        for text in ("The capital of France is", "def fibonacci(n):"):
            ids = ref_tok(text, return_tensors="pt").input_ids
            assert torch.equal(_greedy(kf, ids, new=32), _greedy(ref, ids, new=32)), text
    assert all(counted[op] > 0 for op in OPS), counted
