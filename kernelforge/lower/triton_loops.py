"""How the Triton printer prints ``seq_for`` loops: carried values, the walk
over chunks (per-row bounds for a bounded loop), the chunk's masks, and a
bounded loop split into its unmasked interior and masked edges
(``split_loop``). A mixin of ``triton_printer._Printer``: ``emit`` walks
the events, sending a splittable loop to ``split_loop``."""
from __future__ import annotations

from ..ir.nodes import Node, Op
from .codegen import expand, identity, literal
from .triton_helpers import COMBINE as _COMBINE


class LoopRules:
    def emit(self, events) -> None:
        i = 0
        while i < len(events):
            ev, n = events[i]
            if ev == "begin":
                j = next(j for j in range(i + 1, len(events))
                         if events[j][0] == "end" and events[j][1] is n)
                if self.splittable(n, events[i + 1:j]):
                    self.split_loop(n, events[i + 1:j])
                    i = j + 1
                    continue
            getattr(self, "ev_" + ev)(n)
            i += 1

    def ev_begin(self, s: Node) -> None:
        loop, o = s.arg, self.out
        t = loop.range
        axis, b = loop.axis, self.block(t)
        lo, hi = self.loop_prelude(s)
        offs, a = self.tile_names[id(t)][0], f"{axis.lower()}{loop.id}"
        size = self.k.axes[axis].size
        if size is not None and size <= b:
            o.line(f"# seq_for over {axis}: one chunk of {b} covers all {size}")
            o.line(f"{offs} = tl.arange(0, {b})")
            self.straight.add(s.arg.id)
        else:
            o.line(f"for start_{a} in tl.range({lo or 0}, {hi or self.size(axis)}, {b}):")
            o.indent()
            o.line(f"{offs} = start_{a} + tl.arange(0, {b})")
        self.loop_masks(s, lo, hi)

    def loop_prelude(self, s: Node):
        """A loop's carried values, tile names and, for a bounded loop, the
        program's walk: from the smallest start to the largest stop of its rows."""
        loop, o = s.arg, self.out
        axis = loop.axis
        o.src(loop.loc)
        for c, init in zip(loop.carries, s.src):
            nm = self.names[id(c)] = f"c{loop.id}_{c.arg[1]}"
            o.line(f"{nm} = {self.materialize(init, c)}")
        a = f"{axis.lower()}{loop.id}"
        self.tile_names[id(loop.range)] = (f"offs_{a}", f"mask_{a}")
        if not loop.bounded:
            return None, None
        # the program's rows may each have their own range: walk from the
        # smallest start to the largest stop; lanes outside a row's range are masked
        lo, hi = f"lo_{a}", f"hi_{a}"
        self.loop_bound(lo, loop.start, "min", "0", axis)
        self.loop_bound(hi, loop.stop, "max", self.size(axis), axis)
        return lo, hi

    def loop_bound(self, nm: str, b_node, red: str, dflt: str, axis: str) -> None:
        """``nm`` = the ``red`` (min/max) of bound ``b_node`` over the program's
        valid rows, clamped into [0, extent]: bad host data (a stop of 2**31 - 1,
        a negative start) walks only the axis, as the C++ lowering does. The
        four bounds of a loop are clamped alike, so a scalar bound stays one value."""
        if b_node is None:
            self.out.line(f"{nm} = {dflt}")
            return
        elif self.tdims(b_node):
            self.helpers.add(_COMBINE[red])
            b = self.name(b_node)
            valid = self.mask(b_node, self.tdims(b_node))
            if valid:       # padded rows (bounds read as 0) must not widen the walk
                b = f"tl.where({valid}, {b}, {identity(red, b_node.dtype)})"
            self.out.line(f"{nm} = tl.reduce({b}, None, _{red}_combine)")
        else:
            self.out.line(f"{nm} = {self.name(b_node)}")
        self.out.line(f"{nm} = tl.minimum(tl.maximum({nm}, 0), {self.size(axis)})")

    def loop_masks(self, s: Node, lo, hi) -> None:
        """The chunk's mask (padding, the walk's bounds) and, when rows have
        their own bounds, the per-row mask."""
        loop, o = s.arg, self.out
        t, axis = loop.range, loop.axis
        offs, mask = self.tile_names[id(t)]
        if not self.padded(t):
            return
        extent = f"{offs} < {self.size(axis)}"
        if loop.bounded:
            extent = f"({offs} >= {lo}) & ({offs} < {hi}) & ({extent})"
        o.line(f"{mask} = {extent}")
        rows = sorted({a for bn in loop.bounds() for a in self.tdims(bn)},
                      key=list(self.k.axes).index)
        if rows:
            axes = tuple(a for a in self.k.axes if a in rows or a == axis)
            rmask = f"rmask_{axis.lower()}{loop.id}"
            parts = [expand(mask, (axis,), axes)]
            for bn, op in ((loop.start, ">="), (loop.stop, "<")):
                if bn is not None and self.tdims(bn):
                    parts.append(f"({expand(offs, (axis,), axes)} {op} "
                                 f"{expand(self.name(bn), self.tdims(bn), axes)})")
            o.line(f"{rmask} = {' & '.join(parts)}")
            self.row_masks[id(t)] = (rmask, axes)

    def splittable(self, s: Node, body) -> bool:
        """A bounded loop over chunks whose body has no loop or store of its own."""
        loop = s.arg
        size = self.k.axes[loop.axis].size
        return (loop.bounded and (size is None or size > self.block(loop.range))
                and all(ev == "node" for ev, _ in body))

    def split_loop(self, s: Node, body) -> None:
        """A bounded loop as two: the chunks every row of the program sees
        whole, with no masks at all (causal prefill's keys left of the
        diagonal, a decode row's keys but the last chunk), then the rest, the
        first chunks up to the interior and the last from it, masked per row.
        The online softmax is indifferent to the order it sees chunks in."""
        loop, o = s.arg, self.out
        t, axis, b = loop.range, loop.axis, self.block(loop.range)
        lo, hi = self.loop_prelude(s)
        offs = self.tile_names[id(t)][0]
        a = f"{axis.lower()}{loop.id}"
        s0, s1, start = f"s0_{a}", f"s1_{a}", f"start_{a}"
        self.loop_bound(f"lo_in_{a}", loop.start, "max", "0", axis)
        self.loop_bound(f"hi_in_{a}", loop.stop, "min", self.size(axis), axis)
        o.line(f"# chunks in [{s0}, {s1}) lie inside every row's range: no masks there")
        o.line(f"{s0} = {lo} + (tl.maximum(lo_in_{a} - {lo}, 0) + {b} - 1) // {b} * {b}")
        o.line(f"{s1} = {s0} + tl.maximum(hi_in_{a} - {s0}, 0) // {b} * {b}")
        o.line(f"for {start} in tl.range({s0}, {s1}, {b}):")
        o.indent()
        o.line(f"{offs} = {start} + tl.arange(0, {b})")
        self.unmasked.add(id(t))
        self.loop_body(s, body)
        self.unmasked.discard(id(t))
        o.line(f"# the rest: chunks from {lo} up to {s0}, then from {s1} up to {hi}, masked")
        o.line(f"n_head_{a} = ({s0} - {lo}) // {b}")
        o.line(f"n_edge_{a} = n_head_{a} + (tl.maximum({hi} - {s1}, 0) + {b} - 1) // {b}")
        o.line(f"for i_{a} in tl.range(0, n_edge_{a}):")
        o.indent()
        o.line(f"{start} = {lo} + i_{a} * {b} + (i_{a} >= n_head_{a}).to(tl.int32) * "
               f"({s1} - {s0})")
        o.line(f"{offs} = {start} + tl.arange(0, {b})")
        self.loop_masks(s, lo, hi)
        self.loop_body(s, body)

    def loop_body(self, s: Node, body) -> None:
        for ev, n in body:
            self.ev_node(n)
        for c, y in zip(s.arg.carries, s.arg.yields):
            self.out.line(f"{self.names[id(c)]} = {self.name(y)}")
        self.out.dedent()

    def materialize(self, init: Node, c: Node) -> str:
        """Loop-carried values need a fixed type: give literals a typed block."""
        if init.op == Op.CONST:
            shape = ", ".join(str(self.block(self.an.tiles(c)[a])) for a in self.tdims(c))
            return f"tl.full([{shape}], {literal(init.arg)}, {init.dtype.triton})"
        return self.name(init)

    def ev_end(self, s: Node) -> None:
        loop = s.arg
        for c, y in zip(loop.carries, loop.yields):
            self.out.line(f"{self.names[id(c)]} = {self.name(y)}")
        if loop.id not in self.straight:
            self.out.dedent()
