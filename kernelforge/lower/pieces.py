"""Outputs written in pieces: which stores of an output tile it exactly, so
the torch lowering can return it (or copy it into an in-place input) as one
``torch.cat`` instead of slice assignments into a buffer the graph mutates.
(Inductor fuses slice stores into one loop that reads the uninitialised
output and blends into it: much slower for rotary's two halves;
docs/design.md, "Outputs written in pieces".)"""
from __future__ import annotations

from ..ir import dtypes as dt
from ..ir.analysis import Analysis, linearize
from ..ir.nodes import Node, Op


def tile_of(i: Node):
    """(range, offset) when an index is a tile (plus a constant), else None."""
    if i.op == Op.RANGE:
        return i, 0
    if i.op == Op.ADD and i.src[0].op == Op.RANGE and i.src[1].op == Op.CONST:
        return i.src[0], i.src[1].arg
    return None


def can_return(k, name: str) -> bool:
    """Whether output ``name`` is written whole and never read, so a
    functional form may return it instead of writing into it: one store of
    the whole tensor, or stores of pieces that tile it exactly (rotary's two
    halves and pass-through tail), which are returned as one ``torch.cat``."""
    return assembly(k, name) is not None


def assembly(k, name: str, alias_of: str | None = None):
    """The stores that write output ``name`` and the region each covers, when
    together they write every element exactly once (else None). A region is,
    per dim, ``None`` (the whole dim) or an interval ``(start, stop, point)``
    (``point``: a literal index, the dim dropped in the stored value)."""
    an = Analysis(k)
    stores, loaded = [], False
    for ev, n in linearize(k, an):
        if ev == "store" and n.src[0].arg.name == name:
            stores.append(n)
        elif ev == "node" and n.op == Op.LOAD and (
                n.src[0].arg.name == name or (n.src[0].arg.name == alias_of and stores)):
            loaded = True     # (in place: the input read back after a piece was written)
    if loaded or not stores:
        return None
    param = stores[0].src[0].arg
    inputs = {a for p in k.params if p.kind != "scalar" and p.name != name for a in p.axes}
    if param.dtype == dt.u32 or any(k.axes[a].size is None and a not in inputs
                                    for a in param.axes):
        return None   # a runtime size only the output knows
    pieces = []
    for s in stores:
        _, value, *index = s.src
        if s.arg is not None or set(value.axes) != set(s.axes):
            return None
        if any(t.op == Op.RANGE and t.arg[1] == "seq" and an.loops[t.arg[2]].bounded
               for t in an.tiles(s).values()):
            return None      # a masked store does not write every element
        region = []
        for d, i in enumerate(index):
            dim_axis = param.axes[d]
            if i.op == Op.CONST:
                region.append((i.arg, i.arg + 1, True))
                continue
            t = tile_of(i)
            if t is None or (t[0].op == Op.RANGE and t[0].arg[1] == "parallel"
                             and t[0].arg[0] != dim_axis):
                return None
            r, off = t
            if r.arg[0] == dim_axis and off == 0:
                region.append(None)
            elif k.axes[r.arg[0]].size is None or k.axes[dim_axis].size is None:
                return None
            else:
                region.append((off, off + k.axes[r.arg[0]].size, False))
        pieces.append((tuple(region), s))
    if len(pieces) == 1 and all(r is None for r in pieces[0][0]):
        return pieces
    sizes = [k.axes[a].size for a in param.axes]
    return pieces if tiles_exactly(pieces, 0, sizes) else None


def tiles_exactly(pieces, d: int, sizes) -> bool:
    if d == len(sizes):
        return len(pieces) == 1
    if all(p[0][d] is None for p in pieces):
        return tiles_exactly(pieces, d + 1, sizes)
    if any(p[0][d] is None for p in pieces):
        return False
    groups: dict[tuple, list] = {}
    for p in pieces:
        groups.setdefault(p[0][d][:2], []).append(p)
    edge = 0
    for lo, hi in sorted(groups):
        if lo != edge:
            return False
        edge = hi
        if not tiles_exactly(groups[(lo, hi)], d + 1, sizes):
            return False
    return edge == sizes[d]


def assemble(pieces, exprs, d: int, ndim: int) -> str:
    """``torch.cat`` of full-rank piece expressions along the split dims."""
    if d == ndim:
        return exprs[id(pieces[0][1])]
    if all(p[0][d] is None for p in pieces):
        return assemble(pieces, exprs, d + 1, ndim)
    groups: dict[tuple, list] = {}
    for p in pieces:
        groups.setdefault(p[0][d][:2], []).append(p)
    parts = [assemble(groups[key], exprs, d + 1, ndim) for key in sorted(groups)]
    return f"torch.cat([{', '.join(parts)}], dim={d})"
