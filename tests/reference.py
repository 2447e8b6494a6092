"""Float64 references, written from the formulas and independent of the IR.
The ops with specs keep theirs in the op file (OpSpec.reference); these
names point there so older tests read the same formulas."""
import torch

from kernelforge.kernels.rmsnorm import fused_reference as fused_add_rms_norm  # noqa: F401
from kernelforge.kernels.rmsnorm import reference as rms_norm  # noqa: F401
from kernelforge.kernels.rotary import reference as rotary  # noqa: F401


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
