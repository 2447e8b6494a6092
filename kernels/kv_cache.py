"""Writing new keys and values into a paged KV cache, written once in the IR.

The cache is ``[num_blocks, block_size, kv_heads, head_size]``; token t goes
to slot ``slot_mapping[t]``, i.e. block ``slot // block_size``, row
``slot % block_size``. A slot of -1 marks padding: nothing is written.
"""
from typing import Optional

import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.backends import registry
from kernelforge.dispatch import launch


@kl.kernel(static=("BS", "H", "D"),
           examples=({"BS": 16, "H": 8, "D": 128}, {"BS": 32, "H": 8, "D": 64}),
           example_dtypes={"slot_mapping": kl.i64})
def reshape_and_cache_kernel(key: kl.In("T", "H", "D"), value: kl.In("T", "H", "D"),
                             slot_mapping: kl.In("T"),
                             key_cache: kl.Out("NB", "BS", "H", "D"),
                             value_cache: kl.Out("NB", "BS", "H", "D")):
    t, h, d = kl.parallel("T"), kl.tile("H"), kl.tile("D")
    slot = kl.load(slot_mapping[t])
    block_size = kl.size("BS").to(slot_mapping.dtype)
    block, row = slot // block_size, slot % block_size
    kl.store(key_cache[block, row, h, d], kl.load(key[t, h, d]), mask=slot >= 0)
    kl.store(value_cache[block, row, h, d], kl.load(value[t, h, d]), mask=slot >= 0)


def distinct_caches(op: str, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Keys and values in memory of their own: one tensor (or overlapping
    views) cannot hold both; disjoint views of one buffer are fine."""
    if checks.overlaps(key_cache, value_cache):
        checks.fail(op, "value_cache", "memory apart from `key_cache` (keys and values are "
                    "different rows)", "the same tensor as `key_cache`" if
                    value_cache is key_cache else "a tensor that overlaps `key_cache`")


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                      check_slots: bool = True, backend: Optional[str] = None) -> None:
    """Write ``key`` and ``value`` rows into a paged cache (vLLM's convention).

    Args:
        key, value: [T, kv_heads, head_size] (or [T, kv_heads * head_size]),
            the cache's dtype; the last dim contiguous.
        key_cache, value_cache: [num_blocks, block_size, kv_heads, head_size].
        slot_mapping: int64 (or int32) [T]; the flat slot of each token,
            ``block * block_size + row``, or -1 to skip the token (padding).
        check_slots: verify every slot is -1 or inside the cache first (one
            device-wide min/max). Unchecked out-of-range slots are never
            written (Triton masks them; the torch lowerings clamp, so pass
            False only when the slots are known to be valid).
        backend: "eager", "inductor", "triton" or None (chosen per device).

    Example:
        >>> kernelforge.ops.reshape_and_cache(k, v, k_cache, v_cache, slots)
    """
    if checks.opaque():                     # opaque in the caller's graph; checked when it runs
        torch.ops.kernelforge.reshape_and_cache(key, value, key_cache, value_cache,
                                                slot_mapping, check_slots, backend)
        return
    op = "reshape_and_cache"
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        checks.tensor(op, name, c)
        checks.float_dtype(op, name, c)
        if c.dim() != 4:
            checks.fail(op, name, "[num_blocks, block_size, kv_heads, head_size]",
                        list(c.shape))
        checks.last_dim_contiguous(op, name, c)
    checks.shape(op, "value_cache", value_cache, tuple(key_cache.shape),
                 " (the shape of `key_cache`)")
    checks.same_dtype(op, "value_cache", value_cache, "key_cache", key_cache)
    checks.same_device(op, "value_cache", value_cache, "key_cache", key_cache)
    nb, bs, hk, d = key_cache.shape
    checks.tensor(op, "slot_mapping", slot_mapping)
    if slot_mapping.dtype not in (torch.int64, torch.int32) or slot_mapping.dim() != 1:
        checks.fail(op, "slot_mapping", "a 1-D int64 or int32 tensor [tokens]",
                    f"{slot_mapping.dim()}-D {slot_mapping.dtype}")
    checks.same_device(op, "slot_mapping", slot_mapping, "key_cache", key_cache)
    T = slot_mapping.shape[0]
    rows = []
    for name, x in (("key", key), ("value", value)):
        checks.tensor(op, name, x)
        checks.same_dtype(op, name, x, "key_cache", key_cache)
        checks.same_device(op, name, x, "key_cache", key_cache)
        if x.dim() == 2 and x.shape[-1] == hk * d:
            x = x.view(x.shape[0], hk, d) if x.stride(-1) == 1 else x
        if x.dim() != 3 or tuple(x.shape[1:]) != (hk, d) or x.shape[0] != T:
            checks.fail(op, name, f"[{T}, {hk}, {d}] (tokens as in `slot_mapping`, heads and "
                        "head size as in the cache)", list(x.shape))
        checks.last_dim_contiguous(op, name, x)
        rows.append(x)
    # the caches are written: neither may share memory with the other or with
    # what is read (disjoint views of one buffer, q/k/v of a fused qkv, are fine)
    distinct_caches(op, key_cache, value_cache)
    checks.no_overlap_among(op, (("key_cache", key_cache), ("value_cache", value_cache)),
                            (("key", key), ("value", value), ("slot_mapping", slot_mapping)))
    checks.no_host_check_inline(op, "check_slots", check_slots)
    if check_slots and T and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(slot_mapping))
        if lo < -1 or hi >= nb * bs:
            bad = lo if lo < -1 else hi
            checks.fail(op, "slot_mapping", f"-1 or a slot in [0, {nb * bs}) (num_blocks x "
                        "block_size)", f"slot {bad}")
    if not torch.compiler.is_compiling():        # (inline: no backend runs it)
        registry.select(key_cache.device, backend)
    if T:
        # the caches are passed as the very objects the caller holds: written in place
        launch(reshape_and_cache_kernel, rows[0], rows[1], slot_mapping, key_cache,
               value_cache, backend=backend)


@torch.library.custom_op("kernelforge::reshape_and_cache",
                         mutates_args=("key_cache", "value_cache"))
def _reshape_and_cache_op(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          check_slots: bool, backend: Optional[str]) -> None:
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping,
                      check_slots=check_slots, backend=backend)


@_reshape_and_cache_op.register_fake
def _(key, value, key_cache, value_cache, slot_mapping, check_slots, backend):
    return None
