"""Float64 references, written from the formulas and independent of the IR."""
import torch


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    x64 = x.to(torch.float64)
    ms = (x64 * x64).mean(dim=-1, keepdim=True)
    return x64 / torch.sqrt(ms + eps) * (w.to(torch.float64) + offset)


def fused_add_rms_norm(x, residual, w, eps, offset=0.0):
    """(normed, sum): the sum is rounded to the input dtype (what the op
    returns), and the normalisation is of that rounded sum."""
    s = (x.to(torch.float64) + residual.to(torch.float64)).to(x.dtype)
    return rms_norm(s, w, eps, offset), s


def rotary(positions, x, cos_sin_cache, head_size: int, is_neox: bool) -> torch.Tensor:
    """RoPE as a complex rotation in float64: each pair (a, b) is the complex
    number a + ib multiplied by cos + i sin from the cache row of its token.
    ``x`` is [T, H * head_size] or [T, H, head_size]; returns x's shape."""
    T = positions.shape[0]
    H = x.shape[1] if x.dim() == 3 else x.shape[1] // head_size
    x64 = x.to(torch.float64).reshape(T, H, head_size)
    c = cos_sin_cache.to(torch.float64)[positions.long()]         # [T, R]
    R = c.shape[1]
    rot = torch.complex(c[:, : R // 2], c[:, R // 2:])[:, None, :]   # [T, 1, R/2]
    part = x64[..., :R]
    if is_neox:
        a, b = part[..., : R // 2], part[..., R // 2:]
    else:
        a, b = part[..., 0::2], part[..., 1::2]
    z = torch.complex(a, b) * rot
    out = x64.clone()
    if is_neox:
        out[..., : R // 2], out[..., R // 2:R] = z.real, z.imag
    else:
        out[..., 0:R:2], out[..., 1:R:2] = z.real, z.imag
    return out.reshape(x.shape)


def attention(q, k, v, cu_q, cu_k, scale, causal=True, window=None, softcap=None,
              abs_v=False):
    """softmax(Q K^T * scale + mask) V per sequence, in float64. Query i of a
    sequence sits at key position k_len - q_len + i (bottom-right aligned);
    causal hides keys after it, a window hides keys more than `window` to its
    left; a row with no visible key is 0. ``abs_v``: return softmax(...) |V|
    as well (the scale of the error a rounding of the weights makes)."""
    cu_q, cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
    out = torch.zeros(q.shape, dtype=torch.float64)
    mag = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if qe == qs:
            continue
        Q = q[qs:qe].double().cpu()
        K = k[ks:ke].double().cpu().repeat_interleave(group, 1)
        V = v[ks:ke].double().cpu().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", Q, K) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        q_len, k_len = qe - qs, ke - ks
        pos = k_len - q_len + torch.arange(q_len)[:, None]
        j = torch.arange(k_len)[None, :]
        visible = torch.ones(q_len, k_len, dtype=torch.bool)
        if causal:
            visible &= j <= pos
        if window is not None:
            visible &= j >= pos - window
        s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)        # all hidden: 0
        out[qs:qe] = torch.einsum("hqk,khd->qhd", p, V)
        mag[qs:qe] = torch.einsum("hqk,khd->qhd", p, V.abs())
    return (out, mag) if abs_v else out
