"""The peers kernelforge's RMSNorm is measured against, written plainly in
torch (shared by the CPU suite and tools/gpu_bench.py)."""
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
