"""What the source printers share: the walk over a linearized kernel, the
names of values, and the facts about tiles (blocks, padding, scalar axes)
that each target sizes with its own hooks.

A target language is a subclass holding its op table and these hooks:

- ``prologue(events)``: what comes before the first event (program ids,
  sizes, use counts);
- ``define(n)``: how a value is computed (or why it is not: inlined, fused);
- ``ev_begin`` / ``ev_end`` / ``ev_store``: a loop's header and footer, a store;
- ``emit(events)`` when loops are printed other than one event at a time
  (split into interior and edges, chunks with and without masks);
- for tiled targets, ``full_block(axis, size)`` and ``chunk_block(size)``:
  the block of a whole static axis and of a chunk of a static ``seq_for``.

Mixins that add one concern to a printer are named ``<Topic>Rules``
(``LoopRules``, ``DotRules``, ``ValueRules``, ``PrefetchRules``).
"""
from __future__ import annotations

from ..ir.analysis import Analysis, linearize
from ..ir.nodes import Node, Op
from .codegen import expand, literal


class PrinterBase:
    def __init__(self, k, an: Analysis):
        self.k, self.an = k, an
        self.names: dict = {}           # node id -> the name of its value
        self.count = 0                  # generated names so far
        self.unmasked: set[int] = set()     # loop tiles now printed with no mask

    # -- axes and tiles ---------------------------------------------------------
    def size(self, axis: str) -> str:
        """An axis's extent in source: a literal when static, else its name."""
        s = self.k.axes[axis].size
        return str(s) if s is not None else axis

    def scalar_axis(self, a: str) -> bool:
        """A parallel axis of block 1: one index per program, not a dim."""
        return any(g.arg[0] == a and g.arg[2] == 1 for g in self.k.grid)

    def tdims(self, n: Node) -> tuple[str, ...]:
        """The axes ``n`` is a block along (its axes but the scalar ones)."""
        return tuple(a for a in n.axes if not self.scalar_axis(a))

    def bounded(self, t: Node | None) -> bool:
        """``t`` is the tile of a seq_for with start/stop bounds."""
        return (t is not None and t.op == Op.RANGE and t.arg[1] == "seq"
                and self.an.loops[t.arg[2]].bounded)

    def block(self, t: Node) -> int:
        axis, kind = t.arg[0], t.arg[1]
        if kind == "parallel":
            return t.arg[2]
        size = self.k.axes[axis].size
        if kind == "full":
            return self.full_block(axis, size)
        if size is None:
            return self.sched.dynamic_block
        return self.chunk_block(size)

    def full_block(self, axis: str, size: int) -> int:
        raise NotImplementedError

    def chunk_block(self, size: int) -> int:
        raise NotImplementedError

    def padded(self, t: Node) -> bool:
        """Whether tile ``t`` has lanes to mask: past the extent, or outside
        a bounded loop's range (not while printed ``unmasked``)."""
        if id(t) in self.unmasked:
            return False
        if self.bounded(t):
            return True
        size, b = self.k.axes[t.arg[0]].size, self.block(t)
        if t.arg[1] == "parallel" and b == 1:
            return False
        return size is None or size % b != 0 or (t.arg[1] == "full" and b != size)

    # -- names --------------------------------------------------------------------
    def name(self, n: Node) -> str:
        if n.op == Op.PARAM:
            return n.arg.name
        if n.op == Op.CONST:
            return self.literal(n)
        if n.op == Op.SIZE:
            return n.arg
        if n.op == Op.RANGE:
            return self.range_name(n)
        return self.names[id(n)]

    def literal(self, n: Node) -> str:
        return literal(n.arg)

    def range_name(self, n: Node) -> str:
        raise NotImplementedError

    def operand(self, n: Node, want: tuple[str, ...]) -> str:
        """``n`` broadcast to the dims ``want`` by axis name."""
        return expand(self.name(n), self.tdims(n), want)

    # -- driver -------------------------------------------------------------------
    def run(self) -> None:
        events = list(linearize(self.k, self.an))
        self.prologue(events)
        self.emit(events)

    def prologue(self, events) -> None:
        pass

    def emit(self, events) -> None:
        for ev, n in events:
            getattr(self, "ev_" + ev)(n)

    def ev_node(self, n: Node) -> None:
        if n.op in (Op.PARAM, Op.CONST, Op.SIZE):
            return
        if n.op == Op.LOOP_OUT:             # a loop's result is its carried value
            self.names[id(n)] = self.names[id(n.src[0].arg.carries[n.arg])]
            return
        self.define(n)

    def define(self, n: Node) -> None:
        raise NotImplementedError
