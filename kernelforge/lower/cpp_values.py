"""How the C++ lowering computes values (``cpp_printer`` drives it): the
IR's op tables in C++ spelling, loads (clamped, branch-free), reductions
(per-lane partials, then halving) and ``dot`` (packed blocks into
``kf_dot``). A mixin of the printer: it reads the printer's tiles, masks and
names (``tdims``, ``tile``, ``mask``, ``names``, ``declare``, ``nest``)."""
from __future__ import annotations

import math

from ..ir import dtypes as dt
from ..ir.errors import KernelError
from ..ir.nodes import COMPARE, Node, Op
from .codegen import contraction_parts, identity

# register (compute) type and memory type of each IR dtype
_CT = {dt.f64: "double", dt.f32: "float", dt.f16: "float", dt.bf16: "float", dt.i64: "int64_t",
       dt.i32: "int32_t", dt.u32: "uint32_t", dt.bool_: "bool"}
_MT = {**_CT, dt.f16: "uint16_t", dt.bf16: "uint16_t"}
_ROUND = {dt.bf16: "kf_rbf16", dt.f16: "kf_rf16"}     # to the 16-bit precision, kept in float
_LOAD = {dt.bf16: "kf_bf16_load", dt.f16: "kf_f16_load"}
_STORE = {dt.bf16: "kf_bf16_bits", dt.f16: "kf_f16_bits"}

_INFIX = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/",
          Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!=",
          Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.SHL: "<<", Op.SHR: ">>"}
_CALL = {Op.ABS: "std::abs", Op.EXP: "kf_exp", Op.EXP2: "kf_exp2", Op.LOG: "std::log",
         Op.LOG2: "std::log2", Op.SQRT: "std::sqrt", Op.SIN: "std::sin", Op.COS: "std::cos",
         Op.FLOOR: "std::floor", Op.MAX: "kf_max", Op.MIN: "kf_min", Op.MULHI: "kf_mulhi",
         # padded lanes compute too: a 0 divisor (or INT_MIN / -1) must not trap
         Op.IDIV: "kf_idiv", Op.MOD: "kf_imod"}
_ROUNDED = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.ABS, Op.EXP, Op.EXP2, Op.LOG,
                      Op.LOG2, Op.SQRT, Op.RSQRT, Op.SIN, Op.COS, Op.TANH, Op.SIGMOID,
                      Op.RECIP, Op.FLOOR})
_INLINE = frozenset({Op.LOAD, Op.WHERE, Op.CAST, Op.BITCAST}) | frozenset(_INFIX) | \
    frozenset(_CALL) | frozenset({Op.NEG, Op.NOT, Op.RSQRT, Op.TANH, Op.SIGMOID, Op.RECIP})
_CHEAP = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.MAX, Op.MIN, Op.WHERE, Op.CAST, Op.NEG}) | COMPARE
_LEAF = frozenset({Op.CONST, Op.PARAM, Op.SIZE, Op.RANGE, Op.FULL})
# arrays larger than this are per-thread statics, not stack locals
_STACK_BYTES = 64 * 1024


def _lit(v, d) -> str:
    """A C++ literal of IR dtype ``d``."""
    if d == dt.bool_:
        return "true" if v else "false"
    if d.is_float:
        v = float(v)
        if math.isnan(v):
            return "NAN"
        if math.isinf(v):
            return "INFINITY" if v > 0 else "(-INFINITY)"
        return repr(v) + ("" if d == dt.f64 else "f")
    return f"(({_CT[d]}){int(v)}{'u' if d == dt.u32 else 'LL'})"


