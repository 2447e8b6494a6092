"""Argument checks for the public ops. Every message names the op, the
argument, what was expected and what was given."""
from __future__ import annotations

import struct

import torch

from . import config

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class OpArgError(ValueError):
    """A bad argument to a kernelforge op."""


def fail(op: str, arg: str, expected: str, got) -> None:
    raise OpArgError(f"{op}: `{arg}` expected {expected}, got {got}")


def tensor(op: str, arg: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, arg, "a torch.Tensor", type(t).__name__)


def float_dtype(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        fail(op, arg, "dtype float32, bfloat16 or float16", t.dtype)


def same_dtype(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        fail(op, arg, f"dtype {ref.dtype} (the dtype of `{ref_arg}`)", t.dtype)


def same_device(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        fail(op, arg, f"a tensor on {ref.device} (where `{ref_arg}` is)", f"one on {t.device}")


def last_dim_contiguous(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(op, arg, "a contiguous last dimension (stride 1)", f"stride {t.stride(-1)}")


def shape(op: str, arg: str, t: torch.Tensor, want: tuple, why: str = "") -> None:
    if tuple(t.shape) != tuple(want):
        fail(op, arg, f"shape {list(want)}{why}", list(t.shape))


def positive(op: str, arg: str, v) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        fail(op, arg, "a number > 0", repr(v))


def number(op: str, arg: str, v) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
        fail(op, arg, "a finite number", repr(v))


def at_least_1d(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dim() < 1:
        fail(op, arg, "at least 1 dimension", "a 0-d tensor")


def rows(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t`` as [rows, last dim] and whether that is a copy: a view when the
    leading dims allow one (rows may keep a stride), else a copy, which an
    output must be written back from."""
    if t.dim() == 2:
        return t, False
    try:
        return t.view(-1, t.shape[-1]), False
    except RuntimeError:
        return t.reshape(-1, t.shape[-1]), True     # not viewable: reshape copies


def inlining() -> bool:
    """True while a torch.compile trace runs an op inline (config.inline()):
    the op's torch lowering joins the caller's graph instead of an opaque call."""
    return torch.compiler.is_compiling() and config.inline()


def opaque() -> bool:
    """True while a torch.compile trace should record an opaque custom op."""
    return torch.compiler.is_compiling() and not config.inline()


def no_host_check_inline(op: str, arg: str, value: bool) -> None:
    """Checks that read tensor values need a host sync, which a compiled
    graph cannot make: inline, the caller must turn them off explicitly."""
    if value and inlining():
        fail(op, arg, "False when the op is traced into a compiled graph "
             "(kernelforge.config.inline()): the check reads values on the host; "
             "check them before the graph", repr(value))


_F32_MAX = float(torch.finfo(torch.float32).max)


def fp32_number(op: str, arg: str, v, positive: bool = False, low=None, high=None) -> None:
    """A Python number that a kernel reads as fp32: finite there (10**400 or
    1e300 are not), > 0 after rounding when ``positive`` (1e-50 is 0 in fp32),
    and within ``[low, high]`` when given."""
    plain = "a number > 0" if positive else "a finite number"
    ranged = ("a finite number > 0" if positive else "a finite number") + \
        " within float32's range (|v| <= 3.4e38)"
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        fail(op, arg, plain, repr(v))
    if isinstance(v, int) and abs(v) > _F32_MAX:
        fail(op, arg, ranged, repr(v))
    f = float(v)
    if f != f or (positive and not f > 0):
        fail(op, arg, plain, repr(v))
    if abs(f) > _F32_MAX:
        fail(op, arg, ranged, repr(v))
    if positive and not struct.unpack("f", struct.pack("f", f))[0] > 0:
        fail(op, arg, "a number > 0 once rounded to float32", repr(v))
    if (low is not None and f < low) or (high is not None and f > high):
        fail(op, arg, f"a number in [{low}, {high}]", repr(v))


def integer(op: str, arg: str, v, low=None, high=None, why: str = "",
            optional: bool = False) -> None:
    """A Python int (not a bool) in ``[low, high]`` (``optional``: or None,
    which the caller has let through)."""
    lo = "" if low is None else f">= {low}"
    hi = "" if high is None else f"<= {high}"
    want = ("None or " if optional else "") + \
        f"an int {' and '.join(x for x in (lo, hi) if x)}".rstrip() + why
    if not isinstance(v, int) or isinstance(v, bool):
        fail(op, arg, want, repr(v))
    if (low is not None and v < low) or (high is not None and v > high):
        fail(op, arg, want, repr(v))


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share a memory location. Exact for tensors of the
    same strides (q and k sliced from one fused qkv tensor are disjoint),
    conservative otherwise (intersecting byte ranges count as overlap)."""
    if torch.compiler.is_compiling():
        return a is b        # no addresses while tracing: the custom op checks when it runs
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a is b:
        return True
    lo_a, hi_a = _extent(a)
    lo_b, hi_b = _extent(b)
    if hi_a <= lo_b or hi_b <= lo_a:
        return False
    if a.stride() != b.stride() or a.element_size() != b.element_size() or \
            (b.storage_offset() - a.storage_offset()) * a.element_size() != \
            b.data_ptr() - a.data_ptr():
        return True
    dims = sorted(((s, na, nb) for s, na, nb in zip(a.stride(), a.shape, b.shape)
                   if s and (na > 1 or nb > 1)), reverse=True)
    return _reachable(b.storage_offset() - a.storage_offset(), dims)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (span + 1) * t.element_size()


def _reachable(delta: int, dims: list, budget: list | None = None) -> bool:
    """Whether ``delta = sum_k s_k d_k`` for some ``d_k`` in ``[-(nb_k-1), na_k-1]``
    (an element of one tensor at the offset of one of the other). A search over
    the digits the remaining strides can still complete: exact, also for
    interleaved strides (vLLM's CPU KV cache puts each block's keys and values
    in turn per head); past a few thousand steps it answers "overlaps"."""
    budget = [4096] if budget is None else budget
    if not dims:
        return delta == 0
    (s, na, nb), rest = dims[0], dims[1:]
    hi = sum(r * (n - 1) for r, n, _ in rest)
    lo = -sum(r * (m - 1) for r, _, m in rest)
    first = max(-(nb - 1), -((-(delta - hi)) // s))
    last = min(na - 1, (delta - lo) // s)
    for d in range(first, last + 1):
        budget[0] -= 1
        if budget[0] < 0 or _reachable(delta - d * s, rest, budget):
            return True
    return False


def self_overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share a memory location (an expanded,
    stride-0 view): a tensor written by an op must not."""
    if torch.compiler.is_compiling():
        return False
    if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        return True
    return torch._debug_has_internal_overlap(t) == 1


def no_self_overlap(op: str, arg: str, t: torch.Tensor) -> None:
    if self_overlaps(t):
        fail(op, arg, "a tensor whose elements do not share memory (the op writes it)",
             f"one with strides {list(t.stride())} for shape {list(t.shape)}")


def no_overlap(op: str, arg: str, t: torch.Tensor, others) -> None:
    """``t`` (written by the op) shares no memory with any of ``others``
    (``(name, tensor or None)`` pairs)."""
    for name, o in others:
        if isinstance(o, torch.Tensor) and overlaps(t, o):
            fail(op, arg, f"memory of its own (the op writes it while reading `{name}`)",
                 f"a tensor that overlaps `{name}`")


def no_overlap_among(op: str, written, tensors) -> None:
    """Each tensor the op writes in place overlaps no other tensor argument,
    nor itself."""
    for name, t in written:
        no_self_overlap(op, name, t)
        no_overlap(op, name, t, [(n, o) for n, o in tensors if n != name])
