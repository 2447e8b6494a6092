"""KernelForge ops inside vLLM: a general plugin (docs/integrations.md).

vLLM loads it through the ``vllm.general_plugins`` entry point named
``kernelforge`` (``VLLM_PLUGINS=kernelforge`` selects it alone). ``register()``
replaces vLLM's layers with subclasses whose platform forwards (forward_cpu,
forward_cuda, forward_hip, forward_oot) call KernelForge through out-variant
and in-place custom ops in vLLM's own calling convention; forward_native stays
vLLM's, the reference. ``KERNELFORGE_VLLM_OPS`` (a comma list of the names in
``OPS``) limits which layers are replaced; ``custom_ops=["-rms_norm"]`` in vLLM's
compilation config turns one off as it does for vLLM's own ops.
"""
from __future__ import annotations

import collections
import functools
import os
import time
from typing import Optional

import torch

from .. import ops

#: calls of each op since the process started (tests and the bench read it)
CALLS: collections.Counter = collections.Counter()
#: seconds inside each op, kept only with KERNELFORGE_VLLM_TIMING=1 (the bench's
#: share of a step; off by default, as it reads the clock twice per call)
SECONDS: collections.Counter = collections.Counter()
_TIMING = os.environ.get("KERNELFORGE_VLLM_TIMING", "") not in ("", "0")


def counted(name: str):
    """Count (and with KERNELFORGE_VLLM_TIMING, time) each call of ``fn``."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            CALLS[name] += 1
            if not _TIMING:
                return fn(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                SECONDS[name] += time.perf_counter() - t
        return run
    return wrap

#: vLLM's name for each layer this plugin replaces -> the CustomOp class names
OPS = {
    "rms_norm": ("RMSNorm",),
    "silu_and_mul": ("SiluAndMul",),
    "gelu_and_mul": ("GeluAndMul",),
    "layer_norm": ("LayerNorm",),
    "rotary_embedding": ("RotaryEmbedding", "Llama3RotaryEmbedding",
                         "YaRNScalingRotaryEmbedding"),
    # not a CustomOp: the class behind vLLM's CPU attention backend (vllm_attention.py)
    "attention": (),
}
ATTENTION_BACKEND = "kernelforge.integrations.vllm_attention.KernelForgeAttentionBackend"


def _backend() -> Optional[str]:
    return os.environ.get("KERNELFORGE_VLLM_BACKEND") or None


# -- out-variant and in-place custom ops, in vLLM's calling convention ----------------
@torch.library.custom_op("kernelforge_vllm::rms_norm", mutates_args=("out",))
@counted("rms_norm")
def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
             epsilon: float) -> None:
    """vLLM's ``rms_norm(out, input, weight, epsilon)``: writes into ``out``."""
    ops.rms_norm(input, weight, epsilon, out=out, backend=_backend())


@torch.library.custom_op("kernelforge_vllm::fused_add_rms_norm",
                         mutates_args=("input", "residual"))
@counted("fused_add_rms_norm")
def fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       epsilon: float) -> None:
    """vLLM's ``fused_add_rms_norm(input, residual, weight, epsilon)``: ``residual``
    becomes ``input + residual`` and ``input`` its normalised rows, in place."""
    ops.fused_add_rms_norm(input, residual, weight, epsilon, inplace=True, backend=_backend())


@torch.library.custom_op("kernelforge_vllm::silu_and_mul", mutates_args=("out",))
@counted("silu_and_mul")
def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    """vLLM's ``silu_and_mul(out, input)``."""
    ops.silu_and_mul(input, out=out, backend=_backend())


@torch.library.custom_op("kernelforge_vllm::gelu_tanh_and_mul", mutates_args=("out",))
@counted("gelu_tanh_and_mul")
def gelu_tanh_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    """vLLM's ``gelu_tanh_and_mul(out, input)``."""
    ops.gelu_tanh_and_mul(input, out=out, backend=_backend())


@torch.library.custom_op("kernelforge_vllm::rotary_embedding", mutates_args=("query", "key"))
@counted("rotary_embedding")
def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: Optional[torch.Tensor],
                     head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """vLLM's ``rotary_embedding(positions, query, key, head_size, cos_sin_cache,
    is_neox)``: rotates ``query`` and ``key`` in place."""
    ops.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox,
                         inplace=True, backend=_backend())


@counted("layer_norm")
def _layer_norm(x, weight, bias, eps: float):
    return ops.layer_norm(x, weight, bias, eps, backend=_backend())


