"""attention, paged_attention and reshape_and_cache: bad input gets an error
naming the argument, the expectation and what was given; zero-length
sequences produce no rows and leave their neighbours alone; block-table
entries a sequence does not use are never looked at."""
import pytest
import torch

import kernelforge
from kernelforge.checks import OpArgError

D = 64
NB, BS = 4, 16          # paged cache: 4 blocks of 16 tokens


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


def packed(q_lens=(2, 3), k_lens=None, hq=4, hkv=2, d=D, dtype=torch.float32, seed=0):
    """q, k, v, cu_seqlens_q, cu_seqlens_k for sequences of the given lengths."""
    k_lens = q_lens if k_lens is None else k_lens
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(q_lens), sum(k_lens)
    q = torch.randn(tq, hq, d, generator=g).to(dtype)
    k = torch.randn(tk, hkv, d, generator=g).to(dtype)
    v = torch.randn(tk, hkv, d, generator=g).to(dtype)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls, dtype=torch.int64).cumsum(0).tolist()],
                                 dtype=torch.int32)
    return q, k, v, cu(q_lens), cu(k_lens)


def attn(q, k, v, cq, ck, **kw):
    kw.setdefault("backend", "eager")
    return kernelforge.ops.attention(q, k, v, cq, ck, **kw)


