"""Facts about a traced kernel that the verifier and every printer share:
which loop a node belongs to (its scope), which tile each axis of a node
comes from, and a dependency walk."""
from __future__ import annotations

from .errors import KernelError
from .nodes import Loop, Node, Op


class Analysis:
    def __init__(self, kernel):
        self.k = kernel
        self.loops: dict[int, Loop] = {}
        self.seq_for: dict[int, Node] = {}
        self._scope: dict[int, Loop | None] = {}
        self._tiles: dict[int, dict] = {}
        self._collect(kernel.stmts)

    def _collect(self, stmts):
        for s in stmts:
            if s.op == Op.SEQ_FOR:
                self.loops[s.arg.id] = s.arg
                self.seq_for[s.arg.id] = s
                self._collect(s.arg.stmts)

    # -- scopes ---------------------------------------------------------------
    @staticmethod
    def chain(loop: Loop | None) -> list[Loop | None]:
        out = [loop]
        while loop is not None:
            loop = loop.parent
            out.append(loop)
        return out

    def scope(self, n: Node) -> Loop | None:
        """The innermost loop whose tile or carried values ``n`` depends on."""
        key = id(n)
        if key in self._scope:
            return self._scope[key]
        if n.op == Op.RANGE and n.arg[1] == "seq":
            s = self.loops.get(n.arg[2])
        elif n.op == Op.CARRY:
            s = self.loops.get(n.arg[0])
        elif n.op == Op.LOOP_OUT:
            s = n.src[0].arg.parent
        elif n.op == Op.SEQ_FOR:
            s = n.arg.parent
        else:
            s = self.loops.get(n.arg) if n.op == Op.LOAD and n.arg is not None else None
            for src in n.src:
                ss = self.scope(src)
                if ss is s or ss is None:
                    continue
                if s is None or s in self.chain(ss):
                    s = ss
                elif ss not in self.chain(s):
                    raise KernelError("this value mixes values from two different seq_for "
                                      f"loops (lines {s.loc.line} and {ss.loc.line})", n.loc)
        self._scope[key] = s
        return s

    # -- tiles ------------------------------------------------------------------
    def tiles(self, n: Node) -> dict[str, Node]:
        """axis -> the RANGE node that tiles it in ``n``."""
        key = id(n)
        hit = self._tiles.get(key)
        if hit is not None:
            return hit
        if n.op == Op.RANGE:
            t = {n.arg[0]: n}
        elif n.op == Op.CARRY:        # a carried value keeps the tiles of its init
            t = self.tiles(self.seq_for[n.arg[0]].src[n.arg[1]])
        elif n.op == Op.LOOP_OUT:
            t = self.tiles(n.src[0].src[n.arg])
        else:
            t = self._merge(n, [self.tiles(s) for s in n.src])
            t = {a: r for a, r in t.items() if a in n.axes}
        self._tiles[key] = t
        return t

    def _merge(self, n: Node, maps) -> dict[str, Node]:
        out: dict[str, Node] = {}
        for m in maps:
            for a, r in m.items():
                prev = out.get(a)
                if prev is not None and prev is not r and not _same_tile(prev, r):
                    raise KernelError(f"axis `{a}` is indexed by two different tiles here "
                                      f"(lines {prev.loc.line} and {r.loc.line})", n.loc)
                out.setdefault(a, r)
        return out


def _same_tile(a: Node, b: Node) -> bool:
    # two whole-axis tiles of the same axis are interchangeable
    return _whole_axis(a) is not None and _whole_axis(a) == _whole_axis(b)


def _whole_axis(t: Node):
    if t.op == Op.RANGE and t.arg[1] == "full":
        return t.arg[0]
    return None


def topo(roots, stop=lambda n: False) -> list[Node]:
    """Nodes reachable from ``roots`` in dependency order (sources first),
    not descending into nodes for which ``stop`` holds."""
    seen: set[int] = set()
    order: list[Node] = []
    stack = [(r, False) for r in reversed(list(roots))]
    while stack:
        n, done = stack.pop()
        if done:
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        if not stop(n):
            for s in reversed(n.src):
                if id(s) not in seen:
                    stack.append((s, False))
    return order


def stmt_roots(s: Node) -> list[Node]:
    """What a statement reads: a loop's inits and bounds, a store's operands and mask."""
    if s.op == Op.SEQ_FOR:
        return list(s.src) + list(s.arg.bounds())
    return list(s.src) + ([s.arg] if s.arg is not None else [])


def linearize(k, an: Analysis):
    """Program order for printers. Yields events:
    ("node", n) for a value to define, ("begin", seq_for), ("end", seq_for)
    and ("store", s). A value is defined in the scope it belongs to, before
    its first use; loop-invariant values of a loop body are defined before
    the loop (hoisted), so no printer has to think about scoping."""
    done: set[int] = set()

    def define(roots, scope):
        for n in topo(roots, stop=lambda x: id(x) in done):
            if id(n) in done or n.op in (Op.SEQ_FOR, Op.STORE, Op.CARRY):
                continue
            if n.op == Op.RANGE and n.arg[1] in ("seq", "parallel"):
                continue  # defined by the loop header / the grid prologue
            if an.scope(n) is not scope:
                continue
            done.add(id(n))
            yield ("node", n)

    def body_roots(loop):
        roots = list(loop.yields)
        for s in loop.stmts:
            roots.extend(stmt_roots(s))
            if s.op == Op.SEQ_FOR:
                roots.extend(body_roots(s.arg))
        return roots

    def region(stmts, scope):
        for s in stmts:
            if s.op == Op.SEQ_FOR:
                yield from define(stmt_roots(s) + body_roots(s.arg), scope)
                yield ("begin", s)
                yield from region(s.arg.stmts, s.arg)
                yield from define(s.arg.yields, s.arg)
                yield ("end", s)
            else:
                yield from define(stmt_roots(s), scope)
                yield ("store", s)

    yield from region(k.stmts, None)
