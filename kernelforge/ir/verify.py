"""The verifier: per-op rules checked once after tracing, before any
lowering sees the kernel. Every error names the author's source line."""
from __future__ import annotations

from . import dtypes as dt
from .analysis import Analysis, stmt_roots, topo
from .errors import KernelError
from .nodes import (BINARY, COMPARE, FLOAT_ONLY, INT_ONLY, UNARY, Node, Op)


def verify(k) -> Analysis:
    an = Analysis(k)
    stored: set[str] = set()
    if len(k.grid) > 3:
        raise KernelError(f"at most 3 parallel axes are supported, got {len(k.grid)}",
                          k.grid[3].loc)
    _check_region(k, an, k.stmts, None, stored)
    for p in k.params:
        if p.kind == "out" and p.name not in stored:
            raise KernelError(f"output `{p.name}` is never stored", k.loc)
    return an


def _check_region(k, an, stmts, loop, stored):
    visible = an.chain(loop)
    for s in stmts:
        roots = stmt_roots(s)
        if s.op == Op.SEQ_FOR:
            body = s.arg
            for b in body.bounds():
                if not (b.dtype.is_int and b.dtype != dt.u32):
                    _fail(f"seq_for bounds must be signed integers, got {b.dtype}", b)
                if body.axis in b.axes:
                    _fail(f"a bound of seq_for over `{body.axis}` varies along `{body.axis}` "
                          "itself", b)
                loose = [a for a in b.axes if not any(g.arg[0] == a for g in k.grid)]
                if loose:
                    _fail(f"seq_for bounds may vary along parallel axes only (one range per "
                          f"row), this one varies along {loose}", b)
            _check_region(k, an, body.stmts, body, stored)
            for y, c in zip(body.yields, body.carries):
                for n in topo([y]):
                    _check_node(k, an, n)
                if y.dtype != c.dtype or y.axes != c.axes:
                    raise KernelError(f"seq_for carried value {c.arg[1]} starts as {c.dtype}"
                                      f"[{', '.join(c.axes)}] but the body returns {y.dtype}"
                                      f"[{', '.join(y.axes)}]; cast or reduce it to match",
                                      y.loc or body.loc)
                if an.scope(y) not in an.chain(body):
                    raise KernelError("a carried value returned from seq_for comes from "
                                      "another loop", y.loc)
                if y is not c and not any(n is body.range for n in topo([y])):
                    # e.g. `count + 1.0`: it would count chunks, and backends
                    # chunk differently (Triton loops, torch runs once)
                    raise KernelError(f"seq_for carried value {c.arg[1]} changes without "
                                      "depending on the loop's tile, so its result would "
                                      "depend on how a backend chunks the axis", y.loc or body.loc)
        for n in topo(roots):
            _check_node(k, an, n)
            if an.scope(n) not in visible:
                raise KernelError(f"value computed inside seq_for (line {an.scope(n).loc.line}) "
                                  "is used outside that loop; return it as a carried value",
                                  s.loc)
        if s.op == Op.STORE:
            _check_store(k, an, s)
            stored.add(s.src[0].arg.name)


def _fail(msg, n: Node):
    raise KernelError(msg, n.loc)


