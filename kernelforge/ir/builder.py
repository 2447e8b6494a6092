"""Tracing front-end: kernel authors write plain Python over ``Value``s.

A ``@kernel`` function is called once per specialisation (tensor dtypes and
static axis sizes) with symbolic parameters; every DSL call appends IR
nodes to the kernel being traced, tagged with the author's source line.
"""
from __future__ import annotations

import linecache
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

from . import dtypes as dt
from .errors import KernelError
from .nodes import Axis, Graph, Loop, Node, Op, Param, SrcLoc

_IR_DIR = os.path.dirname(os.path.abspath(__file__))
_LANG = os.path.join(os.path.dirname(_IR_DIR), "lang.py")
_state = threading.local()


def caller_loc() -> SrcLoc | None:
    """The first stack frame outside the IR package: the author's line."""
    f = sys._getframe(1)
    while f is not None and (os.path.dirname(os.path.abspath(f.f_code.co_filename)) == _IR_DIR
                             or os.path.abspath(f.f_code.co_filename) == _LANG):
        f = f.f_back
    if f is None:
        return None
    file, line = f.f_code.co_filename, f.f_lineno
    return SrcLoc(file, line, linecache.getline(file, line).rstrip())


@dataclass(eq=False)
class Kernel:
    """One traced, specialised kernel: what the verifier checks and the
    lowerings print."""
    name: str
    params: tuple[Param, ...]
    axes: dict[str, Axis]                 # in kernel axis order
    grid: list[Node] = field(default_factory=list)    # parallel RANGE nodes, grid order
    stmts: list[Node] = field(default_factory=list)   # top-level STORE / SEQ_FOR nodes
    loc: SrcLoc | None = None
    graph: Graph = field(default_factory=Graph)
    loop_count: int = 0
    full_tiles: dict = field(default_factory=dict)   # axis -> whole-axis tile used by full()

    def order(self, axes) -> tuple[str, ...]:
        idx = list(self.axes)
        return tuple(sorted(set(axes), key=idx.index))

    def __str__(self) -> str:
        from .printer import format_kernel
        return format_kernel(self)


class _Tracer:
    def __init__(self, kernel: Kernel):
        self.k = kernel
        self.loops: list[Loop] = []

    @property
    def stmts(self) -> list[Node]:
        return self.loops[-1].stmts if self.loops else self.k.stmts


def tracer() -> _Tracer:
    t = getattr(_state, "tracer", None)
    if t is None:
        raise KernelError("kernelforge.lang calls are only valid inside a @kernel function "
                          "while it is traced", caller_loc())
    return t


def node(op: Op, dtype, axes, src=(), arg=None) -> Node:
    t = tracer()
    return t.k.graph.node(op, dtype, t.k.order(axes), src, arg, caller_loc())


def trace(fn: Callable, name: str, params: tuple[Param, ...], axes: dict[str, Axis],
          loc: SrcLoc | None) -> Kernel:
    from .value import TensorArg, Value
    k = Kernel(name, params, dict(axes), loc=loc)
    t = _Tracer(k)
    prev, _state.tracer = getattr(_state, "tracer", None), t
    try:
        args = []
        for p in params:
            n = k.graph.node(Op.PARAM, p.dtype, () if p.kind != "scalar" else (), (), p, loc)
            args.append(TensorArg(n, p) if p.kind != "scalar" else Value(n))
        fn(*args)
    finally:
        _state.tracer = prev
    return k


def as_node(x, like: Node | None = None) -> Node:
    """Python scalars become CONSTs of the other operand's dtype (weak
    typing, as in Triton and torch), so ``x * 0.5`` keeps x's precision."""
    from .value import Value
    if isinstance(x, Value):
        return x.node
    if isinstance(x, Node):
        return x
    if isinstance(x, bool):
        return node(Op.CONST, dt.bool_, (), (), x)
    if isinstance(x, (int, float)):
        if like is not None and like.dtype is not None and (like.dtype.is_float or isinstance(x, int)):
            d = like.dtype if like.dtype != dt.bool_ else dt.i32
        else:
            d = dt.f32 if isinstance(x, float) else dt.i32
        return node(Op.CONST, d, (), (), float(x) if d.is_float else int(x))
    raise KernelError(f"expected an IR value or a Python number, got {type(x).__name__}",
                      caller_loc())
