"""KernelForge ops inside Hugging Face transformers models (Llama family:
Llama, Qwen2, Mistral, SmolLM2), as Liger-Kernel's ``apply_liger_kernel_to_*``
do it: one call, the model object kept.

    model = kernelize(AutoModelForCausalLM.from_pretrained(path))

- RMSNorm layers (``*RMSNorm`` with ``variance_epsilon``): ``ops.rms_norm``;
  those transformers marks with ``use_kernel_forward_from_hub("RMSNorm")``
  through the ``kernels`` package's mapping (``hub_kernels``), the others by
  setting the instance's forward.
- Gated MLPs (``gate_proj``, ``up_proj``, ``down_proj``, SiLU): ``ops.silu_and_mul``.
- Rotary application: each attention layer's own ``apply_rotary_pos_emb``
  wrapper (``_kernel_funcs``, which transformers' ``use_kernelized_func`` and
  the ``kernels`` package give every instance) gets the KernelForge forward;
  other models are untouched. It reads the cos/sin transformers computed, so
  every rope scaling is kept.
- Attention: ``attn_implementation="kernelforge"`` (``register``), ``ops.attention``.

A layer whose dtypes or shapes fall outside what an op takes keeps its own
forward for that call.
"""
from __future__ import annotations

import itertools
import types

import torch

import kernelforge
from kernelforge.backends import registry
from kernelforge.integrations import hub_kernels
from kernelforge.kernels.attention_reference import HEAD_SIZES

__all__ = ["kernelize", "register"]


def _rms_norm(self, hidden_states, backend=None):
    w = self.weight
    if hidden_states.dtype != w.dtype or hidden_states.shape[-1] != w.shape[0]:
        return type(self).forward(self, hidden_states)      # transformers' dtype promotion
    return kernelforge.ops.rms_norm(hidden_states, w, self.variance_epsilon, backend=backend)


def _gated_mlp(self, x, backend=None):
    gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
    return self.down_proj(kernelforge.ops.silu_and_mul(gate_up, backend=backend))


# the last cos/sin read: every layer of a forward gets the same position embeddings
_LAST_ROPE: list = [None]