class ValueRules:
    """Expressions, loads, reductions and dot of the C++ printer."""

    def ex(self, n: Node) -> str:
        """``n``'s value at the current lanes (loop variables i_<axis> of its dims)."""
        key = id(n)
        if key in self.names:
            nm = self.names[key]
            return f"{nm}[{self.lin(n)}]" if self.tdims(n) else nm
        op = n.op
        if op == Op.CONST:
            return _lit(n.arg, n.dtype)
        if op == Op.FULL:
            return _lit(n.arg, n.dtype)
        if op == Op.PARAM:
            return n.arg.name
        if op == Op.SIZE:
            return f"((int32_t){self.size(n.arg)})"
        if op == Op.RANGE:
            return f"((int32_t){self.index(n)})"
        return self.expr(n)

    def rounded(self, n: Node, e: str) -> str:
        r = _ROUND.get(n.dtype)
        return f"{r}({e})" if r and n.op in _ROUNDED else e

    def expr(self, n: Node) -> str:
        op, ct = n.op, _CT.get(n.dtype)
        s = [self.ex(x) for x in n.src] if op not in (Op.LOAD, Op.REDUCE, Op.DOT) else []
        if op == Op.LOAD:
            return self.load(n)
        if op in _INFIX:
            e = f"({s[0]} {_INFIX[op]} {s[1]})"
            if n.dtype.is_int or n.dtype == dt.bool_:
                e = f"(({ct}){e})"
            return self.rounded(n, e)
        if op in _CALL:
            return self.rounded(n, f"{_CALL[op]}({', '.join(s)})")
        if op == Op.NEG:
            return self.rounded(n, f"(({ct})(-{s[0]}))")
        if op == Op.NOT:
            return f"(!{s[0]})" if n.dtype == dt.bool_ else f"(({ct})~{s[0]})"
        if op == Op.RSQRT:
            return self.rounded(n, f"(({ct})1 / std::sqrt({s[0]}))")
        if op == Op.RECIP:
            return self.rounded(n, f"(({ct})1 / {s[0]})")
        if op == Op.TANH:         # through exp, as the Triton lowering: exact enough for capping
            return self.rounded(n, f"(({ct})2 / (({ct})1 + kf_exp(({ct})-2 * {s[0]})) - ({ct})1)")
        if op == Op.SIGMOID:
            return self.rounded(n, f"(({ct})1 / (({ct})1 + kf_exp(-{s[0]})))")
        if op == Op.WHERE:
            return f"kf_where({s[0]}, {s[1]}, {s[2]})"
        if op == Op.CAST:
            if n.dtype == dt.bool_:
                return f"({s[0]} != 0)"
            r = _ROUND.get(n.dtype)
            return f"{r}((float){s[0]})" if r else f"(({ct}){s[0]})"
        if op == Op.BITCAST:
            return f"kf_bitcast<{ct}>({s[0]})"
        raise KernelError(f"the C++ lowering has no rule for {op.name}", n.loc)

    # -- memory -----------------------------------------------------------------
    def address(self, param, index, clamp: bool = False) -> str:
        last = len(index) - 1
        terms = []
        for d, i in enumerate(index):
            e = f"(int64_t){self.ex(i)}"
            if clamp and i.op != Op.CONST and not self.fits(i, param.axes[d]) and not (
                    i.op == Op.RANGE and i.arg[0] == param.axes[d] and not self.padded(i)):
                e = f"kf_clamp({e}, {self.size(param.axes[d])})"
            terms.append(e if d == last else f"{e} * {param.name}_s{d}")
        return " + ".join(terms) or "0"

    def interval(self, i: Node):
        """[lo, hi] of an index built from tiles of static extent and
        constants (``i + half``), or None: such an index needs no bound check
        or clamp when it fits the dim, and its loads stay contiguous."""
        if i.op == Op.CONST and isinstance(i.arg, int):
            return i.arg, i.arg
        if i.op == Op.RANGE and i.arg[1] in ("full", "seq"):
            size = self.k.axes[i.arg[0]].size
            if size is not None and (i.arg[1] == "full" or size <= self.block(i)) and \
                    not (i.arg[1] == "seq" and self.an.loops[i.arg[2]].bounded):
                return 0, self.block(i) - 1
            return None
        if i.op in (Op.ADD, Op.SUB, Op.MUL):
            a, b = (self.interval(x) for x in i.src)
            if a is None or b is None:
                return None
            if i.op == Op.ADD:
                return a[0] + b[0], a[1] + b[1]
            if i.op == Op.SUB:
                return a[0] - b[1], a[1] - b[0]
            prods = [x * y for x in a for y in b]
            return min(prods), max(prods)
        return None

    def fits(self, i: Node, axis: str) -> bool:
        size = self.k.axes[axis].size
        r = self.interval(i)
        return size is not None and r is not None and r[0] >= 0 and r[1] < size

    def bounds(self, param, index) -> list[str]:
        """Gathered indices (not the dim's own tile) stay inside the dim."""
        parts = []
        for d, i in enumerate(index):
            if i.op == Op.CONST or (i.op == Op.RANGE and i.arg[0] == param.axes[d]) or \
                    self.fits(i, param.axes[d]):
                continue
            e = self.ex(i)
            parts.append(f"(({e}) >= 0) & (({e}) < {self.size(param.axes[d])})")
        return parts

    def load(self, n: Node) -> str:
        param, *index = n.src
        p = param.arg
        cond = self.mask(n, self.tdims(n)) + self.bounds(p, index)
        # a masked lane reads a clamped, valid address and selects 0: no branch,
        # so the loop vectorises (an empty tensor gets a scratch buffer: backend)
        v = f"{p.name}[{self.address(p, index, clamp=bool(cond))}]"
        if p.dtype in _LOAD:
            v = f"{_LOAD[p.dtype]}({v})"
        return f"kf_sel({' & '.join(cond)}, {v})" if cond else v

    # -- statements ---------------------------------------------------------------

    def masked(self, x: Node, axis: str, fill: str) -> str:
        src = x.src[0] if x.op == Op.CAST else x
        e = self.ex(x)
        if fill == "0" and src.op == Op.LOAD:
            return e                         # masked lanes of a load already read 0
        m = self.mask(x, self.tdims(x), axes=(axis,))
        return f"kf_where({m[0]}, {e}, ({_CT[x.dtype]}){fill})" if m else e

    def reduce(self, nm: str, n: Node) -> None:
        (x,) = n.src
        axis, kind = n.arg
        ct = _CT[x.dtype]
        ident = identity(kind, x.dtype)
        ident = {"float('-inf')": "(-INFINITY)", "float('inf')": "INFINITY",
                 "False": "false", "True": "true"}.get(ident, ident)
        if x.dtype.is_float and ident not in ("(-INFINITY)", "INFINITY"):
            ident = _lit(float(ident), x.dtype)
        dims, t = self.loop_dims(x), self.tile(x, axis)
        b = self.block(t)
        out_dims = self.tdims(n)
        self.declare(nm, n)
        self.open("")                       # a scope for the loop's locals
        v = self.masked(x, axis, ident)
        if kind.startswith("arg"):
            better = ">" if kind == "argmax" else "<"
            depth = self.nest(out_dims, self.blocks(n), simd=False)
            self.line(f"{ct} kf_best = {ident}; int32_t kf_at = 0; bool kf_found = false;")
            self.open(f"for (int i_{axis} = 0; i_{axis} < {b}; ++i_{axis})")
            self.line(f"const {ct} kf_x = {v};")
            valid = " & ".join(self.mask(x, dims, axes=(axis,))) or "true"
            # first NaN wins, then the larger (smaller); ties keep the lower index
            self.open(f"if ({valid} & (!kf_found || kf_x {better} kf_best || (kf_x != kf_x && kf_best == kf_best)))")
            self.line(f"kf_best = kf_x; kf_at = (int32_t){self.index(t)}; kf_found = true;")
            self.close()
            self.close()
            self.line(f"{nm}{'[' + self.lin(n) + ']' if out_dims else ''} = kf_at;")
            self.unnest(depth)
            self.close()
            return
        comb = {"sum": "({a} + {b})", "max": "kf_max({a}, {b})", "min": "kf_min({a}, {b})"}[kind]
        if dims[-1] == axis:
            # innermost: L partial results, one per vector lane, then combined
            lanes = min(b & -b, 16)        # a power of two dividing b (halved below)
            outer = dims[:-1]
            depth = self.nest(outer, [self.block(self.tile(x, a)) for a in outer], simd=False)
            self.line(f"{ct} kf_part[{lanes}];")
            self.line(f"for (int kf_l = 0; kf_l < {lanes}; ++kf_l) kf_part[kf_l] = {ident};")
            self.open(f"for (int kf_base = 0; kf_base < {b}; kf_base += {lanes})")
            self.line("#pragma omp simd")
            self.open(f"for (int kf_l = 0; kf_l < {lanes}; ++kf_l)")
            self.line(f"const int i_{axis} = kf_base + kf_l;")
            self.line(f"kf_part[kf_l] = {comb.format(a='kf_part[kf_l]', b=v)};")
            self.close()
            self.close()
            # halve the partials (each step a vector op), not a scalar loop
            self.line(f"for (int kf_w = {lanes // 2}; kf_w > 0; kf_w /= 2)")
            self.line(f"  for (int kf_l = 0; kf_l < kf_w; ++kf_l) kf_part[kf_l] = "
                      f"{comb.format(a='kf_part[kf_l]', b='kf_part[kf_l + kf_w]')};")
            self.line(f"{ct} kf_acc = kf_part[0];")
            self.line(f"{nm}{'[' + self.lin(n) + ']' if out_dims else ''} = "
                      f"{self.rounded_value(x.dtype, 'kf_acc')};")
            self.unnest(depth)
            self.close()
            return
        self.assign(nm, n, ident)
        depth = self.nest(dims, [self.block(self.tile(x, a)) for a in dims])
        tgt = f"{nm}[{self.lin(n)}]" if out_dims else nm
        self.line(f"{tgt} = {self.rounded_value(x.dtype, comb.format(a=tgt, b=v))};")
        self.unnest(depth)
        self.close()

    def topk(self, nm: str, n: Node) -> str:
        """Both results of a topk, by ``k`` passes of selection per row: each
        takes the largest value left (NaN first) at the lowest index holding
        it. Returns ``n``'s array; the sibling's is left for the other TOPK node."""
        x = n.src[0]
        axis, k, new_axis, part = n.arg
        done = self.names.pop(("topk", id(x), axis, k, part), None)
        if done is not None:
            return done
        ct, b = _CT[x.dtype], self.block(self.tile(x, axis))
        rows = tuple(a for a in self.tdims(x) if a != axis)
        vals, ids = f"{nm}_v", f"{nm}_i"
        self.declare(vals, n)
        self.declare(ids, n, "int32_t")
        self.line("// topk: k passes, each the largest value left (NaN first), lowest index first")
        self.open("")
        depth = self.nest(rows, [self.block(self.tile(x, a)) for a in rows], simd=False)
        self.line(f"bool kf_taken[{b}] = {{}};")
        self.open(f"for (int i_{new_axis} = 0; i_{new_axis} < {k}; ++i_{new_axis})")
        self.line(f"{ct} kf_best = 0; int32_t kf_at = -1;")
        self.open(f"for (int i_{axis} = 0; i_{axis} < {b}; ++i_{axis})")
        self.line(f"const {ct} kf_x = {self.ex(x)};")
        valid = " & ".join(self.mask(x, self.tdims(x), axes=(axis,)) + [f"!kf_taken[i_{axis}]"])
        self.open(f"if ({valid} & (kf_at < 0 || kf_x > kf_best || "
                  "(kf_x != kf_x && kf_best == kf_best)))")
        self.line(f"kf_best = kf_x; kf_at = i_{axis};")
        self.close()
        self.close()
        self.line("if (kf_at >= 0) kf_taken[kf_at] = true;")
        self.line(f"{vals}[{self.lin(n)}] = kf_best; {ids}[{self.lin(n)}] = kf_at;")
        self.close()
        self.unnest(depth)
        self.close()
        other = "indices" if part == "values" else "values"
        self.names[("topk", id(x), axis, k, other)] = vals if other == "values" else ids
        return vals if part == "values" else ids

    @staticmethod
    def rounded_value(d, e: str) -> str:
        r = _ROUND.get(d)
        return f"{r}({e})" if r else e

    def contraction(self, n: Node):
        """``(a, b, axis)`` when the REDUCE ``n`` is ``sum(a * b, axis)`` over two
        f32 blocks that each lack one of its two output axes (``q [G, D] * k
        [N, D]`` summed over D): a block product, lowered as ``dot`` instead of
        one horizontal sum per output element (paged decode's q.k and p.v,
        written with ``kl.sum`` so that the Triton lowering takes any G).
        Summation order differs from the plain reduction (fp32 rounding only)."""
        if n.src[0].op != Op.MUL or id(n.src[0]) in self.names:   # the product built anyway
            return None
        return contraction_parts(n, self.tdims)

    def dot(self, nm: str, n: Node, parts=None) -> None:
        """``n``: a DOT, or a REDUCE with its ``contraction`` ``parts``."""
        a, b, k = parts or (*n.src, n.arg)
        out = self.tdims(n)
        if len(out) != 2 or len(self.tdims(a)) != 2 or len(self.tdims(b)) != 2 or \
                n.dtype != dt.f32:
            raise KernelError("the C++ lowering supports an f32 dot of two 2-D blocks; got "
                              f"{list(self.tdims(a))} and {list(self.tdims(b))}", n.loc)
        x, y = out
        if x not in self.tdims(a):
            a, b = b, a
        M, N = (self.block(self.tile(n, d)) for d in (x, y))
        K = self.block(self.tile(a, k))
        # a few rows against a B stored along k (decode's query heads against
        # keys): kf_dot_nt reads B as it lies; kf_dot would transpose it first,
        # a scalar move per value that costs more than the product (docs/design.md,
        # "Lowerings"); 16 or more rows share that transpose instead
        nt = M < 16 and N % 16 == 0 and K % 16 == 0 and self.stored_along(b, k)
        b_dims, b_shape = ((y, k), (N, K)) if nt else ((k, y), (K, N))
        args = []
        for tmp, op, (r, c), (R, C) in ((f"{nm}_a", a, (x, k), (M, K)),
                                         (f"{nm}_b", b, b_dims, b_shape)):
            if (self.tdims(op) == (r, c) and id(op) in self.names and op.dtype == dt.f32
                    and not self.mask(op, (r, c), axes=(k,))):
                args.append(self.names[id(op)])     # already a packed f32 block: no copy
                continue
            args.append(tmp)
            self.line(f"alignas(64) float {tmp}[{R * C}];" if R * C * 4 <= _STACK_BYTES else
                      f"static thread_local float {tmp}[{R * C}];")
            e = self.masked(op, k, "0")
            src = op.src[0] if op.op == Op.CAST else op
            order = ((r, c), (R, C))
            if id(src) not in self.names and self.stored_along(op, r) and \
                    self.tile(op, r).arg[0] == r:
                order = ((c, r), (C, R))     # read memory along its contiguous dim
            depth = self.nest(*order)
            self.line(f"{tmp}[i_{r} * {C} + i_{c}] = (float){e};")
            self.unnest(depth)
        self.declare(nm, n)
        self.line(f"kf_dot{'_nt' if nt else ''}<{M}, {N}, {K}>({args[0]}, {args[1]}, {nm});")

    def stored_along(self, x: Node, axis: str) -> bool:
        """``x`` is a (cast) load whose contiguous memory dim is ``axis``."""
        src = x.src[0] if x.op == Op.CAST else x
        return src.op == Op.LOAD and src.src[0].arg.axes[-1] == axis

    # -- driver ---------------------------------------------------------------------
