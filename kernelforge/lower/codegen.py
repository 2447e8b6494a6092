"""Shared pieces of the source printers: an indented line buffer that
stamps each block of generated lines with the kernel source line that
produced it, and literal formatting."""
from __future__ import annotations

import math

from ..ir import dtypes as dt
from ..ir.nodes import Op


class Lines:
    """``comment`` and ``unit`` (one indent level) are the target language's:
    Python's by default, ``//`` and two spaces for C++."""

    def __init__(self, indent: int = 1, comment: str = "#", unit: str = "    "):
        self.lines: list[str] = []
        self.depth = indent
        self.comment, self.unit = comment, unit
        self._last_loc = None

    def src(self, loc) -> None:
        """Comment the author's line once, when it changes."""
        if loc is None or loc == self._last_loc:
            return
        self._last_loc = loc
        text = f": {loc.text.strip()}" if loc.text else ""
        self.line(f"{self.comment} {loc.short()}{text}")

    def line(self, text: str) -> None:
        self.lines.append(self.unit * self.depth + text)

    def indent(self) -> None:
        self.depth += 1

    def dedent(self) -> None:
        self.depth -= 1
        self._last_loc = None

    def text(self) -> str:
        return "\n".join(self.lines)


def literal(v) -> str:
    if isinstance(v, bool):
        return repr(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "float('inf')" if v > 0 else "float('-inf')"
        if math.isnan(v):
            return "float('nan')"
        return repr(v)
    return repr(v)


def expand(name: str, have: tuple[str, ...], want: tuple[str, ...]) -> str:
    """Index ``name`` (dims ``have``) with None for the axes of ``want`` it
    lacks, so it broadcasts by axis name. Leading Nones are left to
    right-aligned broadcasting."""
    if have == want or not have:
        return name
    parts = [":" if a in have else "None" for a in want]
    while parts and parts[0] == "None":
        parts.pop(0)
    if all(p == ":" for p in parts):
        return name
    return f"{name}[{', '.join(parts)}]"


def identity(kind: str, d) -> str:
    """The literal a masked or padded lane holds for reduction ``kind`` in
    dtype ``d``, so it can never win (``REDUCE_IDENTITY``, typed)."""
    from ..ir.nodes import REDUCE_IDENTITY
    v = REDUCE_IDENTITY[kind]
    if d.kind == "bool":                 # max is "any", min is "all"
        return "False" if v < 0 else "True"
    if d.is_float:
        return literal(v)
    if v == 0.0:
        return "0"
    big = (1 << (d.bits - (0 if d.kind == "uint" else 1))) - 1
    return str(-big - 1 if v < 0 else big) if d.kind != "uint" else ("0" if v < 0 else str(big))


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def spec_text(k) -> str:
    """The specialisation, for a generated module's header."""
    out = []
    for p in k.params:
        if p.kind == "scalar":
            out.append(f"{p.name}: {p.dtype}")
        else:
            dims = ", ".join(a + (f"={k.axes[a].size}" if k.axes[a].size is not None else "")
                             for a in p.axes)
            out.append(f"{p.name}: {p.dtype}[{dims}]")
    return ", ".join(out)


def contraction_parts(n, tdims):
    """``(a, b, axis)`` when ``n`` is ``sum(a * b, axis)`` over two f32 blocks
    that each lack one of its two output axes (``q [G, D] * k [N, D]`` summed
    over D): a block product, which the C++ and Triton lowerings print as one
    (paged decode writes q.k and p.v this way). ``tdims(node)`` gives a
    node's block axes. None otherwise."""
    if n.op != Op.REDUCE or n.arg[1] != "sum":
        return None
    (x,) = n.src
    axis, out = n.arg[0], tdims(n)
    if x.op != Op.MUL or len(out) != 2 or not all(v.dtype == dt.f32 for v in (n, x, *x.src)):
        return None
    a, b = x.src
    if {frozenset(tdims(a)), frozenset(tdims(b))} != \
            {frozenset((out[0], axis)), frozenset((out[1], axis))}:
        return None
    return a, b, axis
