"""The benchmarks' allocator settings (glibc mallopt), in one place."""
from __future__ import annotations

import contextlib
import os


def keep_freed_memory() -> str:
    """glibc hands every block of 32 MiB or more back to the OS when it is freed,
    so each call that allocates a 4096x4096 output page-faults it in afresh and
    the kernel's own memory traffic is lost under that cost. Keep freed memory
    in the heap instead (as torch's GPU caching allocator, or jemalloc/tcmalloc,
    would). KF_BENCH_MALLOC=default keeps glibc's behaviour."""
    if os.environ.get("KF_BENCH_MALLOC", "keep") == "default":
        keep_freed_memory.mode = ("glibc default (KF_BENCH_MALLOC=default): large outputs "
                                  "page-fault on every call")
        return keep_freed_memory.mode
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = (libc.mallopt(m_mmap_threshold, 1 << 30) == 1
              and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1)
    except (OSError, AttributeError):
        ok = False
    keep_freed_memory.mode = (
        "glibc mallopt: freed memory kept in the heap (KF_BENCH_MALLOC=default to turn off)"
        if ok else "allocator unchanged (mallopt unavailable)")
    return keep_freed_memory.mode


@contextlib.contextmanager
def glibc_malloc_defaults():
    """glibc's thresholds as a long-running default process ends up with, for
    the duration: for benchmarks of a whole program (the runtime), which a
    user runs with the default allocator, not of one kernel's output buffers.
    glibc starts at 128 KiB and raises the mmap threshold as large blocks are
    freed, up to 32 MiB (trim threshold twice that); mallopt cannot turn that
    adjustment back on, so the settled values are set (the runtime's
    32-prompt rate under each mode: docs/runtime.md, "Measured: the issue's
    workload"). Restores the kept-memory mode after."""
    keep = getattr(keep_freed_memory, "mode", "").startswith("glibc mallopt")
    if keep:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)          # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)          # M_TRIM_THRESHOLD
    try:
        yield
    finally:
        if keep:
            keep_freed_memory()
