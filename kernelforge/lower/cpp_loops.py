"""How a ``seq_for`` becomes C++: a loop over chunks of its axis with the
carried values in locals (the cpp printer's loop half; its values are
``cpp_values.py``).

A chunk wholly inside every row's range runs a mask-free copy of the body.
Where the range is one per program (a decode row), the chunks that are not
whole run ``tail_block`` lanes at a time; elsewhere they run masked.
"""
from __future__ import annotations

from ..ir.nodes import Node, Op


class LoopRules:
    """Mixed into the cpp printer: ``emit`` walks the linearized events,
    opening and closing loops; statements go to its ``ev_*`` methods."""

    def emit(self, events) -> None:
        i = 0
        while i < len(events):
            ev, n = events[i]
            if ev == "store":
                # consecutive stores over the same lanes share one loop nest
                # (a fused add + norm writes the sum and the output in one pass)
                group = [n]
                while i + len(group) < len(events) and events[i + len(group)][0] == "store" \
                        and self.store_lanes(events[i + len(group)][1]) == self.store_lanes(n):
                    group.append(events[i + len(group)][1])
                self.ev_store(group)
                i += len(group)
                continue
            if ev != "begin":
                getattr(self, "ev_" + ev)(n)
                i += 1
                continue
            depth, j = 0, i
            while True:                       # the matching end
                depth += {"begin": 1, "end": -1}.get(events[j][0], 0)
                if depth == 0:
                    break
                j += 1
            body = events[i + 1:j]
            t = n.arg.range
            if self.padded(t) and not any(e == "begin" for e, _ in body):
                tails = self.tails(n)
                self.ev_begin(n, advance=not tails)
                saved = dict(self.names)
                self.split_chunk(n, body, tails)
                if tails:
                    # a chunk that is not whole: tail_block lanes at a time
                    self.open("else")
                    self.tail.add(id(t))
                    self.names = dict(saved)
                    self.split_chunk(n, body, False)
                    self.tail.discard(id(t))
                    self.line(f"s_{n.arg.axis}_{n.arg.id} += {self.sched.tail_block};")
                    self.close()
                self.names = saved
                self.close()
            else:
                self.ev_begin(n)
                self.emit(body)
                self.ev_end(n)
            i = j + 1

    def split_chunk(self, n: Node, body, tails: bool) -> None:
        """The loop body twice: a chunk wholly inside every row's range (most
        of them) runs a copy with no masks (contiguous, unclamped loads); the
        other copy masks. With ``tails`` the masked copy is left out: a chunk
        that is not whole goes to the caller's tail instead."""
        t = n.arg.range
        saved = dict(self.names)
        self.open(f"if ({self.full_chunk(n)})")
        self.fast.add(id(t))
        self.emit_chunk(body)        # cpp_prefetch.py
        self.ev_end(n, close=False)
        self.fast.discard(id(t))
        if tails:
            self.line(f"s_{n.arg.axis}_{n.arg.id} += {self.block(t)};")
        self.close()
        if tails:
            return                      # the caller's else: the tail
        self.names = dict(saved)
        self.open("else")
        self.emit_chunk(body)        # cpp_prefetch.py
        self.ev_end(n, close=False)
        self.close()
        self.names = saved

    def tails(self, s: Node) -> bool:
        """Whether loop ``s`` (not already in its tail) walks the chunks that
        are not whole ``tail_block`` lanes at a time: when it loops at all,
        and has one range per program (a decode row), not one per row of a
        block of rows. Tails pay off only then: the masked lanes are those
        past the range's end. With a range per row (causal prefill) the masked
        chunks are the rows' staggered ends, work that must be done anyway;
        smaller chunks only add per-chunk cost (docs/design.md, "The C++
        lowering's chunks")."""
        loop, t, tb = s.arg, s.arg.range, self.sched.tail_block
        size, b = self.k.axes[loop.axis].size, self.block(t)
        if id(t) in self.tail or not (0 < tb < b and tb & (tb - 1) == 0):
            return False
        if size is not None and size <= b and not loop.bounded:
            return False                    # one chunk covers the axis: no loop
        return not any(x is not None and self.tdims(x) for x in (loop.start, loop.stop))

    def full_chunk(self, s: Node) -> str:
        loop = s.arg
        axis, lid, b = loop.axis, loop.id, self.block(loop.range)
        start = f"s_{axis}_{lid}"
        parts = [f"{start} + {b} <= {self.size(axis)}"]
        if loop.bounded:
            parts = [f"{start} >= lo_in_{axis}_{lid}", f"{start} + {b} <= hi_in_{axis}_{lid}"] + parts
        return " & ".join(f"({p})" for p in parts)

    def ev_begin(self, s: Node, advance: bool = True) -> None:
        """Open loop ``s``; with ``advance`` False the body moves the chunk
        start itself (chunks of two sizes), else the loop adds the block."""
        loop = s.arg
        t, axis, lid = loop.range, loop.axis, loop.id
        b = self.block(t)
        self.src(loop.loc)
        for c, init in zip(loop.carries, s.src):
            nm = f"c{lid}_{c.arg[1]}"
            self.declare(nm, c)
            self.names[id(c)] = nm
            self.assign(nm, c, self.ex(init))
        size = self.k.axes[axis].size
        lo = hi = None
        if loop.bounded:
            lo, hi = f"lo_{axis}_{lid}", f"hi_{axis}_{lid}"
            lo_in, hi_in = f"lo_in_{axis}_{lid}", f"hi_in_{axis}_{lid}"
            self.line(f"int32_t {lo} = 0, {hi} = {self.size(axis)}, {lo_in} = 0, "
                      f"{hi_in} = {self.size(axis)};")
            for nm, inner, bn, red, other in ((lo, lo_in, loop.start, "min", "max"),
                                              (hi, hi_in, loop.stop, "max", "min")):
                if bn is None:
                    continue
                rows = self.tdims(bn)
                if not rows:
                    self.line(f"{nm} = {inner} = {self.ex(bn)};")
                    continue
                # the program's rows each have a range: walk from the smallest
                # start to the largest stop of its valid rows; between the
                # largest start and the smallest stop every row sees every key
                self.line(f"{nm} = {'INT32_MAX' if red == 'min' else 'INT32_MIN'}; "
                          f"{inner} = {'INT32_MIN' if red == 'min' else 'INT32_MAX'};")
                depth = self.nest(rows, self.blocks(bn), simd=False)
                valid = self.mask(bn, rows)
                cond = f"if ({' & '.join(valid)}) " if valid else ""
                self.open(f"{cond}")
                self.line(f"{nm} = std::{red}({nm}, (int32_t){self.ex(bn)});")
                self.line(f"{inner} = std::{other}({inner}, (int32_t){self.ex(bn)});")
                self.close()
                self.unnest(depth)
            self.line(f"{lo} = std::max({lo}, (int32_t)0); {hi} = std::min({hi}, "
                      f"(int32_t){self.size(axis)});")
            self.row_bounds[id(t)] = (lo, hi, loop.start, loop.stop)
        if size is not None and size <= b and not loop.bounded:
            self.open("")
            self.line(f"const int32_t s_{axis}_{lid} = 0;  // one chunk of {b} covers all {size}")
        else:
            first = lo if lo is not None else "0"
            last = hi if hi is not None else self.size(axis)
            inc = f"s_{axis}_{lid} += {b}" if advance else ""
            self.open(f"for (int32_t s_{axis}_{lid} = {first}; s_{axis}_{lid} < {last}; {inc})")

    def ev_end(self, s: Node, close: bool = True) -> None:
        loop = s.arg
        pending = []
        for c, y in zip(loop.carries, loop.yields):
            if y is c:
                continue
            if y.op == Op.CARRY:               # a carried value passed on: copy it first
                tmp = f"{self.names[id(c)]}_next"
                self.declare(tmp, c)
                self.assign(tmp, c, self.ex(y))
                pending.append((c, tmp))
            else:
                pending.append((c, None))
        for c, tmp in pending:
            y = loop.yields[loop.carries.index(c)]
            nm = self.names[id(c)]
            value = (f"{tmp}[{self.lin(c)}]" if self.tdims(c) else tmp) if tmp else self.ex(y)
            self.assign(nm, c, value)
        if close:
            self.close()