def paged(q_lens=(1, 4), seq_lens=(3, 20), tables=((0, 1), (2, 3)), hq=4, hkv=2, d=D,
          dtype=torch.float32, seed=0):
    """q, key_cache, value_cache, block_tables, seq_lens, query_start_loc."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    kc = torch.randn(NB, BS, hkv, d, generator=g).to(dtype)
    vc = torch.randn(NB, BS, hkv, d, generator=g).to(dtype)
    bt = torch.tensor(tables, dtype=torch.int32).reshape(len(q_lens), -1)
    qsl = torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()],
                       dtype=torch.int32)
    return q, kc, vc, bt, torch.tensor(seq_lens, dtype=torch.int32), qsl


def pattn(q, kc, vc, bt, sl, qsl, **kw):
    kw.setdefault("backend", "eager")
    return kernelforge.ops.paged_attention(q, kc, vc, bt, sl, qsl, **kw)


def cache_args(T=3, hkv=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    key = torch.randn(T, hkv, D, generator=g).to(dtype)
    value = torch.randn(T, hkv, D, generator=g).to(dtype)
    kc = torch.zeros(NB, BS, hkv, D, dtype=dtype)
    vc = torch.zeros(NB, BS, hkv, D, dtype=dtype)
    slots = torch.tensor([0, 17, -1, 40, 63, 5][:T], dtype=torch.int64)
    return key, value, kc, vc, slots


def rc(key, value, kc, vc, slots, **kw):
    kw.setdefault("backend", "eager")
    return kernelforge.ops.reshape_and_cache(key, value, kc, vc, slots, **kw)


# -- attention (packed varlen) ------------------------------------------------------------

def test_attention_heads_not_a_multiple_of_kv_heads():
    q, k, v, cq, ck = packed(hq=3, hkv=2)
    with pytest.raises(OpArgError, match=r"^attention: `q` expected a number of heads that is "
                                         r"a multiple of the 2 kv heads, got 3 heads"):
        attn(q, k, v, cq, ck)


@pytest.mark.parametrize("d", [32, 65, 100, 512])
def test_attention_unsupported_head_size(d):
    q, k, v, cq, ck = packed(d=d)
    with pytest.raises(OpArgError, match=rf"`q` expected a head size in \(64, 80, 96, 128, "
                                         rf"256\), got head size {d}"):
        attn(q, k, v, cq, ck)


def test_attention_head_size_mismatch_between_q_and_kv():
    q, k, v, cq, ck = packed()
    k80, v80 = torch.randn(5, 2, 80), torch.randn(5, 2, 80)
    with pytest.raises(OpArgError, match=r"`k` expected head size 64 \(the last dim of `q`\), "
                                         r"got \[5, 2, 80\]"):
        attn(q, k80, v, cq, ck)
    with pytest.raises(OpArgError, match=r"`v` expected head size 64 \(the last dim of `q`\), "
                                         r"got \[5, 2, 80\]"):
        attn(q, k, v80, cq, ck)


def test_attention_k_v_shape_mismatch():
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=r"`v` expected shape \[5, 2, 64\] \(the shape of `k`\), "
                                         r"got \[5, 1, 64\]"):
        attn(q, k, v[:, :1], cq, ck)
    with pytest.raises(OpArgError, match=r"`v` expected shape \[5, 2, 64\] \(the shape of `k`\), "
                                         r"got \[4, 2, 64\]"):
        attn(q, k, v[:4], cq, ck)


def test_attention_q_not_3d():
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=r"`q` expected \[tokens, q_heads, head_size\], "
                                         r"got \[5, 256\]"):
        attn(q.reshape(5, -1), k, v, cq, ck)
    with pytest.raises(OpArgError, match=r"`q` expected \[tokens, q_heads, head_size\], "
                                         r"got \[1, 5, 4, 64\]"):
        attn(q[None], k, v, cq, ck)


def test_attention_k_4d():
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=r"`k` expected \[tokens, kv_heads, head_size\], "
                                         r"got \[1, 5, 2, 64\]"):
        attn(q, k[None], v[None], cq, ck)


@pytest.mark.parametrize("shape", [(D,), (5, D)])
def test_attention_k_too_few_dims(shape):
    q, _, _, cq, ck = packed()
    k, v = torch.randn(shape), torch.randn(shape)
    with pytest.raises(OpArgError, match=r"`k` expected \[tokens, kv_heads, head_size\], "
                                         r"got \[" + ", ".join(map(str, shape)) + r"\]"):
        attn(q, k, v, cq, ck)


def test_attention_zero_kv_heads():
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=r"`k` expected .*at least 1 kv head.*got"):
        attn(q, k[:, :0], v[:, :0], cq, ck)


def test_attention_mismatched_dtypes():
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=r"`k` expected dtype torch.float32 \(the dtype of "
                                         r"`q`\), got torch.bfloat16"):
        attn(q, k.bfloat16(), v, cq, ck)
    with pytest.raises(OpArgError, match=r"`v` expected dtype torch.float32 \(the dtype of "
                                         r"`q`\), got torch.float16"):
        attn(q, k, v.half(), cq, ck)
    with pytest.raises(OpArgError, match=r"`q` expected dtype float32, bfloat16 or float16, "
                                         r"got torch.float64"):
        attn(q.double(), k.double(), v.double(), cq, ck)


def test_attention_mismatched_devices():
    q, k, v, cq, ck = packed()
    meta = torch.device("meta")
    for name, args in (("k", (q, k.to(meta), v, cq, ck)), ("v", (q, k, v.to(meta), cq, ck)),
                       ("cu_seqlens_q", (q, k, v, cq.to(meta), ck)),
                       ("cu_seqlens_k", (q, k, v, cq, ck.to(meta)))):
        with pytest.raises(OpArgError, match=rf"^attention: `{name}` expected a tensor on cpu "
                                             rf"\(where `q` is\), got one on meta"):
            attn(*args)
    with pytest.raises(OpArgError, match=r"`k` expected a tensor on meta \(where `q` is\), "
                                         r"got one on cpu"):
        attn(q.to(meta), k, v, cq, ck)


@pytest.mark.parametrize("arg", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_that_decrease(arg):
    q, k, v, _, _ = packed(q_lens=(2, 1, 2))
    good, bad = i32(0, 2, 3, 5), i32(0, 3, 2, 5)
    cq, ck = (bad, good) if arg == "cu_seqlens_q" else (good, bad)
    with pytest.raises(OpArgError, match=rf"`{arg}` expected non-decreasing offsets, "
                                         rf"got 3 then 2 at index 2"):
        attn(q, k, v, cq, ck)


@pytest.mark.parametrize("arg", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_not_starting_at_zero(arg):
    q, k, v, cq, ck = packed()
    bad = i32(1, 2, 5)
    args = (q, k, v, bad, ck) if arg == "cu_seqlens_q" else (q, k, v, cq, bad)
    with pytest.raises(OpArgError, match=rf"`{arg}` expected to start at 0, got 1"):
        attn(*args)


def test_cu_seqlens_not_ending_at_the_token_count():
    q, k, v, cq, ck = packed()                    # 5 tokens each
    with pytest.raises(OpArgError, match=r"`cu_seqlens_q` expected to end at 5 \(the tokens in "
                                         r"`q`\), got 4"):
        attn(q, k, v, i32(0, 2, 4), ck)
    with pytest.raises(OpArgError, match=r"`cu_seqlens_k` expected to end at 5 \(the tokens in "
                                         r"`k`\), got 6"):
        attn(q, k, v, cq, i32(0, 2, 6))


def test_cu_seqlens_wrong_dtype_or_rank():
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=r"`cu_seqlens_q` expected a 1-D int32 tensor "
                                         r"\[batch \+ 1\] \(at least one entry\), got torch.float32 of shape \[3\]"):
        attn(q, k, v, cq.float(), ck)
    with pytest.raises(OpArgError, match=r"`cu_seqlens_k` expected a 1-D int32 tensor "
                                         r"\[batch \+ 1\] \(at least one entry\), got torch.int16 of shape"):
        attn(q, k, v, cq, ck.short())
    with pytest.raises(OpArgError, match=r"`cu_seqlens_q` expected a 1-D int32 tensor "
                                         r"\[batch \+ 1\] \(at least one entry\), got torch.int32 of shape \[1, 3\]"):
        attn(q, k, v, cq[None], ck)
    with pytest.raises(OpArgError, match=r"`cu_seqlens_k` expected a torch.Tensor, got list"):
        attn(q, k, v, cq, [0, 2, 5])


def test_cu_seqlens_empty():
    q, k, v, cq, ck = packed(q_lens=(0,))
    with pytest.raises(OpArgError, match=r"`cu_seqlens_q` expected .*got .*(\[0\]|empty|"
                                         r"0 entries)"):
        attn(q, k, v, cq[:0], ck)


def test_cu_seqlens_of_different_batch_sizes():
    q, k, v, _, _ = packed()
    with pytest.raises(OpArgError, match=r"`cu_seqlens_k` expected 3 entries \(as "
                                         r"`cu_seqlens_q`\), got 4"):
        attn(q, k, v, i32(0, 2, 5), i32(0, 2, 2, 5))


@pytest.mark.parametrize("window", [-1, 2.0, "4", True])
def test_attention_bad_window(window):
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=r"`window` expected None or an int >= 0 .*, got "
                                         + repr(window).replace(".", r"\.")):
        attn(q, k, v, cq, ck, window=window)


@pytest.mark.parametrize("name", ["softcap", "scale"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "1"])
def test_attention_softcap_and_scale_must_be_positive(name, value):
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=rf"^attention: `{name}` expected a number > 0, "
                                         rf"got {repr(value)}"):
        attn(q, k, v, cq, ck, **{name: value})


def test_attention_causal_not_a_bool():
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=r"`causal` expected a bool, got 'no'"):
        attn(q, k, v, cq, ck, causal="no")


@pytest.mark.parametrize("value", [1, "yes", 0.0])
def test_round_p_must_be_none_or_a_bool(value):
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=rf"^attention: `round_p` expected None or a bool, "
                                         rf"got {repr(value)}"):
        attn(q, k, v, cq, ck, round_p=value)
    q, kc, vc, bt, sl, qsl = paged()
    with pytest.raises(OpArgError, match=rf"^paged_attention: `round_p` expected None or a "
                                         rf"bool, got {repr(value)}"):
        pattn(q, kc, vc, bt, sl, qsl, round_p=value)


def test_attention_unknown_backend():
    q, k, v, cq, ck = packed()
    with pytest.raises(ValueError, match=r"backend: expected one of .* got .nope."):
        attn(q, k, v, cq, ck, backend="nope")
    q, k, v, cq, ck = packed(q_lens=())           # checked even when there is nothing to do
    with pytest.raises(ValueError, match=r"backend: expected one of .* got .nope."):
        attn(q, k, v, cq, ck, backend="nope")


@pytest.mark.parametrize("q_lens,k_lens", [((), ()), ((0,), (0,)), ((0, 0, 0), (0, 0, 0)),
                                           ((0, 0), (3, 2))])
def test_attention_zero_tokens(q_lens, k_lens):
    q, k, v, cq, ck = packed(q_lens=q_lens, k_lens=k_lens, hq=4, hkv=2)
    out = attn(q, k, v, cq, ck)
    assert out.shape == (0, 4, D) and out.dtype == q.dtype


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("empty_k", [0, 4])       # the empty query's keys: none, or 4 of them
def test_attention_zero_length_sequence_in_the_middle(causal, empty_k):
    """A sequence with no query rows in the middle of the batch gives no rows,
    and its neighbours' rows are those of the batch without it."""
    q, k, v, cq, ck = packed(q_lens=(2, 0, 3), k_lens=(3, empty_k, 5), seed=1)
    out = attn(q, k, v, cq, ck, causal=causal)
    assert out.shape == (5, 4, D)
    keep = torch.cat((torch.arange(3), torch.arange(3 + empty_k, 8 + empty_k)))
    want = attn(q, k[keep], v[keep], i32(0, 2, 5), i32(0, 3, 8), causal=causal)
    # a longer key axis may change the rounding of the torch lowering's one masked pass
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert out.abs().sum(dim=(1, 2)).gt(0).all()   # every real row saw keys


