"""The peers kernelforge's RMSNorm and rotary embeddings are measured
against, written plainly in torch (shared by the CPU suite and
tools/gpu_bench.py)."""
import torch

EPS = 1e-6


def formula(x, w):
    """RMSNorm as a model file writes it: fp32 math, cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w).to(x.dtype)


def fused_formula(x, r, w):
    """Residual add (rounded to the input dtype), then RMSNorm."""
    s = (x.float() + r.float()).to(x.dtype)
    return formula(s, w), s


# -- rotary embeddings --------------------------------------------------------------

def rotate_half(x):
    """transformers' Llama ``rotate_half``: (x1, x2) -> (-x2, x1), with a cat."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rotary(positions, q, k, cos_sin_cache, head_size):
    """NeoX-style RoPE as transformers' Llama applies it, on vLLM-layout inputs.

    ``positions`` [T]; ``q`` [T, Hq * head_size]; ``k`` [T, Hkv * head_size];
    ``cos_sin_cache`` [max_position, head_size] in fp32 (cos half, sin half;
    full rotary only, as in Llama). LlamaRotaryEmbedding builds cos/sin in
    float32 with full head_dim (``cat((freqs, freqs))``) and casts them to the
    input dtype; apply_rotary_pos_emb then computes ``q * cos + rotate_half(q) *
    sin`` in the input dtype (so bf16 rounds cos, sin and each product).
    Here the per-token cos/sin rows are gathered from the cache by position
    instead of recomputed. Returns (q, k) rotated, in the input shapes.
    """
    T = positions.shape[0]
    c, s = cos_sin_cache[positions].float().chunk(2, dim=-1)        # [T, D/2] each
    cos = torch.cat((c, c), dim=-1).to(q.dtype).unsqueeze(1)         # [T, 1, D]
    sin = torch.cat((s, s), dim=-1).to(q.dtype).unsqueeze(1)
    qh = q.view(T, -1, head_size)
    kh = k.view(T, -1, head_size)
    q_embed = (qh * cos) + (rotate_half(qh) * sin)
    k_embed = (kh * cos) + (rotate_half(kh) * sin)
    return q_embed.reshape(q.shape), k_embed.reshape(k.shape)


_HF_COMPILED = []


def hf_rotary_compiled():
    """``torch.compile(hf_rotary, fullgraph=True, dynamic=False)``, built once
    (Dynamo then compiles it once per shape and dtype it sees)."""
    if not _HF_COMPILED:
        _HF_COMPILED.append(torch.compile(hf_rotary, fullgraph=True, dynamic=False))
    return _HF_COMPILED[0]


# -- attention ----------------------------------------------------------------------

def sdpa_prefill(q, k, v, *, causal=True):
    """``torch.nn.functional.scaled_dot_product_attention`` on one sequence in
    the [1, heads, S, D] layout it takes (``q``, ``k``, ``v`` already in it;
    callers transpose packed [S, H, D] tensors outside the timed region).
    ``is_causal`` is top-left aligned, the same as bottom-right when the query
    and key lengths are equal, the only case used here."""
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def gather_kv(cache, block_tables, ctx):
    """The first ``ctx`` positions of every sequence, gathered from a paged
    cache [num_blocks, block_size, Hkv, D] through ``block_tables`` [B, max_blocks]
    into [B, Hkv, ctx, D]: one ``index_select`` of the used blocks (a copy),
    then a transposed view (SDPA reads it with strides; one more copy to
    make it contiguous measured no faster in total on CPU)."""
    B = block_tables.shape[0]
    bs = cache.shape[1]
    nblk = (ctx + bs - 1) // bs
    ids = block_tables[:, :nblk].reshape(-1).to(torch.int64)
    kv = cache.index_select(0, ids).view(B, nblk * bs, *cache.shape[2:])[:, :ctx]
    return kv.transpose(1, 2)


def gather_sdpa(q, key_cache, value_cache, block_tables, seq_lens, *, gqa=True):
    """Paged decode as plain torch: gather each sequence's K/V blocks, then
    SDPA with its single query token.

    ``q`` [B, Hq, D] (one token per sequence); caches [num_blocks, block_size,
    Hkv, D]; ``block_tables`` int [B, max_blocks]; ``seq_lens`` int [B]. The
    keys are gathered up to the longest context; shorter sequences get a
    key-padding mask (none when every length is the same, as in the
    benchmarks). ``gqa=True`` passes ``enable_gqa=True``; ``gqa=False``
    repeats the kv heads to the Hq query heads first (``repeat_interleave``,
    as models without enable_gqa do). Returns [B, Hq, D]."""
    import torch.nn.functional as F
    B, Hq, D = q.shape
    lens = seq_lens.tolist()
    ctx = max(lens)
    k = gather_kv(key_cache, block_tables, ctx)              # [B, Hkv, ctx, D]
    v = gather_kv(value_cache, block_tables, ctx)
    if not gqa and k.shape[1] != Hq:
        k = k.repeat_interleave(Hq // k.shape[1], dim=1)
        v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    mask = None
    if min(lens) != ctx:
        mask = (torch.arange(ctx, device=q.device)[None, :]
                < seq_lens.to(q.device)[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask,
                                         enable_gqa=gqa and k.shape[1] != Hq)
    return out.squeeze(2)


def torch_sort_sample(logits, k, p, generator=None):
    """Top-k then top-p by a full sort, vLLM's PyTorch-native sampler."""
    logits_sort, idx = logits.sort(dim=-1, descending=False)
    kth = logits_sort.gather(1, (logits_sort.size(1) - k.long()).unsqueeze(1))
    logits_sort = logits_sort.masked_fill(logits_sort < kth, float("-inf"))
    cum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    mask = cum <= 1 - p.unsqueeze(1)
    mask[:, -1] = False
    logits_sort = logits_sort.masked_fill(mask, float("-inf"))
    probs = logits.scatter(-1, idx, logits_sort).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
