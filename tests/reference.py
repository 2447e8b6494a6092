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