def _rope_rows(cos, sin, B, S, D):
    """(positions, cos/sin cache) for transformers' cos/sin [1 or B, S, D]
    ([cos | cos], [sin | sin] per token): one cache row per token. Built
    once per forward (kept while the same, unmodified tensors come back)."""
    eager = not torch.compiler.is_compiling()
    if eager:
        key = (cos._version, sin._version, B, S, D)
        last = _LAST_ROPE[0]
        if last is not None and last[0] is cos and last[1] is sin and last[2] == key:
            return last[3], last[4]
    n = cos.shape[0] * S
    cache = torch.cat([cos[..., :D // 2], sin[..., :D // 2]], -1).reshape(n, D)
    positions = torch.arange(n, device=cos.device)
    if cos.shape[0] != B:                    # positions shared by the batch
        positions = positions.repeat(B)
    if eager:
        _LAST_ROPE[0] = (cos, sin, key, positions, cache)
    return positions, cache


def _rotary(original, backend):
    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        B, H, S, D = q.shape
        if unsqueeze_dim != 1 or cos.dim() != 3 or cos.shape[0] not in (1, B) or \
                cos.shape[1:] != (S, D) or k.shape[0] != B or k.shape[2] != S or D % 2:
            return original(q, k, cos, sin, unsqueeze_dim)
        positions, cache = _rope_rows(cos, sin, B, S, D)
        qr, kr = kernelforge.ops.rotary_embedding(
            positions, q.transpose(1, 2).reshape(B * S, H, D),
            k.transpose(1, 2).reshape(B * S, k.shape[1], D), D, cache, True,
            check_positions=False, backend=backend)
        return (qr.view(B, S, H, D).transpose(1, 2),
                kr.view(B, S, k.shape[1], D).transpose(1, 2))
    return forward


# the last sequence offsets made: every layer of a forward passes the same
# ones, so ops.attention reuses the key ranges it derived from them
_LAST_OFFSETS: list = [None]


def _offsets(B, Sq, Skv, device):
    """cu_seqlens_q and cu_seqlens_k of B whole sequences of Sq queries and Skv keys."""
    eager = not torch.compiler.is_compiling()
    key = (B, Sq, Skv, device)
    if eager:
        last = _LAST_OFFSETS[0]
        if last is not None and last[0] == key and last[1]._version == 0 and \
                last[2]._version == 0:
            return last[1], last[2]
    ar = torch.arange(B + 1, device=device, dtype=torch.int32)
    cu_q, cu_k = ar * Sq, ar * Skv
    if eager:
        _LAST_OFFSETS[0] = (key, cu_q, cu_k)
    return cu_q, cu_k


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               **kwargs):
    """transformers' attention interface over ``ops.attention``: [B, H, S, D]
    query, key and value (key and value the whole cache) -> [B, Sq, Hq, D].

    The mask is sdpa's (True = attend; None = causal, no padding). A mask
    that is causal with left padding becomes variable-length sequences (the
    padded query rows give 0; nothing reads them); any other mask, dropout,
    an unsupported head size or a traced call with a mask runs transformers'
    sdpa attention instead."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    B, Hq, Sq, D = query.shape
    Skv = key.shape[2]
    backend = getattr(module, "_kernelforge_backend", None)
    lens = None if attention_mask is None else _left_padded(attention_mask, B, Sq, Skv)
    if (dropout and module.training) or D not in HEAD_SIZES or Sq > Skv or \
            (attention_mask is not None and lens is None) or \
            kwargs.get("sliding_window") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if lens is None:                                  # every row whole
        q = query.transpose(1, 2).reshape(B * Sq, Hq, D)
        k = key.transpose(1, 2).reshape(B * Skv, key.shape[1], D)
        v = value.transpose(1, 2).reshape(B * Skv, key.shape[1], D)
        cu_q, cu_k = _offsets(B, Sq, Skv, query.device)
        out = kernelforge.ops.attention(q, k, v, cu_q, cu_k, scale=scaling,
                                        check_seqlens=False, backend=backend)
        return out.view(B, Sq, Hq, D), None
    nq, nk, cu_q, cu_k = lens
    q = torch.cat([query[b, :, Sq - nq[b]:].transpose(0, 1) for b in range(B)])
    k = torch.cat([key[b, :, Skv - nk[b]:].transpose(0, 1) for b in range(B)])
    v = torch.cat([value[b, :, Skv - nk[b]:].transpose(0, 1) for b in range(B)])
    packed = kernelforge.ops.attention(q, k, v, cu_q, cu_k, scale=scaling, check_seqlens=False,
                                       backend=backend)
    out = query.new_zeros(B, Sq, Hq, D)
    start = 0
    for b in range(B):
        out[b, Sq - nq[b]:] = packed[start:start + nq[b]]
        start += nq[b]
    return out, None


# the last mask read: every layer of a forward gets the same one
_LAST_MASK: list = [None, None]


def _left_padded(mask, B, Sq, Skv):
    """(query rows, keys, cu_seqlens_q, cu_seqlens_k) per sequence when
    ``mask`` [B, 1, Sq, Skv] is causal (bottom-right) over a left-padded
    batch, else None. Read on the host once per mask, not once per layer."""
    if torch.compiler.is_compiling() or mask.dtype != torch.bool or \
            mask.shape != (B, 1, Sq, Skv):
        return None
    if _LAST_MASK[0] is mask:
        return _LAST_MASK[1]
    pad = (~mask[:, 0, -1, :]).int().argmin(-1)        # each row's first key seen
    pad = torch.where(mask[:, 0, -1, :].any(-1), pad, torch.full_like(pad, Skv))
    j = torch.arange(Skv, device=mask.device)
    i = torch.arange(Sq, device=mask.device)[:, None] + (Skv - Sq)
    want = (j[None, None] >= pad[:, None, None]) & (j[None, None] <= i[None])
    lens = None
    if torch.equal(want, mask[:, 0]):
        nk = [Skv - int(p) for p in pad.tolist()]
        nq = [min(Sq, n) for n in nk]
        lens = nq, nk, *(torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32,
                                      device=mask.device) for n in (nq, nk))
    _LAST_MASK[:] = mask, lens
    return lens


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation",
                                                                   "SiLU")


NAME = "kernelforge"


def register() -> None:
    """``attn_implementation="kernelforge"`` for transformers: the attention
    function and sdpa's mask format, under one name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def kernelize(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """Swap the model's RMSNorm, gated-MLP activation, rotary application and
    attention for KernelForge ops (``backend``: a registered backend, or None to choose
    for the tensors' device). Returns ``model``; returns what it swapped in
    ``model.kernelforge_swapped`` (a dict of counts)."""
    known = registry.backends()
    if backend is not None and backend not in known:
        raise ValueError(f"`backend` expected one of {sorted(known)}, got {backend!r}")
    swapped = {"rms_norm": 0, "silu_and_mul": 0, "rotary_embedding": 0, "attention": 0}
    # first: kernels.kernelize resets the forward of marked layers it has no mapping for
    hub = hub_kernels.kernelize(model, backend) if hub_kernels.available() else []
    swapped["rms_norm"] = len(hub)
    for mod in model.modules():
        cls = type(mod)
        if hub_kernels.is_hub_rms_norm(mod):
            pass
        elif cls.__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon") and \
                isinstance(getattr(mod, "weight", None), torch.Tensor):
            mod.forward = types.MethodType(
                lambda self, h, _b=backend: _rms_norm(self, h, _b), mod)
            swapped["rms_norm"] += 1
        elif all(hasattr(mod, n) for n in ("gate_proj", "up_proj", "down_proj")) and \
                _is_silu(getattr(mod, "act_fn", None)):
            mod.forward = types.MethodType(
                lambda self, x, _b=backend: _gated_mlp(self, x, _b), mod)
            swapped["silu_and_mul"] += 1
        rope = getattr(mod, "_kernel_funcs", {}).get("rotary_pos_emb")
        if isinstance(rope, torch.nn.Module):
            rope.forward = types.MethodType(_rotary(type(rope).forward.__get__(rope), backend),
                                            rope)
            swapped["rotary_embedding"] += 1
        if hasattr(mod, "num_key_value_groups") and hasattr(mod, "scaling"):
            mod._kernelforge_backend = backend
            swapped["attention"] += 1
    if swapped["attention"]:
        register()
        model.set_attn_implementation(NAME)
    model.kernelforge_swapped = swapped
    return model
