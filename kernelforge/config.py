"""Environment switches, read in one place.

KERNELFORGE_BACKEND      force a lowering for every op (eager, inductor, triton, or a plug-in)
KERNELFORGE_CACHE_DIR    where generated sources live (default ~/.cache/kernelforge)
KERNELFORGE_DUMP=1       print each generated module to stderr when it is built
KERNELFORGE_TRITON_MAX_BLOCK  cap on a Triton chunk along one axis (default 8192)
KERNELFORGE_INLINE=1     under torch.compile, trace ops into the caller's graph (see inline())
"""
from __future__ import annotations

import os


def env_backend() -> str | None:
    v = os.environ.get("KERNELFORGE_BACKEND", "").strip()
    return v or None


def cache_dir() -> str:
    d = os.environ.get("KERNELFORGE_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "kernelforge")
    return d


def dump() -> bool:
    return os.environ.get("KERNELFORGE_DUMP", "") not in ("", "0")


def triton_max_block() -> int:
    return int(os.environ.get("KERNELFORGE_TRITON_MAX_BLOCK", "8192"))


_inline: bool | None = None


def inline() -> bool:
    """Whether ops called inside a torch.compile'd function are traced into
    its graph (the torch lowering, fused by Inductor with the code around
    it) instead of staying opaque ``torch.ops.kernelforge.*`` calls. Off by
    default (the opaque ops are what engines register); set_inline(True) or
    KERNELFORGE_INLINE=1 turns it on. Checks that read values on the host
    (check_positions, check_slots, check_tables) must then be False: inline,
    an op raises naming the flag otherwise."""
    if _inline is not None:
        return _inline
    return os.environ.get("KERNELFORGE_INLINE", "") not in ("", "0")


def set_inline(on: bool | None) -> None:
    """Turn inlining into compiled graphs on or off (None: back to the env)."""
    global _inline
    _inline = on
