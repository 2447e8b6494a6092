"""KernelForge's paged attention as vLLM's attention backend on CPUs.

vLLM's CPU platform returns its ``CPU_ATTN`` backend whatever backend is
selected (``CpuPlatform.get_attn_backend_cls``, vllm/platforms/cpu.py: any
other choice logs "Cannot use ... backend on CPU"), so the plugin takes the
extension point vLLM gives for that case: ``register_backend`` overrides the
class behind ``AttentionBackendEnum.CPU_ATTN`` with this subclass. It keeps
vLLM's metadata builder and KV cache layout ([blocks, kv_heads, block_size,
2 * head_size]: per block and head, the keys' rows then the values' rows) and
replaces the two calls that touch the cache: writing new keys and values
(``ops.reshape_and_cache``) and attention over the blocks
(``ops.paged_attention``), on strided views of that layout. Calls outside what
the ops cover (encoder attention, ALiBi, sinks, a sliding window, a quantized
cache, fused output quantization) run vLLM's own kernels.

Imported by vLLM from the class path, so it imports vLLM at module level;
``kernelforge.integrations.vllm`` never imports it.
"""
from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .. import ops
from .vllm import _backend, counted

_paged_attention = counted("paged_attention")(ops.paged_attention)
_reshape_and_cache = counted("reshape_and_cache")(ops.reshape_and_cache)


def cache_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU cache as KernelForge's two [blocks, block_size, kv_heads, D]
    caches: strided views, no copy."""
    blocks, heads, block_size, _ = kv_cache.shape
    k, v = kv_cache.view(blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
    return k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)


def _plan(meta):
    """One ``paged_attention_plan`` per step: vLLM hands every layer the same
    metadata object, so the tables are checked and the launch derived once."""
    plan = getattr(meta, "_kernelforge_plan", None)
    if plan is None:
        plan = ops.paged_attention_plan(meta.block_table, meta.seq_lens, meta.query_start_loc,
                                        causal=meta.causal)
        meta._kernelforge_plan = plan
    return plan


class KernelForgeAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention with KernelForge's cache write and paged attention."""

    def _covered(self) -> bool:
        return (self.attn_type == AttentionType.DECODER and self.alibi_slopes is None
                and self.sinks is None and self.sliding_window == -1
                and not self.is_fp8_kv_cache and self.kv_cache_dtype == "auto")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if not self._covered() or output_scale is not None or output_block_scale is not None \
                or attn_metadata is None or not isinstance(attn_metadata.causal, bool):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = cache_views(kv_cache)
        out = _paged_attention(
            query[:n], key_cache, value_cache, attn_metadata.block_table,
            attn_metadata.seq_lens, attn_metadata.query_start_loc, scale=self.scale,
            causal=attn_metadata.causal, softcap=self.logits_soft_cap or None,
            plan=_plan(attn_metadata), backend=_backend())
        output[:n].view_as(out).copy_(out)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if not self._covered():
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        key_cache, value_cache = cache_views(kv_cache)
        t = slot_mapping.shape[0]           # key and value may carry padding rows past it
        _reshape_and_cache(key[:t], value[:t], key_cache, value_cache, slot_mapping,
                              backend=_backend())


class KernelForgeAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with KernelForge's kernels inside."""

    @staticmethod
    def get_impl_cls():
        return KernelForgeAttentionImpl