def _check_node(k, an, n: Node) -> None:
    op, src = n.op, n.src
    an.scope(n)
    an.tiles(n)
    if op in UNARY:
        (x,) = src
        if op in FLOAT_ONLY and not x.dtype.is_float:
            _fail(f"{op.name.lower()} needs a float operand, got {x.dtype}", n)
        if op in INT_ONLY and not (x.dtype.is_int or x.dtype == dt.bool_):
            _fail(f"{op.name.lower()} needs an integer operand, got {x.dtype}", n)
    elif op in BINARY:
        a, b = src
        if a.dtype != b.dtype:
            _fail(f"{op.name.lower()} of {a.dtype} and {b.dtype}: operands must share a dtype; "
                  "cast one explicitly with .to(...)", n)
        if op in FLOAT_ONLY and not a.dtype.is_float:
            _fail(f"{op.name.lower()} needs float operands, got {a.dtype}", n)
        if op in INT_ONLY and not (a.dtype.is_int or (a.dtype == dt.bool_ and op in
                                                      (Op.AND, Op.OR, Op.XOR))):
            _fail(f"{op.name.lower()} needs integer operands, got {a.dtype}", n)
    elif op == Op.MULHI:
        if not (src[0].dtype == src[1].dtype == dt.u32):
            _fail(f"mulhi needs u32 operands, got {src[0].dtype} and {src[1].dtype}", n)
    elif op == Op.WHERE:
        c, a, b = src
        if c.dtype != dt.bool_:
            _fail(f"where() condition must be bool, got {c.dtype}", n)
        if a.dtype != b.dtype:
            _fail(f"where() branches must share a dtype, got {a.dtype} and {b.dtype}", n)
    elif op == Op.BITCAST:
        if src[0].dtype.bits != n.dtype.bits:
            _fail(f"bitcast from {src[0].dtype} to {n.dtype} changes the width", n)
    elif op in (Op.REDUCE, Op.SCAN, Op.SORT, Op.TOPK):
        axis = n.arg[0]
        if axis not in src[0].axes:
            _fail(f"{op.name.lower()} over axis `{axis}`, but the value only varies along "
                  f"{list(src[0].axes)}", n)
        if any(g.arg[0] == axis for g in k.grid):
            _fail(f"cannot {op.name.lower()} over parallel axis `{axis}`", n)
        if op == Op.REDUCE and n.arg[1] == "sum" and src[0].dtype in (dt.f16, dt.bf16):
            _fail(f"sum in {src[0].dtype} loses precision; cast to f32 first", n)
        if op == Op.REDUCE and src[0].dtype == dt.bool_ and n.arg[1] not in ("max", "min"):
            _fail(f"{n.arg[1]} of bool values: use max (any) or min (all), or cast first", n)
        if op == Op.TOPK and src[0].dtype == dt.bool_:
            _fail("topk of bool values: cast them to an integer type first", n)
        if op in (Op.SCAN, Op.SORT, Op.TOPK):
            t = an.tiles(src[0]).get(axis)
            if t is not None and t.op == Op.RANGE and t.arg[1] == "seq":
                _fail(f"{op.name.lower()} over `{axis}` inside seq_for over `{axis}` would see "
                      "one chunk at a time; give it the whole axis with kl.tile()", n)
    elif op == Op.DOT:
        a, b = src
        if a.dtype != b.dtype:
            _fail(f"dot operands must share a dtype, got {a.dtype} and {b.dtype}", n)
        if n.arg not in a.axes or n.arg not in b.axes:
            _fail(f"dot contracts axis `{n.arg}`, which both operands must vary along "
                  f"(got {list(a.axes)} and {list(b.axes)})", n)
        scalar = {g.arg[0] for g in k.grid if g.arg[2] == 1}
        shared = (set(a.axes) & set(b.axes)) - {n.arg} - scalar
        if shared:
            _fail(f"dot operands both vary along {sorted(shared)} besides the contracted "
                  f"`{n.arg}`; for a row-wise product use kl.sum(a * b, '{n.arg}')", n)
    elif op == Op.LOAD:
        for i in src[1:]:
            if not i.dtype.is_int:
                _fail(f"index of `{src[0].arg.name}` must be an integer, got {i.dtype}", n)
    elif op == Op.RANGE and n.arg[1] == "full":
        if k.axes[n.arg[0]].size is None:
            _fail(f"tile('{n.arg[0]}') needs a static extent to pick its block; declare the "
                  f"axis in @kernel(static=...) or walk it with seq_for", n)
    if op in COMPARE and n.dtype != dt.bool_:  # pragma: no cover - builder invariant
        _fail("comparison must produce bool", n)


def _check_store(k, an, s: Node) -> None:
    param, value = s.src[0].arg, s.src[1]
    if param.kind != "out":
        _fail(f"store into `{param.name}`, which is declared kl.In; declare it kl.Out", s)
    if value.dtype != param.dtype:
        _fail(f"store of a {value.dtype} value into `{param.name}` ({param.dtype}); cast "
              f"explicitly with .to({param.name}.dtype)", s)
    extra = [a for a in value.axes if a not in s.axes]
    if extra:
        _fail(f"stored value varies along {extra}, which the index of `{param.name}` "
              "does not cover", s)
    for i in s.src[2:]:
        if not i.dtype.is_int:
            _fail(f"index of `{param.name}` must be an integer, got {i.dtype}", s)
    m = s.arg
    if m is not None:
        if m.dtype != dt.bool_:
            _fail(f"store mask must be bool, got {m.dtype}", s)
        extra = [a for a in m.axes if a not in s.axes]
        if extra:
            _fail(f"store mask varies along {extra}, which the index of `{param.name}` "
                  "does not cover", s)
