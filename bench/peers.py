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
