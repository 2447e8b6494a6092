"""The runtime on small random-weight Llama checkpoints written by transformers'
save_pretrained and read back through the Hugging Face directory loader: greedy
tokens and logits against transformers, batching invariance, preemption, the
KV pool, bad input."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernelforge.tolerance import assert_close_rows  # noqa: E402
from kernelforge.runtime import LLM, SamplingParams  # noqa: E402
from runtime_ref import hf_greedy, hf_logits  # noqa: E402

VOCAB = 384
NEW = 32
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
VARIANTS = {
    # GQA 4:2, untied lm_head, llama3 rope scaling
    "untied-llama3": dict(tie_word_embeddings=False, rope_parameters=LLAMA3),
    # GQA 4:1 (MQA-like), tied embeddings, plain rope
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=1,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def _write(path, seed, **kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64,
               max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=None,
               eos_token_id=None, pad_token_id=None)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():   # larger weights than the init: peaked, varied greedy output
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if "norm" in name else 0.25)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (transformers model, LLM over its saved directory), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            ref = _write(path, seed=len(name), **VARIANTS[name])
            cache[name] = ref, LLM(path, backend="eager", dtype="float32", num_blocks=64,
                                   max_num_seqs=16,
                                   max_num_batched_tokens=64)
        return cache[name]
    return get


@pytest.fixture(params=sorted(VARIANTS))
def pair(request, models):
    return models(request.param)


@pytest.fixture
def one(models):
    """The GQA, untied, llama3-scaled variant alone, for the engine tests."""
    return models("untied-llama3")


def _prompts(n, seed=0, lengths=(3, 21, 40, 70)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


def test_greedy_matches_transformers(pair):
    ref, llm = pair
    prompts = _prompts(4)
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        want = hf_greedy(ref, p, NEW)
        assert len(set(want)) > 4, "degenerate reference; the comparison would be weak"
        assert o.token_ids == want
        assert o.finish_reason == "length"
    assert llm.pool.num_free == llm.pool.num_blocks


def test_logits_match_transformers(pair):
    ref, llm = pair
    (p,) = _prompts(1, seed=3, lengths=(50,))
    got, want = llm.prompt_logits(p), hf_logits(ref, p)
    # float32 throughout; different summation orders only
    assert_close_rows(got, want, torch.float32, "prompt logits vs transformers")


def test_batching_invariance(one):
    ref, llm = one
    prompts = _prompts(17, seed=5, lengths=(3, 21, 40, 9, 30))
    alone = llm.generate([prompts[2]], GREEDY)[0].token_ids
    # 17 requests, 64-token budget: chunked prefills share forwards with decode rows
    mixed = llm.generate(prompts, GREEDY)
    assert mixed[2].token_ids == alone == hf_greedy(ref, prompts[2], NEW)
    assert llm.scheduler.num_preemptions == 0
    assert llm.pool.num_free == llm.pool.num_blocks


def test_seeded_sampling_is_batch_invariant_and_follows_the_filters(one):
    """kernelforge.ops.sample keyed by (seed, tokens generated so far): the
    same seeded request gives the same tokens alone or among others; the
    draws vary with the seed; top_k=1 is greedy."""
    ref, llm = one
    prompts = _prompts(6, seed=11)
    seeded = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=1234, max_tokens=12,
                            ignore_eos=True)
    alone = llm.generate([prompts[3]], seeded)[0].token_ids
    mixed = llm.generate(prompts, seeded)
    assert mixed[3].token_ids == alone
    other = llm.generate([prompts[3]], SamplingParams(temperature=1.0, top_k=20, top_p=0.9,
                                                      seed=99, max_tokens=12, ignore_eos=True))
    assert other[0].token_ids != alone
    top1 = llm.generate([prompts[3]], SamplingParams(temperature=1.5, top_k=1, seed=5,
                                                     max_tokens=NEW, ignore_eos=True))
    assert top1[0].token_ids == hf_greedy(ref, prompts[3], NEW)
    assert llm.pool.num_free == llm.pool.num_blocks


def test_penalties_match_a_plain_greedy_loop(one):
    """Greedy under repetition, frequency and presence penalties against
    transformers' logits penalised here by vLLM's rules, one token at a time."""
    ref, llm = one
    (p,) = _prompts(1, seed=13)
    rep, freq, pres, n = 1.5, 0.5, 1.5, NEW
    out = []
    for _ in range(n):
        x = hf_logits(ref, p + out)[-1].double()
        seen = set(p) | set(out)
        for t in seen:
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        for t in set(out):
            x[t] -= freq * out.count(t) + pres
        out.append(int(x.argmax()))
    got = llm.generate([p], SamplingParams(temperature=0, repetition_penalty=rep,
                                           frequency_penalty=freq, presence_penalty=pres,
                                           max_tokens=n, ignore_eos=True))[0].token_ids
    assert got == out
    assert got != llm.generate([p], SamplingParams(temperature=0, max_tokens=n,
                                                   ignore_eos=True))[0].token_ids


def test_logprobs_match_transformers(one):
    """SamplingParams(logprobs=3): per generated token its logprob and the top
    3, from the raw logits, against log_softmax of transformers' logits."""
    ref, llm = one
    (p,) = _prompts(1, seed=17)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                           ignore_eos=True))[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    ids = list(p)
    for tok, (lp, top) in zip(out.token_ids, out.logprobs):
        want = torch.log_softmax(hf_logits(ref, ids)[-1].double(), -1)
        assert abs(lp - float(want[tok])) < 1e-4
        w = torch.topk(want, 3)
        assert list(top) == w.indices.tolist()
        assert max(abs(a - b) for a, b in zip(top.values(), w.values.tolist())) < 1e-4
        ids.append(tok)
    assert llm.generate([p], GREEDY)[0].logprobs is None


def test_prefix_caching_reuses_blocks_and_changes_nothing(one):
    """Prompts sharing a 40-token prefix: the later ones take its cached full
    blocks (counted), the tokens equal transformers' and an uncached engine's,
    and every block is free (cached ones included) afterwards."""
    ref, llm = one
    g = torch.Generator().manual_seed(21)
    shared = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    prompts = [shared + torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 7, 20)]
    llm.generate([shared + [3]], GREEDY)                     # computes and caches the prefix
    before = llm.scheduler.num_cached_tokens
    outs = llm.generate(prompts, GREEDY)
    assert llm.scheduler.num_cached_tokens - before >= 3 * 32   # two full blocks each
    plain = LLM(llm.path, backend="eager", dtype="float32", num_blocks=64, max_num_batched_tokens=64,
                prefix_caching=False)
    for p, o, q in zip(prompts, outs, plain.generate(prompts, GREEDY)):
        assert o.token_ids == q.token_ids == hf_greedy(ref, p, NEW)
    assert plain.scheduler.num_cached_tokens == 0
    assert llm.pool.num_free == llm.pool.num_blocks and llm.pool.num_cached > 0