@pytest.mark.parametrize("backend", ["cpp", "triton", "eager"])
def test_unchecked_seqlens_make_no_host_copy_and_read_nothing_outside(backend, monkeypatch):
    """check_seqlens=False: good offsets give the checked call's result
    exactly; bad ones (decreasing, past the tokens, negative) raise nothing
    and write only the output's rows (the result is undefined, like
    paged_attention's check_tables=False). The lowerings that keep the key
    loop (Triton, C++) copy nothing to the host; the torch lowerings plan
    their launches on the host, so they check anyway."""
    q, k, v, cq, ck = packed(q_lens=(2, 3), k_lens=(4, 6), seed=2)
    want = attn(q, k, v, cq, ck, backend=backend)
    if backend != "eager":
        def no_sync(*a, **kw):
            raise AssertionError("host copy with check_seqlens=False")
        monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
        monkeypatch.setattr(torch.Tensor, "item", no_sync)
    got = attn(q, k, v, cq, ck, check_seqlens=False, backend=backend)
    assert torch.equal(got, want)
    if backend == "eager":
        with pytest.raises(OpArgError, match="`cu_seqlens_q` expected non-decreasing"):
            attn(q, k, v, i32(0, 4, 2), ck, check_seqlens=False, backend=backend)
        return
    for bad_q, bad_k in ((i32(0, 4, 2), ck), (cq, i32(0, 9, 100)), (i32(-3, 1, 5), i32(0, -7, 10)),
                         (i32(0, 2, 5), i32(5, 2, 0))):
        out = attn(q, k, v, bad_q, bad_k, check_seqlens=False, backend=backend)
        assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
    # the first sequence's keys "start" at -6: all its key positions are below
    # 0, so its rows see no key (0), and nothing before k is read
    out = attn(q, k, v, cq, i32(-6, -3, 10), check_seqlens=False, backend=backend)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))


