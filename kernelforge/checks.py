"""Argument checks for the public ops. Every message names the op, the
argument, what was expected and what was given."""
from __future__ import annotations

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
