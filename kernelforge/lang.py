"""The kernel language: what a kernel author writes ops with.

Example:
    >>> import kernelforge.lang as kl
    >>> @kl.kernel(static=("N",))
    ... def scale_rows(x: kl.In("M", "N"), out: kl.Out("M", "N"), s: kl.f32):
    ...     m, n = kl.parallel("M"), kl.tile("N")
    ...     kl.store(out[m, n], (kl.load(x[m, n]).to(kl.f32) * s).to(out.dtype))
    >>> print(scale_rows)            # the IR, specialised to f32 by default

Axes are named; a value varies along a subset of the kernel's axes and
operands broadcast by name. Tiles (``parallel``, ``tile``, ``seq_for``)
carry the logical extent of their axis, so loads, stores and reductions are
masked implicitly and with the right identity. Composite helpers written in
this language (softmax, online softmax, ...) live in ``kernelforge.ir.lib``.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from .dynamo_marks import constant_result
from .ir.builder import as_node, caller_loc, node, trace, tracer
from .ir.dtypes import DType, bf16, bool_, f16, f32, f64, i32, i64, u32  # noqa: F401
from .ir.errors import KernelError
from .ir.nodes import Axis, Loop, Node, Op, Param, SrcLoc
from .ir.value import TensorArg, TensorRef, Value, elementwise

__all__ = [
    "kernel", "In", "Out", "parallel", "tile", "seq_for", "load", "store", "full", "zeros",
    "size", "where", "maximum", "minimum", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "sin",
    "cos", "tanh", "sigmoid", "abs", "floor", "reciprocal", "mulhi", "sum", "max", "min", "argmax", "argmin",
    "dot", "cumsum", "cummax", "sort", "topk", "f32", "f16", "bf16", "f64", "i32", "i64", "u32",
    "bool_", "KernelError",
]


# -- kernel signature ---------------------------------------------------------

class In:
    """A tensor the kernel reads, with one axis name per dim: ``In("M", "N")``."""
    kind = "in"

    def __init__(self, *axes: str):
        self.axes = axes


class Out(In):
    """A tensor the kernel writes (it may alias an input: in-place ops)."""
    kind = "out"


class KernelDef:
    """A kernel as written. ``specialize`` traces it for concrete tensor
    dtypes and static axis sizes (the cache key); the result is verified IR."""

    def __init__(self, fn: Callable, static: tuple[str, ...] = (), derived=None,
                 examples=(), example_dtypes=None):
        if torch.compiler.is_compiling() and _refuse_in_trace(
                fn.__name__, fn.__code__.co_filename, fn.__code__.co_firstlineno):
            torch._dynamo.graph_break()      # (not fullgraph) build it in eager Python
        self.fn, self.name, self.static = fn, fn.__name__, tuple(static)
        self.derived = dict(derived or {})
        self.examples = tuple(dict(e) for e in examples)
        self.example_dtypes = dict(example_dtypes or {})
        self.loc = _def_loc(fn)
        self.signature: list[tuple[str, object]] = []
        axes: list[str] = []
        # eval_str: modules with `from __future__ import annotations` hold the
        # annotations as strings
        for name, p in inspect.signature(fn, eval_str=True).parameters.items():
            ann = p.annotation
            if not isinstance(ann, (In, DType)):
                raise KernelError(f"parameter `{name}` of kernel `{self.name}` needs an "
                                  "annotation: kl.In(axes...), kl.Out(axes...) or a dtype "
                                  "such as kl.f32 for a scalar", self.loc)
            self.signature.append((name, ann))
            for a in getattr(ann, "axes", ()):
                if a not in axes:
                    axes.append(a)
        axes.extend(a for a in self.derived if a not in axes)
        self.axis_names = tuple(axes)
        for s in self.static:
            if s not in axes:
                raise KernelError(f"static axis `{s}` is not an axis of any parameter "
                                  f"of `{self.name}` (axes: {axes})", self.loc)
        for e in self.examples:
            if set(e) != set(self.static):
                raise KernelError(f"example sizes {e} of `{self.name}` must give exactly the "
                                  f"static axes {list(self.static)}", self.loc)
        self._cache: dict[tuple, object] = {}
        self.launch_plan = None          # filled by kernelforge.dispatch on first launch

    @property
    def tensor_params(self) -> list[str]:
        return [n for n, a in self.signature if isinstance(a, In)]

    def specialize(self, dtypes: dict[str, DType] | None = None,
                   sizes: dict[str, int] | None = None):
        """Trace and verify for ``dtypes`` (tensor param -> dtype; default f32)
        and ``sizes`` (static axis -> extent)."""
        from .ir.verify import verify
        dtypes, sizes = dtypes or {}, sizes or {}
        unknown = set(dtypes) - set(self.tensor_params)
        if unknown:
            raise KernelError(f"specialize: {sorted(unknown)} are not tensor parameters of "
                              f"`{self.name}` ({self.tensor_params})", self.loc)
        key = (tuple(sorted((k, v.name) for k, v in dtypes.items())), tuple(sorted(sizes.items())))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        params = []
        for name, ann in self.signature:
            if isinstance(ann, In):
                params.append(Param(name, ann.kind, dtypes.get(name, f32), tuple(ann.axes)))
            else:
                params.append(Param(name, "scalar", ann))
        axes = {a: Axis(a, sizes.get(a) if a in self.static else None) for a in self.axis_names}
        for a, rule in self.derived.items():
            known = {n: ax.size for n, ax in axes.items() if ax.size is not None}
            try:
                axes[a] = Axis(a, int(rule(known)))
            except KeyError as e:
                if sizes:   # a real specialisation: the rule names an unknown axis
                    raise KernelError(f"derived axis `{a}` reads size {e} of an axis that is "
                                      f"not static; static sizes known: {known}", self.loc) from None
                axes[a] = Axis(a, None)   # printing an unspecialised kernel
        k = trace(self.fn, self.name, tuple(params), axes, self.loc)
        verify(k)
        self._cache[key] = k
        return k

    def __call__(self, *a, **kw):
        raise TypeError(f"kernel `{self.name}` is IR, not a callable op: launch it through "
                        "kernelforge.launch(...) or an op in kernelforge.ops")

    def __str__(self) -> str:
        return str(self.specialize())


def _kernel_in_trace_error_class():
    """``KernelInTraceError``, built on first use: its base is Dynamo's
    UserError, and importing Dynamo takes seconds that a process which never
    compiles should not pay (``kernelforge generate``'s start-up)."""
    cls = globals().get("_KernelInTraceError")
    if cls is None:
        import torch._dynamo

        class KernelInTraceError(KernelError, torch._dynamo.exc.UserError):
            """A kernel built while torch.compile traces (a KernelError that Dynamo
            passes on to the caller as it is, instead of wrapping it as its own)."""

            def __init__(self, message: str, loc: SrcLoc):
                torch._dynamo.exc.UserError.__init__(
                    self, torch._dynamo.exc.UserErrorType.ANTI_PATTERN, f"{loc}: {message}")
                self.loc, self.reason = loc, message

        KernelInTraceError.__module__ = __name__
        cls = globals()["_KernelInTraceError"] = KernelInTraceError
    return cls


def __getattr__(name: str):
    if name == "KernelInTraceError":
        return _kernel_in_trace_error_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _refuse_in_trace(name: str, file: str, line: int) -> bool:
    """Run by Dynamo outside the trace when a kernel is built inside one (it
    cannot trace ``inspect``, nor should it trace tracing). Under
    ``fullgraph=True`` raises ``KernelInTraceError`` saying what to do;
    otherwise returns True: a graph break, and the kernel is built eagerly."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        one_graph = InstructionTranslator.current_tx().one_graph
    except Exception:              # Dynamo's internals moved: refuse, as under fullgraph
        one_graph = True
    if not one_graph:
        return True
    raise _kernel_in_trace_error_class()(
        f"kernel `{name}` is built inside a torch.compile(fullgraph=True) trace; build "
        "kernel variants outside it: define the kernel at module level, or make it in a "
        "factory decorated with kernelforge.dispatch.kernel_factory, which builds it "
        "outside the trace and hands the trace a key", SrcLoc(file, line))


constant_result(_refuse_in_trace)      # Dynamo runs it outside the trace


def _def_loc(fn) -> SrcLoc:
    """The ``def`` line of a kernel (not its decorator)."""
    code = fn.__code__
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return SrcLoc(code.co_filename, code.co_firstlineno)
    for i, text in enumerate(lines):
        if text.lstrip().startswith(("def ", "async def ")):
            return SrcLoc(code.co_filename, start + i, text.rstrip())
    return SrcLoc(code.co_filename, start, lines[0].rstrip())


def kernel(fn: Callable | None = None, *, static: tuple[str, ...] = (), derived=None,
           examples=(), example_dtypes=None):
    """Declare a kernel.

    Args:
        static: axes whose extent is part of the specialisation (hidden size,
            head size); all other axes are runtime sizes that never recompile.
        derived: extra static axes computed from the static sizes, e.g.
            ``{"H": lambda s: s["N"] // 2}`` for half a row.
        examples: representative static sizes of real models, e.g.
            ``({"N": 4096}, {"N": 16384})``; ``kernelforge show`` and
            ``aot-check`` specialise with them (the first in every float dtype).
        example_dtypes: dtypes of tensor parameters that do not follow the
            float dtype under test in those specialisations (``{"positions": kl.i64}``).
    """
    if fn is None:
        return lambda f: KernelDef(f, static, derived, examples, example_dtypes)
    return KernelDef(fn, static, derived, examples, example_dtypes)


# -- tiles and loops ----------------------------------------------------------

def _axis(name: str) -> Axis:
    k = tracer().k
    if name not in k.axes:
        raise KernelError(f"unknown axis `{name}`; this kernel's axes are {list(k.axes)}",
                          caller_loc())
    return k.axes[name]


def parallel(axis: str, block: int = 1, *, descending: bool = False) -> Value:
    """The launch grid: one program per ``block`` indices of ``axis``.

    Args:
        axis: an axis of the kernel.
        block: indices per program (power of two); 1 makes the index a scalar.
        descending: launch the programs from the last block to the first. For
            kernels whose later blocks do more work (causal attention: later
            rows see more keys), so the longest programs start first and the
            end of the grid is not one long program alone. Only the order
            changes (the Triton lowering maps program i to block n - 1 - i).
            The C++ lowering ignores it: OpenMP's guided schedule hands out
            its largest chunks first, and with the longest programs in them
            causal prefill ran slower (docs/design.md, "The C++ lowering's
            chunks"); the torch lowerings have no launch order.
    Returns:
        the tile of indices this program owns.

    Example:
        >>> t = kl.parallel("T", block=128, descending=True)
    """
    _axis(axis)
    t = tracer()
    if t.loops:
        raise KernelError("parallel() must be called at kernel level, not inside seq_for",
                          caller_loc())
    if any(g.arg[0] == axis for g in t.k.grid):
        raise KernelError(f"axis `{axis}` is already parallel", caller_loc())
    if block < 1 or block & (block - 1):
        raise KernelError(f"parallel block must be a power of two >= 1, got {block}", caller_loc())
    n = Node(Op.RANGE, i32, (axis,), (), (axis, "parallel", block, bool(descending)),
             caller_loc())
    t.k.grid.append(n)
    return Value(n)


def tile(axis: str) -> Value:
    """The whole axis as one tile (padded to a power-of-two block by the
    Triton lowering). The axis must be static; use ``seq_for`` otherwise."""
    a = _axis(axis)
    return Value(Node(Op.RANGE, i32, (a.name,), (), (a.name, "full", None), caller_loc()))


def seq_for(axis: str, body: Callable, init=(), *, start=None, stop=None):
    """A sequential loop over tiles of ``axis`` with loop-carried values.

    Args:
        axis: the axis to walk; each iteration sees one tile of it.
        body: ``body(tile, *carried) -> new carried`` (a value or a tuple).
        init: initial carried values; each keeps its dtype and axes.
        start, stop: optional integer bounds: only indices in [start, stop)
            of the axis are visited. They may vary along parallel axes (a
            range per row, e.g. causal attention's keys); lanes outside a
            row's range are masked like padding: loads read 0, reductions see
            their identity, stores are skipped. A value the rows share
            (loaded without the row axes: keys for a block of query rows)
            reads 0 outside every row's range (on Triton and C++: outside
            the program's walk, from its rows' smallest start to their
            largest stop); at a lane some rows see and others do not it
            holds the real value for all of them, so there a NaN or inf
            times another row's weight of 0 (``p.v`` in a dot) is NaN.
    Returns:
        the carried values after the last iteration (a tuple), or None.

    Lowerings choose the tile size: Triton loops over power-of-two chunks
    (from the smallest start to the largest stop of the program's rows), the
    torch lowerings run one masked iteration over the whole axis.

    Example:
        >>> m_i, l_i, acc = kl.seq_for("N", step, init=(m0, l0, acc0), stop=n_keys)
    """
    a = _axis(axis)
    t = tracer()
    loc = caller_loc()
    bounds = [None if b is None else as_node(b) for b in (start, stop)]
    # loop ids count per kernel, so generated names (and source hashes) do not
    # depend on what else the process traced before
    t.k.loop_count += 1
    loop = Loop(a.name, loc, id=t.k.loop_count - 1, parent=t.loops[-1] if t.loops else None,
                start=bounds[0], stop=bounds[1])
    single = not isinstance(init, (tuple, list))
    init_nodes = tuple(as_node(v) for v in ((init,) if single else init))
    loop.range = Node(Op.RANGE, i32, (a.name,), (), (a.name, "seq", loop.id), loc)
    loop.carries = tuple(Node(Op.CARRY, n.dtype, n.axes, (), (loop.id, i), loc)
                         for i, n in enumerate(init_nodes))
    t.loops.append(loop)
    try:
        out = body(Value(loop.range), *[Value(c) for c in loop.carries])
    finally:
        t.loops.pop()
    out = () if out is None else (out if isinstance(out, (tuple, list)) else (out,))
    if len(out) != len(init_nodes):
        raise KernelError(f"seq_for body returned {len(out)} values for {len(init_nodes)} "
                          "carried values", loc)
    loop.yields = tuple(as_node(o, c) for o, c in zip(out, loop.carries))
    sf = Node(Op.SEQ_FOR, None, (), init_nodes, loop, loc)
    t.stmts.append(sf)
    res = tuple(Value(t.k.graph.node(Op.LOOP_OUT, c.dtype, c.axes, (sf,), i, loc))
                for i, c in enumerate(loop.carries))
    if not res:
        return None
    return res[0] if single else res


# -- memory -------------------------------------------------------------------

def load(ref: TensorRef) -> Value:
    """Load ``x[index]``. Lanes outside the logical extent read 0."""
    if not isinstance(ref, TensorRef):
        raise KernelError("load() expects a tensor indexed by tiles, e.g. load(x[m, n])",
                          caller_loc())
    axes = tuple(a for i in ref.index for a in i.axes)
    t = tracer()
    # A load happens where it is written: it belongs to the enclosing loop even
    # when its index is loop-invariant, so no lowering moves it above a store.
    where = t.loops[-1].id if t.loops else None
    return Value(node(Op.LOAD, ref.tensor.dtype, axes, (ref.tensor.node, *ref.index), where))


def store(ref: TensorRef, value, mask=None) -> None:
    """Store ``value`` into ``x[index]``; lanes outside the extent are skipped.

    Args:
        mask: optional bool value; lanes where it is False are not written
            (e.g. padding tokens whose cache slot is -1). It may vary along
            a subset of the index's axes.
    """
    if not isinstance(ref, TensorRef):
        raise KernelError("store() expects a tensor indexed by tiles, e.g. store(out[m, n], v)",
                          caller_loc())
    v = as_node(value)
    axes = tuple(a for i in ref.index for a in i.axes)
    t = tracer()
    m = None if mask is None else as_node(mask)
    n = node(Op.STORE, None, axes, (ref.tensor.node, v, *ref.index), m)
    t.stmts.append(n)


# -- creation -------------------------------------------------------------------

def full(value, dtype: DType, *axes: str) -> Value:
    """A block holding ``value`` that varies along ``axes`` (by their current tile)."""
    v = float(value) if dtype.is_float else (bool(value) if dtype == bool_ else int(value))
    return Value(node(Op.FULL, dtype, axes, tuple(_active_tile(a) for a in axes), v))


def _active_tile(axis: str) -> Node:
    """The tile an axis has at this program point: the innermost enclosing
    seq_for over it, else its parallel tile, else the whole axis."""
    _axis(axis)
    t = tracer()
    for loop in reversed(t.loops):
        if loop.axis == axis:
            return loop.range
    for g in t.k.grid:
        if g.arg[0] == axis:
            return g
    if axis not in t.k.full_tiles:
        t.k.full_tiles[axis] = tile(axis).node
    return t.k.full_tiles[axis]


def zeros(dtype: DType, *axes: str) -> Value:
    return full(0, dtype, *axes)


def size(axis: str) -> Value:
    """The extent of ``axis`` as an i32: a literal when static, else a runtime value."""
    a = _axis(axis)
    if a.size is not None:
        return Value(node(Op.CONST, i32, (), (), a.size))
    return Value(node(Op.SIZE, i32, (), (), a.name))


# -- elementwise ------------------------------------------------------------------

def where(cond, a, b) -> Value:
    """``a`` where ``cond`` holds, else ``b``."""
    like = next((x for x in (a, b) if isinstance(x, Value)), None)
    ref = like.node if like is not None else None
    return elementwise(Op.WHERE, cond, a if isinstance(a, Value) else as_node(a, ref),
                       b if isinstance(b, Value) else as_node(b, ref))


def _unary(op: Op, doc: str):
    def f(x) -> Value:
        return elementwise(op, x)
    f.__name__, f.__doc__ = op.name.lower(), doc
    return f


exp = _unary(Op.EXP, "e**x")
exp2 = _unary(Op.EXP2, "2**x")
log = _unary(Op.LOG, "natural log")
log2 = _unary(Op.LOG2, "log base 2")
sqrt = _unary(Op.SQRT, "square root")
rsqrt = _unary(Op.RSQRT, "1/sqrt(x)")
sin = _unary(Op.SIN, "sine")
cos = _unary(Op.COS, "cosine")
tanh = _unary(Op.TANH, "hyperbolic tangent")
sigmoid = _unary(Op.SIGMOID, "1/(1+e**-x)")
abs = _unary(Op.ABS, "absolute value")  # noqa: A001
floor = _unary(Op.FLOOR, "round toward -inf")
reciprocal = _unary(Op.RECIP, "1/x")


def maximum(a, b) -> Value:
    """The larger of ``a`` and ``b`` per lane; NaN where either is NaN (as
    ``torch.maximum``), on every lowering. Python's ``max(v, 0.0)`` on a value
    is refused: write ``kl.maximum(v, 0.0)``."""
    return elementwise(Op.MAX, a, b)


def minimum(a, b) -> Value:
    """The smaller of ``a`` and ``b`` per lane; NaN where either is NaN (as
    ``torch.minimum``), on every lowering."""
    return elementwise(Op.MIN, a, b)


def mulhi(a, b) -> Value:
    """High 32 bits of the 64-bit product of two u32 values (Philox rounds)."""
    return elementwise(Op.MULHI, a, b)


# -- reductions, contraction, ordering ------------------------------------------

def _reduce(kind: str):
    def f(x: Value, axis: str) -> Value:
        x = x if isinstance(x, Value) else Value(as_node(x))
        out = i32 if kind.startswith("arg") else x.dtype
        return Value(node(Op.REDUCE, out, tuple(a for a in x.axes if a != axis), (x.node,),
                          (axis, kind)))
    f.__name__ = kind
    f.__doc__ = _REDUCE_DOCS[kind] + (" Padded and masked lanes hold the identity, so they "
                                      "never change the result; every lowering agrees.")
    return f


_REDUCE_DOCS = {
    "sum": "Sum of ``x`` along ``axis`` (removing it).",
    "max": "Largest value of ``x`` along ``axis`` (removing it); NaN if any lane is NaN "
           "(as ``torch.amax``). On bool values: any.",
    "min": "Smallest value of ``x`` along ``axis`` (removing it); NaN if any lane is NaN "
           "(as ``torch.amin``). On bool values: all.",
    "argmax": "Position (i32) along ``axis`` of the largest value of ``x``, removing the "
              "axis. Ties go to the lowest index; a NaN counts as the largest value, so a "
              "row holding NaNs gives the first NaN's index (as ``torch.argmax``). Over a "
              "seq_for tile it is the position along the whole axis among the chunk's "
              "lanes; a fold over chunks keeps the rule if it takes a chunk's result when "
              "that is NaN and the carried one is not, when it is larger, or when it is "
              "equal (or both NaN) at a lower index.",
    "argmin": "Position (i32) along ``axis`` of the smallest value of ``x``, removing the "
              "axis. Ties go to the lowest index; a NaN counts as the smallest value, so a "
              "row holding NaNs gives the first NaN's index (as ``torch.argmin``).",
}


sum = _reduce("sum")  # noqa: A001
max = _reduce("max")  # noqa: A001
min = _reduce("min")  # noqa: A001
argmax = _reduce("argmax")
argmin = _reduce("argmin")


def dot(a: Value, b: Value, axis: str, acc: DType = f32) -> Value:
    """Contract ``a`` and ``b`` over ``axis`` (a matrix product by axis name),
    accumulating in ``acc``. Operands must share a dtype."""
    axes = tuple(x for x in a.axes + b.axes if x != axis)
    return Value(node(Op.DOT, acc, axes, (a.node, b.node), axis))


def _scan(kind: str):
    def f(x: Value, axis: str) -> Value:
        return Value(node(Op.SCAN, x.dtype, x.axes, (x.node,), (axis, kind)))
    f.__name__ = f"cum{kind}"
    f.__doc__ = f"Inclusive prefix {kind} along ``axis``."
    return f


cumsum = _scan("sum")
cummax = _scan("max")


def sort(x: Value, axis: str, descending: bool = False) -> Value:
    """Values of ``x`` sorted along ``axis``."""
    return Value(node(Op.SORT, x.dtype, x.axes, (x.node,), (axis, bool(descending))))


def topk(x: Value, axis: str, k: int, new_axis: str) -> tuple[Value, Value]:
    """The ``k`` largest values of ``x`` along ``axis`` and their positions.

    Args:
        x: the values; ``axis`` must be a whole static axis of it (``kl.tile``).
        axis: the axis to select along.
        k: how many to keep, 1 <= k <= the axis's extent.
        new_axis: the axis the results vary along instead of ``axis``; it gets
            the static extent ``k`` (declare it static with that extent when a
            tensor names it).
    Returns:
        ``(values, indices)``: the values in descending order and their
        positions along ``axis`` (i32). Ties go to the lower index first, and
        NaN ranks above every number (first NaN first), as a stable
        descending ``torch.sort`` orders them, on every lowering.

    Example:
        >>> vals, ids = kl.topk(logits, "V", 8, "K")
    """
    t = tracer()
    a = _axis(axis)
    if a.size is not None and not 1 <= int(k) <= a.size:
        raise KernelError(f"topk: k={k} must be between 1 and the extent of `{axis}` "
                          f"({a.size})", caller_loc())
    have = t.k.axes.get(new_axis)
    if have is None:
        t.k.axes[new_axis] = Axis(new_axis, int(k))
    elif have.size != int(k):
        raise KernelError(f"topk into axis `{new_axis}` of extent {have.size}, but k={k}; "
                          "declare the axis static with extent k", caller_loc())
    x = x if isinstance(x, Value) else Value(as_node(x))
    axes = tuple(new_axis if a == axis else a for a in x.axes)
    # the results vary along the whole new axis: its tile is a source of both
    kt = t.k.full_tiles.get(new_axis)
    if kt is None:
        kt = t.k.full_tiles[new_axis] = tile(new_axis).node
    vals = node(Op.TOPK, x.dtype, axes, (x.node, kt), (axis, int(k), new_axis, "values"))
    ids = node(Op.TOPK, i32, axes, (x.node, kt), (axis, int(k), new_axis, "indices"))
    return Value(vals), Value(ids)
