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
