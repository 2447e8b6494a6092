"""``print(kernel)``: the IR as readable text, one definition per line,
each ending with the author's source line."""
from __future__ import annotations

from .analysis import Analysis, linearize
from .nodes import Node, Op


def _ty(n: Node) -> str:
    axes = ", ".join(a for a in n.axes)
    return f"{n.dtype}[{axes}]" if n.axes else f"{n.dtype}"


def format_kernel(k) -> str:
    an = Analysis(k)
    names: dict[int, str] = {}
    lines: list[str] = []
    depth = [1]

    def name(n: Node) -> str:
        if n.op == Op.PARAM:
            return n.arg.name
        if n.op == Op.CONST:
            return repr(n.arg)
        return names.get(id(n), "?")

    def emit(text: str, loc) -> None:
        pad = "  " * depth[0]
        where = f"  # {loc.short()}" if loc is not None else ""
        lines.append(f"{pad}{text:<60}{where}")

    def sig(p) -> str:
        if p.kind == "scalar":
            return f"{p.name}: {p.dtype}"
        dims = ", ".join(a + (f"={k.axes[a].size}" if k.axes[a].size is not None else "")
                         for a in p.axes)
        return f"{p.name}: {p.kind} {p.dtype}[{dims}]"

    lines.append(f"kernel {k.name}({', '.join(sig(p) for p in k.params)}):"
                 + (f"  # {k.loc.short()}" if k.loc else ""))
    for g in k.grid:
        names[id(g)] = f"%{g.arg[0].lower()}"
        emit(f"{names[id(g)]} = parallel {g.arg[0]} block={g.arg[2]}"
             + (" descending" if g.arg[3] else ""), g.loc)
    counter = [0]
    for ev, n in linearize(k, an):
        if ev == "node":
            if n.op in (Op.CONST, Op.PARAM) or (n.op == Op.RANGE and n.arg[1] == "parallel"):
                continue
            if n.op == Op.RANGE:
                names[id(n)] = f"%{n.arg[0].lower()}_tile"
                emit(f"{names[id(n)]} = tile {n.arg[0]}", n.loc)
                continue
            nm = names[id(n)] = f"%{counter[0]}"
            counter[0] += 1
            emit(f"{nm} = {_rhs(n, name)} : {_ty(n)}", n.loc)
        elif ev == "begin":
            loop = n.arg
            rn = names[id(loop.range)] = f"%{loop.axis.lower()}{loop.id}"
            for c in loop.carries:
                names[id(c)] = f"%c{loop.id}_{c.arg[1]}"
            carried = ", ".join(f"{names[id(c)]} = {name(i)}" for c, i in zip(loop.carries, n.src))
            rng = "" if not loop.bounded else (
                f" from {name(loop.start) if loop.start is not None else 0}"
                f" to {name(loop.stop) if loop.stop is not None else loop.axis}")
            emit(f"seq_for {rn} in tiles({loop.axis}){rng}"
                 + (f" carry({carried})" if carried else "") + ":", loop.loc)
            depth[0] += 1
        elif ev == "end":
            loop = n.arg
            if loop.yields:
                emit("yield " + ", ".join(name(y) for y in loop.yields), loop.loc)
            depth[0] -= 1
        else:  # store
            param, value, *index = n.src
            emit(f"store {param.arg.name}[{', '.join(name(i) for i in index)}] <- {name(value)}"
                 + (f" if {name(n.arg)}" if n.arg is not None else ""), n.loc)
    return "\n".join(lines)


def _rhs(n: Node, name) -> str:
    op, a = n.op, n.arg
    args = ", ".join(name(s) for s in n.src)
    if op == Op.LOAD:
        return f"load {n.src[0].arg.name}[{', '.join(name(i) for i in n.src[1:])}]"
    if op == Op.FULL:
        return f"full {a!r}"
    if op == Op.SIZE:
        return f"size {a}"
    if op == Op.LOOP_OUT:
        return f"loop_out {a} of seq_for@{n.src[0].loc.line}"
    if op == Op.CAST:
        return f"cast {args}"
    if op == Op.REDUCE:
        return f"reduce_{a[1]} {args} over {a[0]}"
    if op == Op.SCAN:
        return f"scan_{a[1]} {args} over {a[0]}"
    if op == Op.SORT:
        return f"sort {args} over {a[0]}" + (" descending" if a[1] else "")
    if op == Op.TOPK:
        return f"topk_{a[3]} {name(n.src[0])} over {a[0]} k={a[1]} into {a[2]}"
    if op == Op.DOT:
        return f"dot {args} over {a}"
    return f"{op.name.lower()} {args}"