def test_check_seqlens_must_be_a_bool():
    q, k, v, cq, ck = packed()
    with pytest.raises(OpArgError, match=r"`check_seqlens` expected a bool, got 'no'"):
        attn(q, k, v, cq, ck, check_seqlens="no")


# -- paged_attention ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, NB, 10 ** 6])
def test_block_table_entry_outside_the_cache(bad):
    q, kc, vc, bt, sl, qsl = paged()
    bt[1, 1] = bad                                # sequence 1 (20 tokens) uses both its blocks
    with pytest.raises(OpArgError, match=rf"`block_tables` expected block numbers in \[0, {NB}\) "
                                         rf"\(the blocks of the cache\) for every block a "
                                         rf"sequence uses, got block {bad}"):
        pattn(q, kc, vc, bt, sl, qsl)


@pytest.mark.parametrize("bad", [33, 10 ** 6, -1])
def test_seq_lens_beyond_the_blocks_given(bad):
    q, kc, vc, bt, sl, qsl = paged()
    sl[0] = bad                                   # 2 blocks of 16 = 32 tokens at most
    with pytest.raises(OpArgError, match=rf"`seq_lens` expected lengths in \[0, 32\] \(the 2 "
                                         rf"blocks of 16 tokens `block_tables` gives each "
                                         rf"sequence\), got length {bad}"):
        pattn(q, kc, vc, bt, sl, qsl)


def test_new_tokens_exceed_seq_len():
    q, kc, vc, bt, sl, qsl = paged(q_lens=(1, 4), seq_lens=(3, 3))
    with pytest.raises(OpArgError, match=r"`seq_lens` expected at least the 4 new tokens of "
                                         r"sequence 1 \(from `query_start_loc`\), got 3"):
        pattn(q, kc, vc, bt, sl, qsl)


def test_query_start_loc_and_seq_lens_of_different_batch_sizes():
    q, kc, vc, bt, sl, qsl = paged()
    with pytest.raises(OpArgError, match=r"`seq_lens` expected a 1-D int32 tensor with 2 rows "
                                         r"\(one per sequence in `query_start_loc`\), got 1-D "
                                         r"torch.int32 \[3\]"):
        pattn(q, kc, vc, bt, i32(3, 20, 5), qsl)
    with pytest.raises(OpArgError, match=r"`block_tables` expected a 2-D int32 tensor with 2 "
                                         r"rows .*got 2-D torch.int32 \[1, 2\]"):
        pattn(q, kc, vc, bt[:1], sl, qsl)
    with pytest.raises(OpArgError, match=r"`block_tables` expected a 2-D int32 tensor with 2 "
                                         r"rows .*got 1-D torch.int32 \[2\]"):
        pattn(q, kc, vc, bt[0], sl, qsl)
    with pytest.raises(OpArgError, match=r"`seq_lens` expected a 1-D int32 tensor .*got 1-D "
                                         r"torch.float32 \[2\]"):
        pattn(q, kc, vc, bt, sl.float(), qsl)


