"""The runtime on the embedded default model, SmolLM2-135M-Instruct Q4_1 GGUF,
against transformers loading the same file (dequantized to float32 by the
`gguf` package in both): tokenizer, chat template, logits, greedy tokens, and
llama.cpp's q/k row permutation."""
import re

import pytest
import torch

from kernelforge.runtime import LLM, LlamaModel, SamplingParams, load_gguf
from runtime_ref import hf_greedy, hf_logits

NEW = 32
# float32 on both sides from identical dequantized weights; only summation order
# differs (fused q/k/v and gate/up matmuls, the ops' fp32 reductions). Logits
# reach ~40 in magnitude; measured max |diff| ~6e-5.
LOGIT_ATOL = 2e-3
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a land far away,"]
CHAT = [{"role": "user", "content": "What is 2+2?"}]


# the GGUF and transformers' model and tokenizer from it: session fixtures of
# conftest.py, shared with tests/test_integration_transformers.py (~40 s to load)
@pytest.fixture(scope="module")
def gguf_path(default_gguf):
    return default_gguf


# max_model_len 256 (the longest sequence here is ~85 tokens; the pool's 1024 by default):
# decode steps replay graphs whose block tables are max_model_len wide, and the eager
# attention computes over every slot of them (masked), so 1024 made each step 4x the work
@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(gguf_path, backend="eager", dtype="float32", num_blocks=64, max_num_batched_tokens=256,
               max_model_len=256)


@pytest.fixture(scope="module")
def ref(hf_gguf_model):
    return hf_gguf_model


@pytest.fixture(scope="module")
def ref_tok(hf_gguf_tokenizer):
    return hf_gguf_tokenizer


def test_config_from_metadata(llm):
    c = llm.config
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 9, 3, 64)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.max_position == 8192
    assert c.rope_scaling is None and c.eos_token_ids == [2]


def test_tokenizer_and_chat_template(llm, ref_tok):
    for text in PROMPTS + ["1 2 3 12345 héllo 👋\n\tworld"]:
        ids = llm.tokenizer.encode(text)
        assert ids == ref_tok(text, add_special_tokens=True)["input_ids"]
        assert llm.tokenizer.decode(ids) == text
    chat = llm.chat_prompt(CHAT)
    assert chat == ref_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert llm.tokenizer.encode(chat)[:1] == [1]          # <|im_start|> kept whole


def test_logits_match_transformers(llm, ref):
    ids = llm.tokenizer.encode(llm.chat_prompt(CHAT))
    got, want = llm.prompt_logits(ids), hf_logits(ref, ids)
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| = {diff:.2e} (max |logit| {want.abs().max().item():.1f})")
    assert diff <= LOGIT_ATOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_greedy_matches_transformers(llm, ref):
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(ref, p, NEW)
    assert llm.pool.num_free == llm.pool.num_blocks


def test_chat_stops_at_eos_like_transformers(llm, ref):
    prompt = llm.chat_prompt(CHAT)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=48))[0]
    ids = out.prompt_token_ids
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):]
    assert out.token_ids == want.tolist()
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2
    assert "4" in out.text and "<|im_end|>" not in out.text
    assert llm.pool.num_free == llm.pool.num_blocks


def test_interleaved_rope_on_raw_gguf_rows(gguf_path, llm, ref):
    """llama.cpp stores q/k rows permuted for its interleaved (GPT-J style) rope.
    Left as stored, they need is_neox=False; the loader's default un-permutes
    them (as transformers does) for rotate-half. Both give transformers' logits;
    the raw rows with rotate-half do not."""
    config, raw, _ = load_gguf(gguf_path, unpermute=False)
    ids = llm.tokenizer.encode(PROMPTS[2])
    want = hf_logits(ref, ids)

    def logits(interleaved):
        m = LlamaModel(config, dict(raw), backend="eager", rope_interleaved=interleaved,
                       max_model_len=256)
        return _prefill(m, ids)

    assert (logits(True) - want).abs().max().item() <= LOGIT_ATOL
    assert (logits(False) - want).abs().max().item() > 1.0


def _prefill(model, ids):
    from kernelforge.runtime import AttnMetadata
    n = len(ids)
    blocks = -(-n // 16)
    kv = model.allocate_kv_cache(blocks, 16)
    meta = AttnMetadata(slot_mapping=torch.arange(n), block_tables=torch.arange(
        blocks, dtype=torch.int32)[None], seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32))
    return model.forward(torch.tensor(ids), torch.arange(n), meta, kv)


def test_cli_generate_streams_an_answer(gguf_path, capsys):
    """`kernelforge generate` (the README's main job) on the default model:
    greedy, chat template applied, the answer streamed to stdout."""
    from kernelforge.cli import main
    rc = main(["generate", "What is the capital of France?", "--max-tokens", "16",
               "--backend", "eager", "--stats"])
    cap = capsys.readouterr()
    assert rc == 0 and "Paris" in cap.out, cap.out
    # --stats: llama.cpp's end-of-run report, the format bench/cold_start.py parses
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("kernelforge stats: ")]
    assert len(lines) == 2, cap.err
    times = dict(re.findall(r"(import|load|compile|first token|to first token) ([\d.]+) s",
                            lines[0]))
    assert set(times) == {"import", "load", "compile", "first token", "to first token"}, lines
    assert float(times["to first token"]) >= float(times["load"]) > 0
    m = re.search(r"prompt (\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s\) \| generation "
                  r"(\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s\)", lines[1])
    assert m, lines[1]
    assert 1 <= int(m[4]) <= 15 and float(m[6]) > 0    # after the first; at most 16 in all
    assert "int4 layers from Q4_1 weights" in lines[1]          # the default: the file's own


def test_cli_bad_model_path_is_a_clear_error(capsys, tmp_path):
    from kernelforge.cli import main
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    for path in (str(tmp_path / "missing"), str(junk)):
        assert main(["generate", "hi", "--model", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kernelforge: ") and "Traceback" not in err, err