def test_preemption_recomputes_and_frees_every_block(one):
    ref, llm = one
    prompts = _prompts(5, seed=7)
    want = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    # 12 blocks of 16 cannot hold 5 sequences of up to 102 tokens at once
    small = LLM(llm.path, backend="eager", dtype="float32", num_blocks=12, max_num_seqs=8,
                max_num_batched_tokens=64)
    got = small.generate(prompts, GREEDY)
    assert small.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == want
    assert small.pool.num_free == small.pool.num_blocks


def test_bad_input_leaves_engine_usable(one, tmp_path):
    ref, llm = one
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[1, 2], []], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * llm.max_model_len], GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[VOCAB]], GREEDY)
    for bad in (dict(temperature=-1), dict(max_tokens=0), dict(top_p=0.0), dict(top_k=1.5),
                dict(stop=[""]), dict(logprobs=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(FileNotFoundError):
        LLM(tmp_path / "missing")
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF"):
        LLM(junk)
    assert llm.pool.num_free == llm.pool.num_blocks
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))
    assert len(out[0].token_ids) == 3


@pytest.mark.slow
def test_inductor_backend_matches(one):
    ref, llm = one
    ind = LLM(llm.path, backend="inductor", dtype="float32", num_blocks=48, max_num_batched_tokens=64)
    prompts = _prompts(2, seed=9)
    outs = ind.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(ref, p, NEW)