def test_query_start_loc_bad():
    q, kc, vc, bt, sl, qsl = paged(q_lens=(1, 4))
    with pytest.raises(OpArgError, match=r"`query_start_loc` expected non-decreasing offsets, "
                                         r"got 3 then 1 at index 2"):
        pattn(q, kc, vc, bt, sl, i32(0, 3, 1))
    with pytest.raises(OpArgError, match=r"`query_start_loc` expected to end at 5 \(the tokens "
                                         r"in `q`\), got 4"):
        pattn(q, kc, vc, bt, sl, i32(0, 1, 4))
    with pytest.raises(OpArgError, match=r"`query_start_loc` expected a 1-D int32 tensor "
                                         r"\[batch \+ 1\] \(at least one entry\), got torch.float32 of shape \[3\]"):
        pattn(q, kc, vc, bt, sl, qsl.float())


def test_paged_heads_head_size_and_shapes():
    q, kc, vc, bt, sl, qsl = paged(hq=3, hkv=2)
    with pytest.raises(OpArgError, match=r"^paged_attention: `q` expected a number of heads that "
                                         r"is a multiple of the 2 kv heads, got 3 heads"):
        pattn(q, kc, vc, bt, sl, qsl)
    q, kc, vc, bt, sl, qsl = paged(d=48)
    with pytest.raises(OpArgError, match=r"`q` expected a head size in \(64, 80, 96, 128, 256\), "
                                         r"got head size 48"):
        pattn(q, kc, vc, bt, sl, qsl)
    q, kc, vc, bt, sl, qsl = paged()
    with pytest.raises(OpArgError, match=r"`key_cache` expected head size 64 \(the last dim of "
                                         r"`q`\), got \[4, 16, 2, 80\]"):
        pattn(q, torch.randn(NB, BS, 2, 80), vc, bt, sl, qsl)
    with pytest.raises(OpArgError, match=r"`value_cache` expected shape \[4, 16, 2, 64\] \(the "
                                         r"shape of `key_cache`\), got \[4, 8, 2, 64\]"):
        pattn(q, kc, vc[:, :8], bt, sl, qsl)
    with pytest.raises(OpArgError, match=r"`key_cache` expected \[num_blocks, block_size, "
                                         r"kv_heads, head_size\], got \[1, 4, 16, 2, 64\]"):
        pattn(q, kc[None], vc[None], bt, sl, qsl)
    with pytest.raises(OpArgError, match=r"`q` expected \[tokens, q_heads, head_size\], "
                                         r"got \[5, 256\]"):
        pattn(q.reshape(5, -1), kc, vc, bt, sl, qsl)


@pytest.mark.parametrize("shape", [(NB, BS, D), (D,)])
def test_paged_key_cache_too_few_dims(shape):
    q, _, _, bt, sl, qsl = paged()
    kc, vc = torch.randn(shape), torch.randn(shape)
    with pytest.raises(OpArgError, match=r"`key_cache` expected \[num_blocks, block_size, "
                                         r"kv_heads, head_size\], got \["
                                         + ", ".join(map(str, shape)) + r"\]"):
        pattn(q, kc, vc, bt, sl, qsl)


def test_paged_mismatched_dtypes():
    q, kc, vc, bt, sl, qsl = paged()
    with pytest.raises(OpArgError, match=r"`key_cache` expected dtype torch.float32 \(the dtype "
                                         r"of `q`\), got torch.bfloat16"):
        pattn(q, kc.bfloat16(), vc, bt, sl, qsl)
    with pytest.raises(OpArgError, match=r"`value_cache` expected dtype torch.float32 \(the "
                                         r"dtype of `q`\), got torch.float16"):
        pattn(q, kc, vc.half(), bt, sl, qsl)
    with pytest.raises(OpArgError, match=r"`block_tables` expected a 2-D int32 tensor .*got "
                                         r"2-D torch.float32"):
        pattn(q, kc, vc, bt.float(), sl, qsl)


def test_paged_mismatched_devices():
    q, kc, vc, bt, sl, qsl = paged()
    m = lambda t: t.to("meta")
    for name, args in (("key_cache", (q, m(kc), vc, bt, sl, qsl)),
                       ("value_cache", (q, kc, m(vc), bt, sl, qsl)),
                       ("block_tables", (q, kc, vc, m(bt), sl, qsl)),
                       ("seq_lens", (q, kc, vc, bt, m(sl), qsl)),
                       ("query_start_loc", (q, kc, vc, bt, sl, m(qsl)))):
        with pytest.raises(OpArgError, match=rf"^paged_attention: `{name}` expected a tensor on "
                                             rf"cpu \(where `q` is\), got one on meta"):
            pattn(*args)


