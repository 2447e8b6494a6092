"""``Value``: the handle kernel authors compute with. Operators build IR
nodes; broadcasting is by axis name (the result varies along the union of
its operands' axes)."""
from __future__ import annotations

import re

from . import dtypes as dt
from .builder import as_node, caller_loc, node
from .errors import KernelError
from .nodes import COMPARE, Node, Op, Param


# a call of Python's builtin max/min (not kl.max, x.max, np.max)
_BUILTIN_EXTREMUM = re.compile(r"(?<![\w.])(max|min)\s*\(")


def _idiv(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


# Integer ops on literals fold at trace time (exact; e.g. a static size // 2).
_FOLD = {
    Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
    Op.IDIV: _idiv, Op.MOD: lambda a, b: a - b * _idiv(a, b), Op.MAX: max, Op.MIN: min,
    Op.AND: lambda a, b: a & b, Op.OR: lambda a, b: a | b, Op.XOR: lambda a, b: a ^ b,
    Op.SHL: lambda a, b: a << b, Op.SHR: lambda a, b: a >> b,
}


def elementwise(op: Op, *xs) -> "Value":
    like = next((x.node for x in xs if isinstance(x, Value)), None)
    srcs = tuple(as_node(x, like) for x in xs)
    if (op in _FOLD and all(s.op == Op.CONST and s.dtype == srcs[0].dtype and
                            s.dtype in (dt.i32, dt.i64) for s in srcs)
            and not (op in (Op.IDIV, Op.MOD) and srcs[1].arg == 0)):
        v = _FOLD[op](*(s.arg for s in srcs))
        bits = srcs[0].dtype.bits           # wrap like the hardware would
        v = ((v + (1 << (bits - 1))) % (1 << bits)) - (1 << (bits - 1))
        return Value(node(Op.CONST, srcs[0].dtype, (), (), v))
    axes = tuple(a for s in srcs for a in s.axes)
    if op in COMPARE:
        dtype = dt.bool_
    elif op == Op.WHERE:
        dtype = srcs[1].dtype
    else:
        dtype = srcs[0].dtype
    return Value(node(op, dtype, axes, srcs))


class Value:
    __slots__ = ("node",)
    __hash__ = object.__hash__

    def __init__(self, n: Node):
        self.node = n

    @property
    def dtype(self) -> dt.DType:
        return self.node.dtype

    @property
    def axes(self) -> tuple[str, ...]:
        return self.node.axes

    def to(self, dtype: dt.DType) -> "Value":
        """Explicit cast: the only way a value changes precision."""
        if not isinstance(dtype, dt.DType):
            raise KernelError(f"to() expects a kernelforge dtype such as kl.f32, got {dtype!r}",
                              caller_loc())
        if dtype == self.dtype:
            return self
        if self.node.op == Op.CONST:  # fold: literals take the target type directly
            v = self.node.arg
            v = float(v) if dtype.is_float else (bool(v) if dtype == dt.bool_ else int(v))
            return Value(node(Op.CONST, dtype, (), (), v))
        return Value(node(Op.CAST, dtype, self.axes, (self.node,)))

    def bitcast(self, dtype: dt.DType) -> "Value":
        """Reinterpret the bits as ``dtype`` (same width)."""
        if self.node.op == Op.CONST:
            raise KernelError("bitcast() of a literal: write the literal in the target type",
                              caller_loc())
        return Value(node(Op.BITCAST, dtype, self.axes, (self.node,)))

    def __add__(self, o): return elementwise(Op.ADD, self, o)
    def __radd__(self, o): return elementwise(Op.ADD, o, self)
    def __sub__(self, o): return elementwise(Op.SUB, self, o)
    def __rsub__(self, o): return elementwise(Op.SUB, o, self)
    def __mul__(self, o): return elementwise(Op.MUL, self, o)
    def __rmul__(self, o): return elementwise(Op.MUL, o, self)
    def __truediv__(self, o): return elementwise(Op.DIV, self, o)
    def __rtruediv__(self, o): return elementwise(Op.DIV, o, self)
    def __floordiv__(self, o): return elementwise(Op.IDIV, self, o)
    def __mod__(self, o): return elementwise(Op.MOD, self, o)
    def __and__(self, o): return elementwise(Op.AND, self, o)
    def __or__(self, o): return elementwise(Op.OR, self, o)
    def __xor__(self, o): return elementwise(Op.XOR, self, o)
    def __lshift__(self, o): return elementwise(Op.SHL, self, o)
    def __rshift__(self, o): return elementwise(Op.SHR, self, o)
    def __neg__(self): return elementwise(Op.NEG, self)
    def __invert__(self): return elementwise(Op.NOT, self)
    def __lt__(self, o): return elementwise(Op.LT, self, o)
    def __le__(self, o): return elementwise(Op.LE, self, o)
    def __gt__(self, o): return elementwise(Op.GT, self, o)
    def __ge__(self, o): return elementwise(Op.GE, self, o)
    def __eq__(self, o): return elementwise(Op.EQ, self, o)  # type: ignore[override]
    def __ne__(self, o): return elementwise(Op.NE, self, o)  # type: ignore[override]

    def __bool__(self):
        loc = caller_loc()
        if loc is not None and _BUILTIN_EXTREMUM.search(loc.text):
            # max(v, 0.0) compares v with `<` and asks the result for a truth value
            raise KernelError("Python's max()/min() on an IR value compares it and needs a "
                              "truth value, which a value has not while tracing; use "
                              "kl.maximum(a, b) / kl.minimum(a, b) per lane (kl.max(x, axis) / "
                              "kl.min(x, axis) reduce along an axis)", loc)
        raise KernelError("an IR value has no truth value while tracing: Python `if`, `while`, "
                          "`and`, `or`, `not` and chained comparisons need one; select with "
                          "kl.where(cond, a, b) and combine conditions with `&`, `|`, `~`", loc)

    def __repr__(self) -> str:
        return f"Value({self.node!r})"


class TensorArg:
    """A tensor parameter. ``x[m, n]`` names the element block to load or
    store; each index is a tile (from ``parallel``/``seq_for``/``tile``),
    a tile plus an offset, an integer value (a gather), or an int."""

    def __init__(self, n: Node, param: Param):
        self.node, self.param = n, param

    @property
    def dtype(self) -> dt.DType:
        return self.param.dtype

    @property
    def name(self) -> str:
        return self.param.name

    def __getitem__(self, index) -> "TensorRef":
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) != len(self.param.axes):
            raise KernelError(f"tensor `{self.name}` has {len(self.param.axes)} dims "
                              f"{list(self.param.axes)}, indexed with {len(index)}", caller_loc())
        nodes = []
        for i in index:
            n = as_node(i)
            if not (n.dtype is not None and n.dtype.is_int):
                raise KernelError(f"index of `{self.name}` must be an integer tile or value, "
                                  f"got {n.dtype}", caller_loc())
            nodes.append(n)
        return TensorRef(self, tuple(nodes))

    def __repr__(self) -> str:
        return f"TensorArg({self.name}: {self.dtype}{list(self.param.axes)})"


class TensorRef:
    def __init__(self, tensor: TensorArg, index: tuple[Node, ...]):
        self.tensor, self.index = tensor, index
