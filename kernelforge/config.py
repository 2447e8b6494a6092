"""Environment switches, read in one place.

KERNELFORGE_BACKEND      force a lowering for every op (eager, inductor, triton, or a plug-in)
KERNELFORGE_CACHE_DIR    where generated sources live (default ~/.cache/kernelforge)
KERNELFORGE_DUMP=1       print each generated module to stderr when it is built
KERNELFORGE_TRITON_MAX_BLOCK  cap on a Triton chunk along one axis (default 8192)
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
