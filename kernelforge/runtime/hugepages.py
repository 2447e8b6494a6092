"""Weights and the KV cache on 2 MB pages (Linux transparent huge pages).

Why: a decode step streams every weight (270 MB for SmolLM2-135M in bf16)
and every sequence's KV blocks from memory. On 4 KB pages that is ~70,000
pages a step, each a TLB miss, and in a virtual machine each miss walks two
page tables (the guest's and the host's). A step's matmuls run a little
faster on huge pages; whole generate calls gain less than their noise
(docs/runtime.md, "Measured: 32 prompts paired with vLLM", Huge pages).
torch's allocator asks for huge pages only under ``THP_MEM_ALLOC_ENABLE=1``,
read once when torch starts; a library cannot set it for its caller, so the
runtime allocates these buffers itself.

Where the kernel's THP setting is ``madvise`` (the common default), memory
gets huge pages only if asked with ``madvise(MADV_HUGEPAGE)`` before it is
first written: ``empty`` maps fresh anonymous memory, aligns it to 2 MB and
asks. Where THP is ``never``, or off Linux, plain ``torch.empty`` is used;
nothing else changes (the pages are only a hint to the kernel).
"""
from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"),
    or "unavailable" where there is none (not Linux, or not readable)."""
    try:
        with open(_THP) as f:
            text = f.read()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unavailable"


def empty(nbytes: int, zeroed: bool = False) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes``, on huge pages where the kernel gives
    them (2 MB aligned, advised before first touch); else ``torch.empty`` (or
    ``torch.zeros`` if ``zeroed``). The memory lives as long as the tensor and
    its views. Zero either way when ``zeroed``; and like ``torch.zeros`` on a
    large size, pages not yet written take no memory (a KV pool grows in RSS
    as its blocks are used)."""
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE") or \
            thp_mode() not in ("always", "madvise"):
        return (torch.zeros if zeroed else torch.empty)(nbytes, dtype=torch.uint8)
    # fresh anonymous memory, zero-filled by the kernel and not touched yet (a
    # malloc'd block may reuse pages already faulted in as 4 KB ones); the
    # slack for the alignment is never touched: address space, not memory
    whole = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mm = mmap.mmap(-1, whole + HUGE_PAGE, flags=mmap.MAP_PRIVATE)   # shared: shmem, no THP
    base = torch.frombuffer(mm, dtype=torch.uint8)      # keeps ``mm`` alive
    off = -base.data_ptr() % HUGE_PAGE
    mm.madvise(mmap.MADV_HUGEPAGE, off, whole)
    return base[off:off + nbytes]


def _aligned(n: int, to: int = 64) -> int:
    return -(-n // to) * to


def move_attributes(slots: list[tuple[object, str]]) -> None:
    """Move the CPU tensors at ``getattr(obj, name)`` for each ``(obj, name)`` in
    ``slots`` into one buffer from ``empty``: contiguous copies laid end to end,
    each 64-byte aligned, set back on their attributes one by one (so each
    source is freed as soon as nothing else holds it: the peak is one tensor
    over the weights, not two copies of them). An object found at two slots
    (a tied embedding and head) gets one copy."""
    sizes, seen = [], set()
    for obj, name in slots:
        t = getattr(obj, name)
        if id(t) not in seen:
            seen.add(id(t))
            sizes.append(_aligned(t.numel() * t.element_size()))
    buf, pos, copies = empty(sum(sizes)), 0, {}
    for obj, name in slots:
        t = getattr(obj, name)
        if id(t) not in copies:
            n = t.numel() * t.element_size()
            view = buf[pos:pos + n].view(t.dtype).view(t.shape)
            view.copy_(t)
            # keyed by the source's id: a source still at a later slot is alive,
            # so no other live source can share its id (only views are made here)
            copies[id(t)] = view
            pos += _aligned(n)
        setattr(obj, name, copies[id(t)])
        del t                               # the source goes once its last slot moved


def zeros(shape: tuple, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
    """``count`` zero tensors of ``shape`` and ``dtype`` in one buffer from ``empty``."""
    size = torch.Size(shape).numel() * dtype.itemsize
    step = _aligned(size)
    buf = empty(step * count, zeroed=True)
    return [buf[i * step:i * step + size].view(dtype).view(shape) for i in range(count)]