# -- decode graphs (decode_graphs.py): captured decode steps replayed ----------------


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_decode_graphs_give_transformers_tokens(one, backend):
    """Graphs are the default: decode steps of 5 rows replay the graph of 8
    (3 padding rows); the tokens equal transformers' and an op-by-op engine's."""
    ref, llm = one
    graphs = LLM(llm.path, backend=backend, num_blocks=64, max_num_batched_tokens=64)
    eager = LLM(llm.path, backend=backend, num_blocks=64, max_num_batched_tokens=64,
                enforce_eager=True)
    prompts = _prompts(5, seed=11)
    got = graphs.generate(prompts, GREEDY)
    assert 8 in graphs.graphs.graphs and eager.graphs is None
    for p, a, b in zip(prompts, got, eager.generate(prompts, GREEDY)):
        assert a.token_ids == b.token_ids == hf_greedy(ref, p, NEW)
    assert graphs.pool.num_free == graphs.pool.num_blocks


def test_decode_graph_padding_rows_write_nothing(one):
    """A step of 3 rows runs the graph of 4: the KV cache changes in exactly
    the 3 rows' slots (a padding row's slot is -1), and the logits of a row
    equal the op-by-op forward's."""
    _, llm = one
    bs = llm.block_size
    tables = [[5], [9, 2], [7]]
    positions = [3, 17, 0]
    tokens = [11, 12, 13]
    before = [(k.clone(), v.clone()) for k, v in llm.kv_caches]
    logits = llm.graphs.run(tokens, positions, tables).clone()
    assert 4 in llm.graphs.graphs and logits.shape == (3, VOCAB)
    written = {(t[p // bs], p % bs) for t, p in zip(tables, positions)}
    for (k0, v0), (k1, v1) in zip(before, llm.kv_caches):
        for c0, c1 in ((k0, k1), (v0, v1)):
            changed = (c0 != c1).flatten(2).any(-1).nonzero().tolist()
            assert {tuple(x) for x in changed} == written
    # the same step op by op (the keys just written are what it reads)
    from kernelforge.runtime.model import AttnMetadata
    slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
    meta = AttnMetadata(torch.tensor(slots), torch.tensor([[5, 0], [9, 2], [7, 0]],
                                                          dtype=torch.int32),
                        torch.tensor([p + 1 for p in positions], dtype=torch.int32),
                        torch.arange(4, dtype=torch.int32))
    want = llm.model.forward(torch.tensor(tokens), torch.tensor(positions), meta, llm.kv_caches)
    # float32; the graph's matmuls run 4 rows, these 3 (another GEMM kernel)
    assert_close_rows(logits, want, torch.float32, "decode graph vs op by op")


def test_decode_graph_checks_positions_and_tables(one):
    _, llm = one
    with pytest.raises(ValueError, match="position 600 outside"):
        llm.graphs.run([1], [600], [[0]])
    with pytest.raises(ValueError, match="does not hold position 20"):
        llm.graphs.run([1], [20], [[3]])
    with pytest.raises(ValueError, match="does not hold position 3"):
        llm.graphs.run([1], [3], [[64]])
    with pytest.raises(ValueError, match="enforce_eager must be a bool"):
        LLM(llm.path, enforce_eager="yes")


def test_capture_sizes():
    from kernelforge.runtime.decode_graphs import capture_sizes
    assert capture_sizes(1) == [1]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
