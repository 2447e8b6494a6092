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
from ..ir.errors import KernelError
from ..ir.nodes import Node, Op
from .codegen import contraction_parts
from .triton_helpers import DOT_OPERAND as _DOT_OPERAND, F32_DOT as _F32_DOT, \
    INTERPRET_FLAG as _INTERPRET_FLAG

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
        parts = contraction_parts(n, p.tdims) if ev == "node" else None
        if parts and uses[id(n.src[0])] == 1:
            found.append((n, *parts))
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
    arithmetic, slow there: docs/design.md, "Known limitations")."""
    return f"({e}).to({h.triton})"


class DotRules:
    """The Triton printer's products (a mixin of ``triton_printer._Printer``)."""

    def _dot_contractions(self) -> dict:
        """The contractions whose three axes reach tl.dot's 16 (static whole
        axes below 16 are padded to it)."""
        found = {}
        for n, a, b, axis in find_contractions(self):
            tiles = [self.an.tiles(n)[d] for d in self.tdims(n)] + [self.an.tiles(a)[axis]]
            small = [t for t in tiles if self.block(t) < MIN_DOT]
            if all(t.op == Op.RANGE and t.arg[1] == "full" for t in small):
                self.pad16.update(t.arg[0] for t in small)
                found[id(n)] = (n, a, b, axis)
        return found

    def dot(self, n: Node, a: Node, b: Node, k: str) -> str:
        """``tl.dot`` for a DOT or a contraction ``sum(a * b, k)`` (this module's
        docstring: which operand goes to the tensor cores in which type)."""
        ad, bd = self.tdims(a), self.tdims(b)
        if len(ad) != 2 or len(bd) != 2:
            raise KernelError("the Triton lowering supports dot of two 2-D blocks; got "
                              f"{list(ad)} and {list(bd)}", n.loc)
        if n.op == Op.REDUCE and self.tdims(n)[0] not in ad:
            a, b, ad, bd = b, a, bd, ad
        x = next(d for d in ad if d != k)
        y = next(d for d in bd if d != k)
        ha, hb = half_source(a), half_source(b)
        self.has_dot = True
        prec = ""
        if ha is not None and hb is not None and ha.dtype == hb.dtype:
            # 16-bit operands (or f32 casts of them): exact products, fp32 sums
            pairs = [(self.half_operand(ha, k), self.half_operand(hb, k))]
        elif (ha is None) != (hb is None) and (ha or hb).dtype in HALF:
            # f32 against 16-bit: the f32 operand as hi + lo in the 16-bit type,
            # the small part first
            half = self.half_operand(ha or hb, k)
            parts = self.split_operand(b if hb is None else a, (ha or hb).dtype, k)
            pairs = [(half, p) if ha is not None else (p, half) for p in parts]
        else:
            ea, eb = self.dot_operand(a, k), self.dot_operand(b, k)
            if a.dtype in HALF:
                self.helpers.update((_INTERPRET_FLAG, _DOT_OPERAND))
                ea, eb = f"_dot_operand({ea})", f"_dot_operand({eb})"
            if a.dtype == dt.f32:
                self.helpers.add(_F32_DOT)
                prec = ", input_precision=_F32_DOT"
            pairs = [(ea, eb)]
        e = None
        for ea, eb in pairs:
            tail = f"acc={e}" if e else f"out_dtype={n.dtype.triton}{prec}"
            e = f"tl.dot({self.oriented(ea, ad, (x, k))}, {self.oriented(eb, bd, (k, y))}, {tail})"
        return e if self.tdims(n) == (x, y) else f"tl.trans({e})"

    def split_operand(self, f: Node, h, k: str) -> list[str]:
        """Lines defining the f32 operand ``f`` as ``hi + lo`` in the 16-bit
        type ``h``; returns the two dot operands, ``lo`` first."""
        nm, ef = self.pending, self.dot_operand(f, k)
        self.helpers.update((_INTERPRET_FLAG, _DOT_OPERAND))
        self.out.line(f"# {self.name(f)} as hi + lo in {h.name} (two 16-bit tensor-core "
                      "products: twice the 16-bit significand)")
        if ef != self.name(f):
            self.out.line(f"{nm}_f = {ef}")
            ef = f"{nm}_f"
        self.out.line(f"{nm}_hi = {to_half(ef, h)}")
        self.out.line(f"{nm}_lo = {to_half(f'{ef} - {nm}_hi.to(tl.float32)', h)}")
        return [f"_dot_operand({nm}_lo)", f"_dot_operand({nm}_hi)"]

    @staticmethod
    def oriented(e: str, have: tuple, want: tuple) -> str:
        return e if have == want else f"tl.trans({e})"

    def half_operand(self, h: Node, k: str) -> str:
        self.helpers.update((_INTERPRET_FLAG, _DOT_OPERAND))
        return f"_dot_operand({self.dot_operand(h, k)})"

    def dot_operand(self, x: Node, axis: str) -> str:
        return self.masked(x, axis, "0")
