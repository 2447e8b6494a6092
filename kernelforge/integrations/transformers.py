"""KernelForge ops inside Hugging Face transformers models (Llama family:
Llama, Qwen2, Mistral, SmolLM2), as Liger-Kernel's ``apply_liger_kernel_to_*``
do it: one call, the model object kept.

    model = kernelize(AutoModelForCausalLM.from_pretrained(path))

- RMSNorm layers (``*RMSNorm`` with ``variance_epsilon``): ``ops.rms_norm``.
- Gated MLPs (``gate_proj``, ``up_proj``, ``down_proj``, SiLU): ``ops.silu_and_mul``.
- Rotary application: each attention layer's own ``apply_rotary_pos_emb``
  wrapper (``_kernel_funcs``, which transformers' ``use_kernelized_func`` and
  the ``kernels`` package give every instance) gets the KernelForge forward;
  other models are untouched. It reads the cos/sin transformers computed, so
  every rope scaling is kept.

A layer whose dtypes or shapes fall outside what an op takes keeps its own
forward for that call.
"""
from __future__ import annotations

import types

import torch

import kernelforge
from kernelforge.backends import registry

__all__ = ["kernelize"]


def _rms_norm(self, hidden_states, backend=None):
    w = self.weight
    if hidden_states.dtype != w.dtype or hidden_states.shape[-1] != w.shape[0]:
        return type(self).forward(self, hidden_states)      # transformers' dtype promotion
    return kernelforge.ops.rms_norm(hidden_states, w, self.variance_epsilon, backend=backend)


def _gated_mlp(self, x, backend=None):
    gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
    return self.down_proj(kernelforge.ops.silu_and_mul(gate_up, backend=backend))


def _rotary(original, backend):
    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        B, H, S, D = q.shape
        if unsqueeze_dim != 1 or cos.dim() != 3 or cos.shape[0] not in (1, B) or \
                cos.shape[1:] != (S, D) or k.shape[0] != B or k.shape[2] != S or D % 2:
            return original(q, k, cos, sin, unsqueeze_dim)
        # transformers' cos/sin per token ([cos | cos], [sin | sin]): one cache row each
        n = cos.shape[0] * S
        cache = torch.cat([cos[..., :D // 2], sin[..., :D // 2]], -1).reshape(n, D)
        positions = torch.arange(n, device=q.device)
        if cos.shape[0] != B:                    # positions shared by the batch
            positions = positions.repeat(B)
        qr, kr = kernelforge.ops.rotary_embedding(
            positions, q.transpose(1, 2).reshape(B * S, H, D),
            k.transpose(1, 2).reshape(B * S, k.shape[1], D), D, cache, True,
            check_positions=False, backend=backend)
        return (qr.view(B, S, H, D).transpose(1, 2),
                kr.view(B, S, k.shape[1], D).transpose(1, 2))
    return forward


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation",
                                                                   "SiLU")


def kernelize(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """Swap the model's RMSNorm, gated-MLP activation and rotary application
    for KernelForge ops (``backend``: a registered backend, or None to choose
    for the tensors' device). Returns ``model``; returns what it swapped in
    ``model.kernelforge_swapped`` (a dict of counts)."""
    known = registry.backends()
    if backend is not None and backend not in known:
        raise ValueError(f"`backend` expected one of {sorted(known)}, got {backend!r}")
    swapped = {"rms_norm": 0, "silu_and_mul": 0, "rotary_embedding": 0}
    for mod in model.modules():
        cls = type(mod)
        if cls.__name__.endswith("RMSNorm") and hasattr(mod, "variance_epsilon") and \
                isinstance(getattr(mod, "weight", None), torch.Tensor):
            mod.forward = types.MethodType(
                lambda self, h, _b=backend: _rms_norm(self, h, _b), mod)
            swapped["rms_norm"] += 1
        elif all(hasattr(mod, n) for n in ("gate_proj", "up_proj", "down_proj")) and \
                _is_silu(getattr(mod, "act_fn", None)):
            mod.forward = types.MethodType(
                lambda self, x, _b=backend: _gated_mlp(self, x, _b), mod)
            swapped["silu_and_mul"] += 1
        funcs = getattr(mod, "_kernel_funcs", None)
        if isinstance(funcs, dict) and isinstance(funcs.get("rotary_pos_emb"), torch.nn.Module):
            # a fresh wrapper: one already called keeps the forward it first ran
            old = funcs["rotary_pos_emb"]
            rope = type(old)()
            rope.forward = types.MethodType(_rotary(type(old).forward.__get__(rope), backend),
                                            rope)
            funcs["rotary_pos_emb"] = rope
            swapped["rotary_embedding"] += 1
    model.kernelforge_swapped = swapped
    return model
