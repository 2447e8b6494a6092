"""The kernel IR: one node class over one enum of ops.

The ``Op`` enum below is the specification of the abstract machine every
lowering implements. Values are *block tensors over named axes*: a node's
``axes`` lists the kernel axes it varies along, always in the kernel's axis
order, so broadcasting is by name and no lowering needs ``keepdim``
bookkeeping from the kernel author.

Tiles keep the logical extent of an axis apart from the padded block a
lowering picks: masks are never written by the author, they are derived
from the axes an access varies along (``Axis.size`` versus the block).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from .dtypes import DType


class Op(Enum):
    # -- structure --------------------------------------------------------
    PARAM = auto()      # a kernel argument; arg = Param
    RANGE = auto()      # indices of one tile of an axis; arg = (axis, kind, id)
    SEQ_FOR = auto()    # sequential loop over tiles of an axis; arg = Loop; src = init values
    CARRY = auto()      # a loop-carried value inside its loop body; arg = (Loop id, i)
    LOOP_OUT = auto()   # i-th carried value after the loop; src = (SEQ_FOR,), arg = i
    # -- creation ---------------------------------------------------------
    CONST = auto()      # a scalar literal; arg = Python value
    FULL = auto()       # a block filled with one value over `axes`; arg = value
    SIZE = auto()       # the runtime extent of an axis; arg = axis name
    # -- memory -----------------------------------------------------------
    LOAD = auto()       # src = (param, *index per tensor dim); arg = id of the loop it is in
    STORE = auto()      # src = (param, value, *index per tensor dim)
    # -- elementwise: unary -------------------------------------------------
    NEG = auto(); ABS = auto(); EXP = auto(); EXP2 = auto(); LOG = auto(); LOG2 = auto()
    SQRT = auto(); RSQRT = auto(); SIN = auto(); COS = auto(); TANH = auto()
    SIGMOID = auto(); RECIP = auto(); FLOOR = auto(); NOT = auto()
    # -- elementwise: binary ------------------------------------------------
    ADD = auto(); SUB = auto(); MUL = auto(); DIV = auto(); MAX = auto(); MIN = auto()
    IDIV = auto(); MOD = auto()  # integer division and remainder, C semantics (toward 0)
    LT = auto(); LE = auto(); GT = auto(); GE = auto(); EQ = auto(); NE = auto()
    AND = auto(); OR = auto(); XOR = auto(); SHL = auto(); SHR = auto()
    MULHI = auto()      # high 32 bits of a 32x32-bit unsigned product (counter-based RNGs)
    # -- elementwise: other -------------------------------------------------
    WHERE = auto()      # src = (cond, a, b)
    CAST = auto()       # the only op that changes precision; dtype = target
    BITCAST = auto()    # reinterpret bits; same width
    # -- contraction, reduction, ordering -----------------------------------
    REDUCE = auto()     # arg = (axis, op in REDUCE_KINDS); removes the axis
    DOT = auto()        # src = (a, b); arg = contracted axis; accumulates in `dtype`
    SCAN = auto()       # arg = (axis, "sum" | "max"); inclusive prefix
    SORT = auto()       # arg = (axis, descending); values sorted along the axis
    # k largest values along a new axis, or their positions along `axis` (i32);
    # src = (x, whole tile of new_axis); arg = (axis, k, new_axis, "values" | "indices")
    TOPK = auto()


UNARY = frozenset({Op.NEG, Op.ABS, Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.RSQRT, Op.SIN,
                   Op.COS, Op.TANH, Op.SIGMOID, Op.RECIP, Op.FLOOR, Op.NOT})
FLOAT_ONLY = frozenset({Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.RSQRT, Op.SIN, Op.COS,
                        Op.TANH, Op.SIGMOID, Op.RECIP, Op.FLOOR, Op.DIV})
COMPARE = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
INT_ONLY = frozenset({Op.AND, Op.OR, Op.XOR, Op.SHL, Op.SHR, Op.MULHI, Op.NOT, Op.IDIV, Op.MOD})
BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAX, Op.MIN, Op.MOD, Op.IDIV, Op.AND, Op.OR,
                    Op.XOR, Op.SHL, Op.SHR}) | COMPARE

# Identity of each reduction: what a padded lane must hold so it cannot win.
REDUCE_IDENTITY = {"sum": 0.0, "max": float("-inf"), "min": float("inf"),
                   "argmax": float("-inf"), "argmin": float("inf")}


@dataclass(frozen=True)
class SrcLoc:
    """Where in the kernel author's file a node was written."""
    file: str
    line: int
    text: str = ""

    def short(self) -> str:
        import os
        return f"{os.path.basename(self.file)}:{self.line}"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Axis:
    """A named iteration axis. ``size`` is an int when it is specialised
    (part of the cache key, e.g. the hidden size) and None when it is a
    runtime value (rows, tokens) that must never cause a recompile."""
    name: str
    size: int | None


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                      # "in", "out", "scalar"
    dtype: DType
    axes: tuple[str, ...] = ()     # tensor dims, by axis name


@dataclass(eq=False)
class Loop:
    """Body of a SEQ_FOR: the tile RANGE, carried placeholders, statements
    (STORE / SEQ_FOR nodes in program order) and the yielded values."""
    axis: str
    loc: SrcLoc
    id: int = 0                          # unique within its kernel
    range: "Node | None" = None
    carries: tuple["Node", ...] = ()
    stmts: list["Node"] = field(default_factory=list)
    yields: tuple["Node", ...] = ()
    parent: "Loop | None" = None
    # Bounds: lanes outside [start, stop) are masked for each row (None: 0 / the extent).
    # They may vary along parallel axes (one range per row, as causal attention needs).
    start: "Node | None" = None
    stop: "Node | None" = None

    @property
    def bounded(self) -> bool:
        return self.start is not None or self.stop is not None

    def bounds(self) -> tuple["Node", ...]:
        return tuple(b for b in (self.start, self.stop) if b is not None)


@dataclass(frozen=True, eq=False)
class Node:
    op: Op
    dtype: DType | None
    axes: tuple[str, ...]
    src: tuple["Node", ...] = ()
    arg: Any = None
    loc: SrcLoc | None = None

    def __repr__(self) -> str:  # short form; the full form is the kernel printer's
        return f"<{self.op.name} {self.dtype} {list(self.axes)}>"


class Graph:
    """Builds nodes for one kernel, hash-consing pure nodes so identical
    expressions are shared (free CSE and stable printing). Loads, stores and
    loop structure are never merged: their order matters."""

    _UNIQUE = frozenset({Op.LOAD, Op.STORE, Op.SEQ_FOR, Op.CARRY, Op.RANGE})

    def __init__(self) -> None:
        self._memo: dict[tuple, Node] = {}

    def node(self, op: Op, dtype, axes, src=(), arg=None, loc=None) -> Node:
        if op in self._UNIQUE:
            return Node(op, dtype, tuple(axes), tuple(src), arg, loc)
        key = (op, dtype, tuple(axes), tuple(id(s) for s in src), _hashable(arg))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = Node(op, dtype, tuple(axes), tuple(src), arg, loc)
        return hit


def _hashable(arg):
    try:
        hash(arg)
        # 0.0 == -0.0 and 1 == 1.0 == True hash alike; keep their types apart
        return (type(arg), arg, str(arg))
    except TypeError:
        return id(arg)
