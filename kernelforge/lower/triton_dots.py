"""How the Triton lowering turns products into ``tl.dot`` (tensor cores).

Two kinds of IR node become a ``tl.dot``:

* ``DOT`` (``kl.dot``), the author's matrix product;
* a *contraction*: ``sum(a * b, k)`` over two blocks that each lack one of the
  sum's two output axes (``q [G, D] * k [N, D]`` summed over D), whose product
  feeds nothing else. Paged decode writes q.k and p.v this way so that any
  number of query heads G works; here a G below 16 (``tl.dot``'s smallest
  tile) is padded to 16 rows, masked like any padded tile. The [G, N, D]
  product is never built.

Operand precision keeps the IR's meaning, fp32 products accumulated in fp32:

* a 16-bit value cast to f32 is handed to ``tl.dot`` as the 16-bit value
  itself (its products are exact in fp32, so the result is the same);
* an f32 operand facing a 16-bit one (attention's p against v) is split into
  ``hi + lo``, both in the 16-bit type, and multiplied twice: p to 16
  significant bits with bf16 (relative error <= 2^-17, far below the output's
  rounding of 2^-9), 22 with fp16. Two 16-bit tensor-core products cost a
  third of the three TF32 products (``tf32x3``) they replace;
* two true f32 operands use ``_F32_DOT`` (``tf32x3`` on NVIDIA, fp32 FMAs
  elsewhere).
"""
from __future__ import annotations

from collections import Counter

from ..ir import dtypes as dt
from ..ir.analysis import linearize, stmt_roots
from ..ir.nodes import Node, Op

HALF = (dt.bf16, dt.f16)
MIN_DOT = 16          # tl.dot's smallest M, N and K


def use_counts(k, an) -> Counter:
    """How many times each node (by id) is read: by nodes, stores, loop
    headers and loop yields."""
    uses: Counter = Counter()
    for ev, n in linearize(k, an):
        if ev == "node":
            srcs = n.src
        elif ev == "begin" or ev == "store":
            srcs = stmt_roots(n)
        else:     # end: the yields
            srcs = n.arg.yields
        for s in srcs:
            uses[id(s)] += 1
    return uses


def find_contractions(p) -> list[tuple[Node, Node, Node, str]]:
    """REDUCE nodes of printer ``p`` that are ``sum(a * b, axis)`` contractions:
    ``(reduce, a, b, axis)``."""
    uses = use_counts(p.k, p.an)
    found = []
    for ev, n in linearize(p.k, p.an):
        if ev != "node" or n.op != Op.REDUCE or n.arg[1] != "sum":
            continue
        (x,) = n.src
        out, axis = p.tdims(n), n.arg[0]
        if x.op != Op.MUL or uses[id(x)] != 1 or len(out) != 2 or n.dtype != dt.f32:
            continue
        a, b = x.src
        if {frozenset(p.tdims(a)), frozenset(p.tdims(b))} != \
                {frozenset((out[0], axis)), frozenset((out[1], axis))}:
            continue
        if not all(v.dtype == dt.f32 for v in (x, a, b)):
            continue
        found.append((n, a, b, axis))
    return found


def half_source(x: Node) -> Node | None:
    """The 16-bit value behind ``x``: ``x`` itself, or what an f32 cast reads."""
    if x.dtype in HALF:
        return x
    if x.op == Op.CAST and x.dtype == dt.f32 and x.src[0].dtype in HALF:
        return x.src[0]
    return None


def to_half(e: str, h) -> str:
    """A plain cast: on a GPU it rounds to nearest, in the interpreter bf16
    truncates; either way ``lo`` takes what ``hi`` left out, so the sum
    ``hi + lo`` is as close (and the interpreter skips ``_to_bf16``'s bit
    arithmetic, which had made the paged tests 4x slower there)."""
    return f"({e}).to({h.triton})"
