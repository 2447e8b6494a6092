"""Prefetching a chunk's gathered rows (the cpp printer's memory hints).

A load whose rows are gathered through loaded indices (paged attention's
keys and values: ``key_cache[block_tables[b, n // bs], n % bs, hk, d]``)
reads rows scattered over memory. Copied row by row, each row's cache misses
are found only when the copy reaches it, and the value rows only after the
scores, the softmax and their own turn come: the misses of a chunk are paid
one after another. So at the top of a chunk, once the indices are known, the
printer issues ``__builtin_prefetch`` for every line of every such row of the
chunk (keys and values alike), and the misses overlap each other and the
chunk's arithmetic. A hint only: a prefetch never faults, changes no value,
and the indices are clamped like the loads' own.

Prefetching each load's rows just before its own copy instead gains less,
since the value rows' misses then still come last. A chunk whose rows pass
``PREFETCH_BYTES`` is not prefetched: its later lines would evict its first
ones before they are read (and prefetching into L2 instead gains nothing).
Timings: docs/design.md, "The C++ lowering's chunks".
"""
from __future__ import annotations

from ..ir.analysis import topo
from ..ir.nodes import Node, Op

_LINE = 64          # bytes per cache line
#: a chunk prefetches its rows only up to this many bytes: in paged decode
#: 64 KB chunks gained and 128 KB ones lost, a chunk's later lines then
#: evicting its first ones before they are read (docs/design.md, "The C++
#: lowering's chunks")
PREFETCH_BYTES = 64 * 1024


class PrefetchRules:
    """Mixed into the cpp printer; ``emit_chunk`` replaces ``emit`` for the body
    of a chunked loop."""

    def emit_chunk(self, body) -> None:
        """Emit a chunk's ``body`` events, with the rows of its gathered loads
        prefetched just before the first event that reads one of them."""
        gathers = self.gathered_loads(body)
        if not gathers or sum(map(self.chunk_bytes, gathers.values())) > PREFETCH_BYTES:
            self.emit(body)
            return
        events = {id(n) for ev, n in body if ev == "node"}
        first = len(body)
        for j, (ev, n) in enumerate(body):
            if ev != "node":
                continue
            inner = topo([n], stop=lambda x: x is not n and id(x) in events)
            if any(id(x) in gathers for x in inner):
                first = j
                break
        self.emit(body[:first])
        for ld in gathers.values():
            if self.indices_ready(ld):
                self.prefetch_rows(ld)
        self.emit(body[first:])

    def chunk_bytes(self, ld: Node) -> int:
        """Bytes of the rows a chunk's gathered load reads."""
        n = ld.src[0].arg.dtype.bits // 8
        for d in self.tdims(ld):
            n *= self.block(self.tile(ld, d))
        return n

    def gathered_loads(self, body) -> dict[int, Node]:
        """Loads in ``body`` that read whole contiguous rows (the last index is
        the tile of the tensor's last dim) at rows chosen by loaded values."""
        out = {}
        for n in topo([n for ev, n in body if ev == "node"]):
            if n.op != Op.LOAD or id(n) in self.names:
                continue
            param, *index = n.src
            last = index[-1]
            if not (last.op == Op.RANGE and last.arg[0] == param.arg.axes[-1]):
                continue
            rows = [d for d in self.tdims(n) if d != last.arg[0]]
            if rows and any(x.op == Op.LOAD for i in index[:-1] for x in topo([i])):
                out[id(n)] = n
        return out

    def indices_ready(self, ld: Node) -> bool:
        """Every load its indices read is already computed (named), so the
        prefetch re-reads none of them."""
        _, *index = ld.src
        return all(id(x) in self.names for i in index
                   for x in topo([i], stop=lambda y: id(y) in self.names) if x.op == Op.LOAD)

    def prefetch_rows(self, ld: Node) -> None:
        param, *index = ld.src
        p = param.arg
        last = index[-1].arg[0]
        rows = [d for d in self.tdims(ld) if d != last]
        row_bytes = self.block(self.tile(ld, last)) * p.dtype.bits // 8
        self.line(f"// prefetch the {p.name} rows this chunk reads (cpp_prefetch.py)")
        depth = self.nest(rows, [self.block(self.tile(ld, d)) for d in rows], simd=False)
        self.line(f"const int i_{last} = 0;              // the row's first element")
        self.line(f"const char* kf_row = (const char*)&{p.name}"
                  f"[{self.address(p, index, clamp=True)}];")
        # every line the row touches, the last one too when it is not aligned
        self.line(f"for (int kf_b = 0; kf_b < {row_bytes}; kf_b += {_LINE}) "
                  "__builtin_prefetch(kf_row + kf_b);")
        self.line(f"__builtin_prefetch(kf_row + {row_bytes - 1});")
        self.unnest(depth)