def test_paged_bad_window_softcap_scale_backend():
    q, kc, vc, bt, sl, qsl = paged()
    with pytest.raises(OpArgError, match=r"`window` expected None or an int >= 0 .*got -3"):
        pattn(q, kc, vc, bt, sl, qsl, window=-3)
    with pytest.raises(OpArgError, match=r"`window` expected None or an int >= 0 .*got 1\.5"):
        pattn(q, kc, vc, bt, sl, qsl, window=1.5)
    with pytest.raises(OpArgError, match=r"`softcap` expected a number > 0, got 0"):
        pattn(q, kc, vc, bt, sl, qsl, softcap=0)
    with pytest.raises(OpArgError, match=r"`scale` expected a number > 0, got -0\.125"):
        pattn(q, kc, vc, bt, sl, qsl, scale=-0.125)
    with pytest.raises(ValueError, match=r"backend: expected one of .* got .nope."):
        pattn(q, kc, vc, bt, sl, qsl, backend="nope")


@pytest.mark.parametrize("garbage", [-7, NB, 10 ** 6])
@pytest.mark.parametrize("window", [None, 2])
def test_unused_block_table_entries_are_ignored(garbage, window):
    """Entries past the blocks a sequence's length needs may hold anything."""
    # seq 0: 3 tokens (block 0 only); seq 1: 20 tokens (blocks 2, 3); seq 2: 0 tokens
    q, kc, vc, bt, sl, qsl = paged(q_lens=(1, 4, 0), seq_lens=(3, 20, 0),
                                   tables=((0, 1, 1), (2, 3, 0), (1, 2, 3)), seed=2)
    want = pattn(q, kc, vc, torch.where(torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1]]).bool(),
                                        0, bt), sl, qsl, window=window)
    bt[0, 1:] = garbage
    bt[1, 2] = garbage
    bt[2, :] = garbage
    for check_tables in (True, False):
        got = pattn(q, kc, vc, bt, sl, qsl, window=window, check_tables=check_tables)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_check_tables_false_with_valid_tables_is_the_same(causal):
    q, kc, vc, bt, sl, qsl = paged(seed=3)
    want = pattn(q, kc, vc, bt, sl, qsl, causal=causal)
    got = pattn(q, kc, vc, bt, sl, qsl, causal=causal, check_tables=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got64 = pattn(q, kc, vc, bt.long(), sl.long(), qsl.long(), causal=causal)
    torch.testing.assert_close(got64, want, rtol=0, atol=0)


@pytest.mark.parametrize("B", [0, 2])
def test_paged_zero_tokens(B):
    q, kc, vc, bt, sl, qsl = paged(q_lens=(0, 0), seq_lens=(0, 5))
    bt, sl, qsl = bt[:B], sl[:B], qsl[:B + 1]
    for check_tables in (True, False):
        out = pattn(q, kc, vc, bt, sl, qsl, check_tables=check_tables)
        assert out.shape == (0, 4, D) and out.dtype == q.dtype


def test_paged_zero_length_sequence_in_the_middle():
    """A sequence with no context and no new tokens (its table row unused,
    here garbage) gives no rows; a decode sequence with context but no new
    tokens gives none either; the others' rows are those of the batch without
    them."""
    q, kc, vc, bt, sl, qsl = paged(q_lens=(1, 0, 0, 4), seq_lens=(3, 0, 9, 20),
                                   tables=((0, 1), (-5, 10 ** 6), (1, 0), (2, 3)), seed=4)
    out = pattn(q, kc, vc, bt, sl, qsl)
    assert out.shape == (5, 4, D)
    want = pattn(q, kc, vc, bt[[0, 3]], sl[[0, 3]], i32(0, 1, 5))
    torch.testing.assert_close(out, want, rtol=0, atol=0)


# -- reshape_and_cache --------------------------------------------------------------------

@pytest.mark.parametrize("bad", [NB * BS, 10 ** 9, -2, -(10 ** 9)])
def test_slot_out_of_range(bad):
    key, value, kc, vc, slots = cache_args()
    slots[1] = bad
    with pytest.raises(OpArgError, match=rf"`slot_mapping` expected -1 or a slot in \[0, 64\) "
                                         rf"\(num_blocks x block_size\), got slot {bad}"):
        rc(key, value, kc, vc, slots)
    assert not kc.any() and not vc.any()          # nothing written before the error


def test_slot_mapping_wrong_length_dtype_or_device():
    key, value, kc, vc, slots = cache_args(T=3)
    with pytest.raises(OpArgError, match=r"`key` expected \[2, 2, 64\] \(tokens as in "
                                         r"`slot_mapping`, .*\), got \[3, 2, 64\]"):
        rc(key, value, kc, vc, slots[:2])
    with pytest.raises(OpArgError, match=r"`key` expected \[4, 2, 64\] .*got \[3, 2, 64\]"):
        rc(key, value, kc, vc, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(OpArgError, match=r"`slot_mapping` expected a 1-D int64 or int32 tensor "
                                         r"\[tokens\], got 1-D torch.float32"):
        rc(key, value, kc, vc, slots.float())
    with pytest.raises(OpArgError, match=r"`slot_mapping` expected a 1-D int64 or int32 tensor "
                                         r"\[tokens\], got 2-D torch.int64"):
        rc(key, value, kc, vc, slots[None])
    with pytest.raises(OpArgError, match=r"`slot_mapping` expected a tensor on cpu \(where "
                                         r"`key_cache` is\), got one on meta"):
        rc(key, value, kc, vc, slots.to("meta"))


def test_reshape_and_cache_dtypes_and_devices():
    key, value, kc, vc, slots = cache_args()
    with pytest.raises(OpArgError, match=r"`key` expected dtype torch.float32 \(the dtype of "
                                         r"`key_cache`\), got torch.bfloat16"):
        rc(key.bfloat16(), value, kc, vc, slots)
    with pytest.raises(OpArgError, match=r"`value` expected dtype torch.float32 \(the dtype of "
                                         r"`key_cache`\), got torch.float16"):
        rc(key, value.half(), kc, vc, slots)
    with pytest.raises(OpArgError, match=r"`value_cache` expected dtype torch.float32 \(the "
                                         r"dtype of `key_cache`\), got torch.float16"):
        rc(key, value, kc, vc.half(), slots)
    with pytest.raises(OpArgError, match=r"`key_cache` expected dtype float32, bfloat16 or "
                                         r"float16, got torch.int32"):
        rc(key, value, kc.int(), vc.int(), slots)
    for name, args in (("key", (key.to("meta"), value, kc, vc, slots)),
                       ("value", (key, value.to("meta"), kc, vc, slots)),
                       ("value_cache", (key, value, kc, vc.to("meta"), slots))):
        with pytest.raises(OpArgError, match=rf"^reshape_and_cache: `{name}` expected a tensor "
                                             rf"on cpu \(where `key_cache` is\), got one on meta"):
            rc(*args)
    assert not kc.any() and not vc.any()


def test_reshape_and_cache_shapes_and_backend():
    key, value, kc, vc, slots = cache_args()
    with pytest.raises(OpArgError, match=r"`key` expected \[3, 2, 64\] .*got \[3, 1, 64\]"):
        rc(key[:, :1], value, kc, vc, slots)
    with pytest.raises(OpArgError, match=r"`value` expected \[3, 2, 64\] .*got \[3, 100\]"):
        rc(key, value.reshape(3, -1)[:, :100], kc, vc, slots)
    with pytest.raises(OpArgError, match=r"`value_cache` expected shape \[4, 16, 2, 64\] \(the "
                                         r"shape of `key_cache`\), got \[3, 16, 2, 64\]"):
        rc(key, value, kc, vc[:3], slots)
    with pytest.raises(OpArgError, match=r"`key_cache` expected \[num_blocks, block_size, "
                                         r"kv_heads, head_size\], got \[64, 2, 64\]"):
        rc(key, value, kc.view(-1, 2, D), vc.view(-1, 2, D), slots)
    with pytest.raises(ValueError, match=r"backend: expected one of .* got .nope."):
        rc(key, value, kc, vc, slots, backend="nope")
    assert not kc.any() and not vc.any()


def test_reshape_and_cache_zero_tokens_and_padding():
    key, value, kc, vc, slots = cache_args(T=0)
    rc(key, value, kc, vc, slots)
    assert not kc.any() and not vc.any()
    key, value, kc, vc, _ = cache_args(T=3)
    rc(key, value, kc, vc, torch.tensor([-1, 17, -1]))     # -1 is padding: not written
    assert torch.equal(kc[1, 1], key[1]) and torch.equal(vc[1, 1], value[1])
    assert kc.abs().sum(dim=(2, 3)).ne(0).sum() == 1


@pytest.mark.parametrize("splits", [0, -1, 65, 2.0, True, "4"])
def test_paged_bad_splits(splits):
    q, kc, vc, bt, sl, qsl = paged()
    with pytest.raises(OpArgError, match=r"^paged_attention: `splits` expected None or an int "
                                         r"in \[1, 64\]"):
        pattn(q, kc, vc, bt, sl, qsl, splits=splits)


@pytest.mark.parametrize("splits", [1, 2, 64])
def test_paged_splits_are_the_same_result(splits):
    """More splits than keys leaves empty splits; the result does not change
    beyond fp32 summation order."""
    q, kc, vc, bt, sl, qsl = paged(seed=5)
    want = pattn(q, kc, vc, bt, sl, qsl, splits=1)
    got = pattn(q, kc, vc, bt, sl, qsl, splits=splits)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_unchecked_offsets_that_do_not_add_up_read_nothing_outside():
    """check_tables=False skips every host check (no sync): offsets that do
    not sum to the tokens give an undefined result, but a result of the
    right shape, from inside the cache."""
    q, kc, vc, bt, sl, qsl = paged()
    for bad in (i32(0, 3, 9), i32(0, 0, 0), i32(0, 5, 2)):
        out = pattn(q, kc, vc, bt, sl, bad, check_tables=False)
        assert out.shape == q.shape and bool(torch.isfinite(out).all())
        with pytest.raises(OpArgError, match="`query_start_loc`"):
            pattn(q, kc, vc, bt, sl, bad)


@pytest.mark.parametrize("backend", ["eager", "inductor", "cpp"])
def test_reshape_and_cache_all_padding_writes_nothing(backend):
    """Every slot -1: the masked scatter (no boolean selection: masked lanes
    rewrite the first real lane's write, or here, lane 0's own old value)
    leaves a random cache bit-identical."""
    g = torch.Generator().manual_seed(4)
    key, value = torch.randn(3, 2, D, generator=g), torch.randn(3, 2, D, generator=g)
    kc, vc = torch.randn(NB, BS, 2, D, generator=g), torch.randn(NB, BS, 2, D, generator=g)
    k0, v0 = kc.clone(), vc.clone()
    kernelforge.ops.reshape_and_cache(key, value, kc, vc, torch.tensor([-1, -1, -1]),
                                      backend=backend)
    assert torch.equal(kc, k0) and torch.equal(vc, v0)
    kernelforge.ops.reshape_and_cache(key, value, kc, vc, torch.tensor([-1, 5, -1]),
                                      backend=backend)
    k0.view(-1, 2, D)[5], v0.view(-1, 2, D)[5] = key[1], value[1]
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


# -- aliased arguments ---------------------------------------------------------------------

def test_paged_key_cache_and_value_cache_must_differ():
    """One tensor (or overlapping views) cannot be both caches; two halves of
    one [2, num_blocks, ...] buffer (vLLM's layout) can."""
    q, kc, vc, bt, sl, qsl = paged()
    with pytest.raises(OpArgError, match=r"^paged_attention: `value_cache` expected memory "
                                         r"apart from `key_cache` .*got the same tensor"):
        pattn(q, kc, kc, bt, sl, qsl)
    both = torch.randn(NB + 1, BS, 2, D)
    with pytest.raises(OpArgError, match=r"`value_cache` expected memory apart from "
                                         r"`key_cache` .*got a tensor that overlaps"):
        pattn(q, both[:NB], both[1:], bt, sl, qsl)
    kv = torch.stack([kc, vc])
    torch.testing.assert_close(pattn(q, kv[0], kv[1], bt, sl, qsl), pattn(q, kc, vc, bt, sl, qsl),
                               rtol=0, atol=0)


def test_reshape_and_cache_refuses_aliased_caches_and_inputs():
    """The caches are written: they may not be one tensor, overlap each
    other, or overlap the rows being written into them. Keys and values
    sliced from one fused projection (disjoint views) are legal."""
    key, value, kc, vc, slots = cache_args()
    with pytest.raises(OpArgError, match=r"^reshape_and_cache: `value_cache` expected memory "
                                         r"apart from `key_cache` .*got the same tensor"):
        rc(key, value, kc, kc, slots)
    both = torch.zeros(NB + 1, BS, 2, D)
    with pytest.raises(OpArgError, match=r"`value_cache` expected memory apart from "
                                         r"`key_cache` .*got a tensor that overlaps"):
        rc(key, value, both[:NB], both[1:], slots)
    # key rows read from the cache being written: block 0 of the key cache as `key`
    with pytest.raises(OpArgError, match=r"^reshape_and_cache: `key_cache` expected memory of "
                                         r"its own \(the op writes it while reading `key`\)"):
        rc(kc.view(-1, 2, D)[:3], value, kc, vc, slots)
    with pytest.raises(OpArgError, match=r"`value_cache` expected memory of its own \(the op "
                                         r"writes it while reading `value`\)"):
        rc(key, vc.view(-1, 2, D)[10:13], kc, vc, slots)
    with pytest.raises(OpArgError, match=r"`key_cache` expected memory of its own \(the op "
                                         r"writes it while reading `value`\)"):
        rc(key, kc.view(-1, 2, D)[5:8], kc, vc, slots)
    assert not kc.any() and not vc.any()
    # k and v sliced from one qkv projection: disjoint strided views, accepted
    qkv = torch.randn(3, 3 * 2 * D)
    k, v = qkv[:, 2 * D:4 * D], qkv[:, 4 * D:]
    rc(k, v, kc, vc, slots)
    assert torch.equal(kc[1, 1], k[1].view(2, D)) and torch.equal(vc[1, 1], v[1].view(2, D))