# -- the layers' forwards -------------------------------------------------------------
def _rms_norm_forward(self, x, residual=None):
    if self.variance_size_override is not None or not self.has_weight \
            or self.weight.dtype != x.dtype:
        return self.forward_native(x, residual)
    if residual is not None:
        torch.ops.kernelforge_vllm.fused_add_rms_norm(x, residual, self.weight.data,
                                                      self.variance_epsilon)
        return x, residual
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.kernelforge_vllm.rms_norm(out, x, self.weight.data, self.variance_epsilon)
    return out


def _gelu_forward(self, x):
    if self.approximate != "tanh":
        return self.forward_native(x)
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    torch.ops.kernelforge_vllm.gelu_tanh_and_mul(out, x)
    return out


def _silu_forward(self, x):
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    torch.ops.kernelforge_vllm.silu_and_mul(out, x)
    return out


def _layer_norm_forward(self, x):
    if self.weight is None or self.bias is None or self.weight.dtype != x.dtype:
        return self.forward_native(x)
    return _layer_norm(x, self.weight, self.bias, self.eps)


def _rotary_forward(self, positions, query, key=None):
    cache = self._match_cos_sin_cache_dtype(query)
    torch.ops.kernelforge_vllm.rotary_embedding(positions, query, key, self.head_size,
                                                cache, self.is_neox_style)
    return query, key


_FORWARDS = {"rms_norm": _rms_norm_forward, "silu_and_mul": _silu_forward,
             "gelu_and_mul": _gelu_forward, "layer_norm": _layer_norm_forward,
             "rotary_embedding": _rotary_forward}


def _chosen() -> list[str]:
    want = os.environ.get("KERNELFORGE_VLLM_OPS", "").strip()
    if not want:
        return list(OPS)
    names = [w.strip() for w in want.split(",") if w.strip()]
    unknown = sorted(set(names) - set(OPS))
    if unknown:
        raise ValueError(f"KERNELFORGE_VLLM_OPS names {unknown}; expected names in "
                         f"{sorted(OPS)}, got {want!r}")
    return names


def _vllm_classes() -> dict:
    from vllm.model_executor.layers import activation, layernorm
    from vllm.model_executor.layers.rotary_embedding import base, llama3_rope, yarn_scaling_rope
    return {"RMSNorm": layernorm.RMSNorm, "LayerNorm": layernorm.LayerNorm,
            "SiluAndMul": activation.SiluAndMul, "GeluAndMul": activation.GeluAndMul,
            "RotaryEmbedding": base.RotaryEmbedding,
            "Llama3RotaryEmbedding": llama3_rope.Llama3RotaryEmbedding,
            "YaRNScalingRotaryEmbedding": yarn_scaling_rope.YaRNScalingRotaryEmbedding}


def _replacement(vllm_name: str, parent: type) -> type:
    """A subclass of vLLM's layer whose platform forwards run KernelForge."""
    from vllm.config import get_cached_compilation_config
    forward = _FORWARDS[vllm_name]

    @classmethod
    def enabled(cls) -> bool:
        # on unless the compilation config turns it off ("-rms_norm"), whatever
        # the default for vLLM's own ops ("none" under Inductor)
        custom = get_cached_compilation_config().custom_ops
        return f"-{vllm_name}" not in custom and f"-{parent.__name__}" not in custom

    body = {"enabled": enabled, "kernelforge_op": vllm_name, "__module__": __name__,
            "__doc__": f"vLLM's {parent.__name__} running KernelForge's {vllm_name}."}
    for method in ("forward_cpu", "forward_cuda", "forward_hip", "forward_oot"):
        body[method] = forward
    return type(f"KernelForge{parent.__name__}", (parent,), body)


_REGISTERED: dict = {}


def register() -> None:
    """vLLM's general-plugin hook: registers the replacements (once per process)."""
    if _REGISTERED:
        return
    from vllm.model_executor.custom_op import CustomOp
    classes = _vllm_classes()
    chosen = _chosen()
    if "attention" in chosen:
        from vllm.platforms import current_platform
        if current_platform.is_cpu():
            from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
            register_backend(AttentionBackendEnum.CPU_ATTN, ATTENTION_BACKEND)
            _REGISTERED["CPU_ATTN"] = ATTENTION_BACKEND
    for vllm_name in chosen:
        for cls_name in OPS[vllm_name]:
            parent = classes[cls_name]
            cls = _replacement(vllm_name, parent)
            CustomOp.register_oot(cls, name=cls_name)
            _REGISTERED[cls_name] = cls
