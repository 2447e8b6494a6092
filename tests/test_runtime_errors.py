"""Bad requests and failures inside the runtime (issue 6, "Bad input"): a bad
request in a batch is reported by index and argument before anything runs; a
failure in the middle of a step (the model, the sampler, an interrupt) aborts
that call's requests, frees every KV block and leaves the engine usable for
the others; bad model files and engine arguments fail at LLM construction.

The model is a tiny random-weight Llama written here (config.json,
safetensors, a byte-level tokenizer.json), so the tests need no transformers
and run in seconds on the eager backend.
"""
import json

import pytest
import torch

from kernelforge.runtime import LLM, SamplingParams, default_model_path
from kernelforge.runtime.llm import InvalidRequestError

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, hidden_act="silu")


def write_tiny_llama(path, seed: int = 0, **overrides):
    """A random-weight Llama directory (HF names and layout), 256 byte tokens,
    no eos. Returns the path."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    cfg = dict(TINY, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]

    def rnd(*shape, mean=0.0, std=0.25):
        return torch.randn(*shape, generator=g) * std + mean

    w = {"model.embed_tokens.weight": rnd(V, H), "model.norm.weight": rnd(H, mean=1, std=0.2),
         "lm_head.weight": rnd(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": rnd(H, mean=1, std=0.2),
                  p + "post_attention_layernorm.weight": rnd(H, mean=1, std=0.2),
                  p + "self_attn.q_proj.weight": rnd(q, H), p + "self_attn.k_proj.weight": rnd(kv, H),
                  p + "self_attn.v_proj.weight": rnd(kv, H), p + "self_attn.o_proj.weight": rnd(H, q),
                  p + "mlp.gate_proj.weight": rnd(I, H), p + "mlp.up_proj.weight": rnd(I, H),
                  p + "mlp.down_proj.weight": rnd(H, I)})
    save_file(w, str(path / "model.safetensors"))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    return path


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["good prompt", "another one, somewhat longer than the first prompt here", "x"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    # 24 blocks of 16, a 32-token budget: prompts prefill in chunks beside decode rows
    return LLM(tiny_dir, backend="eager", num_blocks=24, max_num_seqs=8,
               max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def reference(engine):
    """What the engine answers for PROMPTS when nothing goes wrong."""
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture
def llm(engine, reference):
    """The shared engine, checked clean before and after each test."""
    _assert_clean(engine)
    yield engine
    _assert_clean(engine)


def _assert_clean(llm):
    assert llm.pool.num_free == llm.pool.num_blocks, "KV blocks left allocated"
    assert not llm.scheduler.running and not llm.scheduler.waiting, "sequences left queued"


def _count_forwards(llm, monkeypatch):
    calls = []
    real = llm.model.forward

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(llm.model, "forward", counted)
    return calls


# -- bad requests in a batch -------------------------------------------------------------

def test_bad_prompts_in_a_batch_are_named_and_nothing_runs(llm, reference, monkeypatch):
    calls = _count_forwards(llm, monkeypatch)
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([PROMPTS[0], "", "x" * 100000, [3, 256], PROMPTS[1]], GREEDY)
    err = info.value
    assert isinstance(err, ValueError)
    assert [(i, arg) for i, arg, _ in err.errors] == [(1, "prompt"), (2, "prompt"), (3, "prompt")]
    msg = str(err)
    assert "request 1 (prompt): empty prompt" in msg
    assert "request 2 (prompt): prompt of 100000 tokens does not fit max_model_len" in msg
    assert "request 3 (prompt): token id 256 outside the vocabulary" in msg
    assert "request 0" not in msg and "request 4" not in msg and "nothing was run" in msg
    assert calls == []                                  # checked before any forward
    _assert_clean(llm)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    assert len(calls) > 0


@pytest.mark.parametrize("prompt, kind, match", [
    (None, TypeError, "string or a list of token ids, not NoneType"),
    (3.5, TypeError, "not float"),
    ([1, 2.0], TypeError, "token ids must be ints, got 2.0"),
    ([1, True], TypeError, "token ids must be ints, got True"),
    (["a", "b"], TypeError, "token ids must be ints, got 'a'"),
    ([-1], ValueError, "token id -1 outside the vocabulary"),
    ([], ValueError, "empty prompt"),
    (torch.tensor([[1, 2]]), TypeError, "1-D and integer"),
])
def test_each_kind_of_bad_prompt(llm, prompt, kind, match):
    with pytest.raises(InvalidRequestError, match=match) as info:
        llm.generate([[5, 6], prompt], GREEDY)
    assert [(i, arg) for i, arg, _ in info.value.errors] == [(1, "prompt")]
    with pytest.raises(kind, match=match):              # the single-request API: plain errors
        llm.add_request(prompt, GREEDY)


def test_token_ids_of_any_integer_type_are_one_prompt(llm):
    import numpy as np

    want = llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
    assert llm.generate([5, 6, 7], GREEDY)[0].token_ids == want          # one prompt of ids
    assert llm.generate(np.array([5, 6, 7]).tolist(), GREEDY)[0].token_ids == want
    assert llm.generate([[np.int64(5), np.int32(6), 7]], GREEDY)[0].token_ids == want
    assert llm.generate(torch.tensor([5, 6, 7]), GREEDY)[0].token_ids == want


def test_bad_per_prompt_params_are_named(llm, reference, monkeypatch):
    calls = _count_forwards(llm, monkeypatch)
    zero, cold, fine = (SamplingParams(temperature=0, max_tokens=4) for _ in range(3))
    zero.max_tokens = 0                 # valid when built, changed afterwards
    cold.temperature = -1.0
    too_many = SamplingParams(logprobs=257)   # over the vocabulary of 256
    params = [fine, zero, {"temperature": 0}, cold, too_many]
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([[1, 2]] * 4 + [""], params)
    got = {(i, arg): m for i, arg, m in info.value.errors}
    assert sorted(got) == [(1, "params"), (2, "params"), (3, "params"), (4, "params"),
                           (4, "prompt")]
    assert "SamplingParams.max_tokens must be an int >= 1, got 0" in got[1, "params"]
    assert "params must be SamplingParams, not dict" in got[2, "params"]
    assert "SamplingParams.temperature" in got[3, "params"]
    assert "logprobs must be at most the vocabulary size (256), got 257" in got[4, "params"]
    assert calls == []
    with pytest.raises(ValueError, match="3 SamplingParams for 2 prompts"):
        llm.generate([[1], [2]], [fine] * 3)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.add_request([1, 2], zero)
    _assert_clean(llm)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", float("nan")), ("temperature", "0"),
    ("top_k", 1.5), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 2),
    ("seed", "7"), ("seed", 1.0), ("max_tokens", 0), ("max_tokens", True), ("max_tokens", 2.0),
    ("stop", [""]), ("stop", [1]), ("presence_penalty", 3), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0), ("repetition_penalty", float("inf")), ("ignore_eos", 1),
    ("logprobs", -1), ("logprobs", 1.0),
])
def test_sampling_params_reject_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**{field: value})


def test_params_changed_after_queueing_do_not_reach_the_request(llm):
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    seq = llm.add_request([9, 8, 7], sp)
    sp.max_tokens, sp.temperature = 0, -3.0           # would break the running request
    while not seq.finished:
        llm.step()
    assert len(seq.output_ids) == 5 and seq.finish_reason == "length"


def test_seeds_of_any_size_are_folded_to_int64(llm):
    def draw(seed):
        return llm.generate([[4, 5, 6]], SamplingParams(temperature=1.0, seed=seed, max_tokens=8,
                                                        ignore_eos=True))[0].token_ids
    assert draw(2 ** 64 + 7) == draw(7)                # 2**64 + 7 overflowed int64 mid-step
    assert draw(-(2 ** 70)) == draw(0)


def test_stream_checks_its_request_at_the_call(llm):
    with pytest.raises(ValueError, match="empty prompt"):
        llm.stream("")                                  # not lazily, at the first next()
    with pytest.raises(ValueError, match="does not fit max_model_len"):
        llm.stream("x" * 100000)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.stream("hi", {"max_tokens": 3})
    unused = llm.stream("fine", GREEDY)                 # never iterated: queues nothing
    _assert_clean(llm)
    del unused


# -- failures in the middle of a step ------------------------------------------------------

class Boom(RuntimeError):
    pass


def _fail_forward_on(llm, monkeypatch, n, exc=Boom):
    """The n-th model forward from now raises ``exc`` (the others run). A
    forward is an op-by-op one or a decode graph's run (whose capture, on a
    batch size's first use, is a forward too)."""
    calls = []

    def failing(real):
        def forward(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise exc("injected failure")
            return real(*a, **k)
        return forward
    monkeypatch.setattr(llm.model, "forward", failing(llm.model.forward))
    monkeypatch.setattr(llm.graphs, "run", failing(llm.graphs.run))
    return calls


@pytest.mark.parametrize("n", [1, 2, 4, 9])
def test_model_failure_mid_batch_frees_everything(llm, reference, monkeypatch, n):
    """Forward 1 is the first prefill chunk; 2 mixes a prefill chunk with decode
    rows; later ones are decode steps with prefix-cached blocks registered."""
    calls = _fail_forward_on(llm, monkeypatch, n)
    with pytest.raises(Boom):
        llm.generate(PROMPTS, GREEDY)
    assert len(calls) == n
    _assert_clean(llm)
    monkeypatch.undo()
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    # the cached prefix blocks still hold the right contents
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


def test_sampler_failure_and_interrupt_free_everything(llm, reference, monkeypatch):
    import kernelforge.runtime.sampler as sampler_mod

    real, seen = sampler_mod.sample, []

    def sample(logits, seqs):
        seen.append(1)
        if len(seen) == 3:                  # once, for the whole batch: redrawn row by row
            raise Boom("sampler failed")
        return real(logits, seqs)
    monkeypatch.setattr(sampler_mod, "sample", sample)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    monkeypatch.undo()
    _fail_forward_on(llm, monkeypatch, 3, exc=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY)
    _assert_clean(llm)
    monkeypatch.undo()
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


def test_a_request_whose_draw_fails_fails_alone(llm, reference):
    """Parameters broken after the checks (a poison pill) fail their request
    only: the others in the same steps give their tokens, nothing leaks."""
    poisoned = llm.add_request(PROMPTS[0], SamplingParams(temperature=0.5, max_tokens=12,
                                                          repetition_penalty=1.1))
    poisoned.params.repetition_penalty = float("inf")
    others = [llm.add_request(p, GREEDY) for p in PROMPTS[1:]]
    while not all(s.finished for s in [poisoned, *others]):
        llm.step()
    assert poisoned.finish_reason == "error" and "repetition_penalty" in poisoned.error
    assert [s.output_ids for s in others] == reference[1:]


def test_nan_logits_fail_their_request_instead_of_sampling_token_0(llm, reference):
    """A prompt that reaches a NaN weight (its embedding row) gets NaN logits:
    greedy argmax would say token 0; the request fails, naming why, and the
    requests batched with it are untouched."""
    weight = llm.model.embed
    bad_token, = llm.tokenizer.encode("~")
    saved = weight[bad_token].clone()
    weight[bad_token] = float("nan")
    try:
        outs = llm.generate([PROMPTS[0], "~" + PROMPTS[1], PROMPTS[2]], GREEDY)
    finally:
        weight[bad_token] = saved
    assert outs[1].finish_reason == "error" and "NaN" in outs[1].error
    assert outs[1].token_ids == []
    assert [outs[0].token_ids, outs[2].token_ids] == [reference[0], reference[2]]
    with pytest.raises(RuntimeError, match="NaN"):
        weight[bad_token] = float("nan")
        try:
            "".join(llm.stream("~x", GREEDY))
        finally:
            weight[bad_token] = saved


def test_stream_failure_or_early_stop_frees_its_blocks(llm, monkeypatch):
    want = llm.generate([PROMPTS[1]], GREEDY)[0].text
    _fail_forward_on(llm, monkeypatch, 4)
    got = ""
    with pytest.raises(Boom):
        for piece in llm.stream(PROMPTS[1], GREEDY):
            got += piece
    assert got and want.startswith(got)
    _assert_clean(llm)
    monkeypatch.undo()
    it = llm.stream(PROMPTS[1], GREEDY)
    next(it)
    assert llm.pool.num_free < llm.pool.num_blocks
    it.close()                                          # the caller stops early
    _assert_clean(llm)
    assert "".join(llm.stream(PROMPTS[1], GREEDY)) == want


def test_failed_generate_leaves_another_request_running(llm, reference, monkeypatch):
    """A stream in progress shares the failing step with a generate call: the
    call's requests are aborted, the stream's request goes on and its text is
    what it is alone."""
    alone = llm.generate([PROMPTS[0]], GREEDY)[0].text
    it = llm.stream(PROMPTS[0], GREEDY)
    got = next(it)
    _fail_forward_on(llm, monkeypatch, 2)
    with pytest.raises(Boom):
        llm.generate(PROMPTS[1:], GREEDY)
    assert len(llm.scheduler.running) + len(llm.scheduler.waiting) == 1
    monkeypatch.undo()
    got += "".join(it)
    assert got == alone
    _assert_clean(llm)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference


def test_no_progress_raises_instead_of_spinning(llm):
    held = llm.pool.allocate(llm.pool.num_blocks)       # blocks lost to something else
    try:
        with pytest.raises(RuntimeError, match="cannot run any of 1 waiting"):
            llm.generate([[1, 2, 3]], GREEDY)
    finally:
        llm.pool.free(held)


# -- bad models and engine arguments --------------------------------------------------------

def test_bad_model_paths_and_files(tmp_path, tiny_dir):
    import shutil

    with pytest.raises(FileNotFoundError, match="no model"):
        LLM(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(tmp_path)                                   # a directory, but not a model
    for name, data in (("junk.gguf", b"not a model"), ("empty.gguf", b""),
                       ("header.gguf", b"GGUF\x03\x00\x00\x00\x01")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="GGUF"):
            LLM(tmp_path / name)

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(tiny_dir, d)
        edit(d)
        return d

    bad_json = variant("badjson", lambda d: (d / "config.json").write_text("{not json"))
    with pytest.raises(ValueError, match="not a usable model config"):
        LLM(bad_json)
    no_key = variant("nokey", lambda d: (d / "config.json").write_text('{"model_type": "llama"}'))
    with pytest.raises(ValueError, match="not a usable model config"):
        LLM(no_key)

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read safetensors"):
        LLM(variant("truncated", truncate))
    with pytest.raises(ValueError, match="cannot read the tokenizer"):
        LLM(variant("badtok", lambda d: (d / "tokenizer.json").write_text("{}")))
    more_layers = dict(TINY, num_hidden_layers=3)
    with pytest.raises(ValueError, match="model.layers.2.input_layernorm.weight is missing"):
        LLM(variant("layers", lambda d: (d / "config.json").write_text(json.dumps(more_layers))))
    wider = dict(TINY, intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(128, 64\); "
                                         r"the config implies \(96, 64\)"):
        LLM(variant("shape", lambda d: (d / "config.json").write_text(json.dumps(wider))))
    odd_head = dict(TINY, head_dim=16, num_attention_heads=8, num_key_value_heads=4)
    with pytest.raises(ValueError, match="head_dim 16 is not one the attention ops support"):
        LLM(variant("head", lambda d: (d / "config.json").write_text(json.dumps(odd_head))))


def test_truncated_default_model_file(tmp_path):
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        for cut in (2_000, 3_000_000, size // 2, size - 100):
            f.seek(0)
            (tmp_path / "cut.gguf").write_bytes(f.read(cut))
            with pytest.raises(ValueError, match="GGUF"):
                LLM(tmp_path / "cut.gguf", backend="eager")


@pytest.mark.parametrize("kw, match", [
    (dict(dtype="int8"), "dtype must be 'auto' or one of"), (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(num_blocks=0), "num_blocks"), (dict(block_size=0), "block_size"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(kv_cache_gb=0), "kv_cache_gb"), (dict(max_model_len=-5), "max_model_len"),
])
def test_bad_engine_arguments(tiny_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_dir, backend="eager", **kw)
