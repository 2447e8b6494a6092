"""An op, declared once (PyTorch's OpInfo is the model).

An op file holds its kernels and one ``OpSpec``: the arguments with their
checks, the outputs' rule, what it launches (``run``), and, for the tests,
the conformance kit and the benchmarks, its float64 reference, sample
inputs, bad-input cases and benchmark shapes. Everything that is protocol
is derived here, once, for every op:

- the public function ``kernelforge.ops.NAME`` (signature and docstring from
  the arguments; checks; the backend checked even when there is nothing to
  compute; the opaque path inside a caller's ``torch.compile`` graph; ``out=``
  and in-place forms where the op has them);
- the ``torch.ops.kernelforge.NAME`` custom op (schema from the arguments,
  fake kernel from the outputs' rule) and ``NAME_`` for the in-place form;
- the entries of ``kernelforge ops | show | aot-check`` (``kernels``).

Example (the whole protocol of an elementwise op):

    >>> SPEC = OpSpec("silu_and_mul", "silu(x[..., :d]) * x[..., d:]", args=(
    ...     Tensor("x", dims=(1, None), check=_even_last, doc="[..., 2d]"),
    ...     Out("out", like=lambda a: half(a.x)), Backend()),
    ...     outputs=(Output("out", shape=..., dtype="x"),),
    ...     run=rowwise(lambda a, x, out: launch(silu_and_mul_fwd, ...)),
    ...     kernels=lambda: (silu_and_mul_fwd,))
    >>> silu_and_mul = SPEC.op
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import cache, checks, config
from .backends import registry
from .rowwise import rowwise  # noqa: F401  (part of the spec vocabulary ops import)

REQUIRED = object()
FLOAT = checks.FLOAT_DTYPES
INDEX = (torch.int64, torch.int32)
_F32_MAX = float(torch.finfo(torch.float32).max)


# -- arguments ----------------------------------------------------------------------

class Arg:
    """One argument of the public function. ``graph=False`` keeps it out of
    the custom op (host-side options such as ``out=`` or a plan)."""
    schema = "Any"

    def __init__(self, name: str, *, default=REQUIRED, kw_only: bool = False, doc: str = "",
                 graph: bool = True, optional: bool = False):
        self.name, self.default, self.kw_only, self.doc = name, default, kw_only, doc
        self.graph, self.optional = graph, optional or default is None

    def check(self, op: str, a) -> None:
        """Raise ``OpArgError`` naming the argument when its value is wrong."""

    def schema_text(self, index: int = 0, mutated: bool = False) -> str:
        return f"{self.schema}{'?' if self.optional else ''} {self.name}"


class Tensor(Arg):
    """A tensor argument.

    Args:
        dtypes: accepted dtypes (default the float dtypes); None: ``check`` decides.
        dims: an exact rank, or (min, max) with None for no bound.
        layout: the expected layout in words, for the rank error ("[tokens, heads, D]").
        shape: ``shape(a) -> tuple`` the exact shape, given the other arguments.
        why: what ``shape`` is, for the error (" (the last dim of `x`)").
        dtype_of: the argument whose dtype this one must have.
        device_of: the argument whose device this one must be on (default:
            the op's first tensor).
        last_contiguous: the last dim must have stride 1.
        check: ``check(op, a)`` for rules the fields cannot say.
    """
    schema = "Tensor"

    def __init__(self, name, dtypes=FLOAT, *, dims=None, layout: str = "", shape=None,
                 why: str = "", dtype_of: str | None = None, device_of: str | None = None,
                 last_contiguous: bool = True, check=None, **kw):
        super().__init__(name, **kw)
        self.dtypes = None if dtypes is None else tuple(dtypes)
        self.layout, self.shape, self.why = layout, shape, why
        self.dims = (dims, dims) if isinstance(dims, int) else dims
        self.dtype_of, self.device_of = dtype_of, device_of
        self.last_contiguous, self.extra = last_contiguous, check

    def schema_text(self, index: int = 0, mutated: bool = False) -> str:
        mark = f"(a{index}!)" if mutated else ""
        return f"Tensor{mark}{'?' if self.optional else ''} {self.name}"

    def check(self, op, a):
        t = getattr(a, self.name)
        if t is None and self.optional:
            return
        checks.tensor(op, self.name, t)
        if self.dtype_of is None and self.dtypes is not None and t.dtype not in self.dtypes:
            checks.fail(op, self.name, "dtype " + _words([str(d).replace("torch.", "")
                                                          for d in self.dtypes]), t.dtype)
        if self.dims is not None:
            lo, hi = self.dims
            if (lo is not None and t.dim() < lo) or (hi is not None and t.dim() > hi):
                want = self.layout or (f"{lo} dimensions" if lo == hi else
                                       f"at least {lo} dimension{'s' * (lo != 1)}"
                                       if hi is None else f"{lo} to {hi} dimensions")
                checks.fail(op, self.name, want, "a 0-d tensor" if t.dim() == 0 else
                            list(t.shape))
        # against another argument only once that one is a tensor (its own check names it)
        ref = self.device_of or a._first_tensor
        if ref != self.name and isinstance(getattr(a, ref), torch.Tensor):
            checks.same_device(op, self.name, t, ref, getattr(a, ref))
        if self.dtype_of is not None and isinstance(getattr(a, self.dtype_of), torch.Tensor):
            checks.same_dtype(op, self.name, t, self.dtype_of, getattr(a, self.dtype_of))
        if self.shape is not None:
            checks.shape(op, self.name, t, tuple(self.shape(a)), self.why)
        if self.last_contiguous:
            checks.last_dim_contiguous(op, self.name, t)
        if self.extra is not None:
            self.extra(op, a)


class Float(Arg):
    """A number the kernels read as fp32: finite and within fp32's range;
    ``positive`` also > 0; ``low``/``high`` bound it (inclusive)."""
    schema = "float"

    def __init__(self, name, *, positive: bool = False, low: float | None = None,
                 high: float | None = None, **kw):
        super().__init__(name, **kw)
        self.positive, self.low, self.high = positive, low, high

    def check(self, op, a):
        v = getattr(a, self.name)
        if v is None and self.optional:
            return
        checks.fp32_number(op, self.name, v, positive=self.positive, low=self.low, high=self.high)


class Int(Arg):
    """A Python int in ``[low, high]`` (bounds inclusive, None for none)."""
    schema = "SymInt"

    def __init__(self, name, *, low: int | None = None, high: int | None = None, why: str = "",
                 **kw):
        super().__init__(name, **kw)
        self.low, self.high, self.why = low, high, why

    def check(self, op, a):
        v = getattr(a, self.name)
        if v is None and self.optional:
            return
        checks.integer(op, self.name, v, self.low, self.high, self.why, self.optional)


class Bool(Arg):
    schema = "bool"

    def check(self, op, a):
        v = getattr(a, self.name)
        if v is None and self.optional:
            return
        if not isinstance(v, bool):
            checks.fail(op, self.name, "None or a bool" if self.optional else "a bool", repr(v))


class Out(Tensor):
    """The optional ``out=`` tensor: the op's first output is written into it,
    so it must have that output's shape and dtype and share no memory with
    an input."""

    def __init__(self, name="out", *, doc: str = "", **kw):
        super().__init__(name, default=None, kw_only=True, graph=False, doc=doc or
                         "optional output tensor (the op's result written into it)",
                         dtypes=(), **kw)

    def check(self, op, a):
        t = getattr(a, self.name)
        if t is None:
            return
        checks.tensor(op, self.name, t)
        first = a._outputs[0]
        shape, dtype = first.shape(a), first.dtype_of(a)
        checks.shape(op, self.name, t, tuple(shape), " (the op's output shape)")
        if t.dtype != dtype:
            checks.fail(op, self.name, f"dtype {dtype} (the op's output dtype)", t.dtype)
        checks.same_device(op, self.name, t, a._first_tensor, getattr(a, a._first_tensor))
        checks.last_dim_contiguous(op, self.name, t)
        checks.no_self_overlap(op, self.name, t)
        checks.no_overlap(op, self.name, t, [(n, getattr(a, n)) for n in a._tensors
                                             if n != self.name])


class Host(Arg):
    """A host-side option the custom op does not take (a plan object, a split
    count): checked by ``check(op, a)``."""

    def __init__(self, name, *, check=None, **kw):
        super().__init__(name, graph=False, **kw)
        self.extra = check

    def check(self, op, a):
        if self.extra is not None:
            self.extra(op, a)


class Backend(Arg):
    """``backend=``: a registered backend's name or None (chosen per device)."""
    schema = "str"

    def __init__(self):
        super().__init__("backend", default=None, kw_only=True, doc=(
            "a registered backend (`kernelforge ops` lists them) or None: chosen "
            "for the tensors' device"))


@dataclass
class Output:
    """One output of the functional form: its shape and dtype given the
    arguments (the fake kernel and ``out=``'s check use them)."""
    name: str
    shape: Callable[[Any], Sequence[int]]
    dtype: Callable[[Any], torch.dtype] | str
    doc: str = ""

    def dtype_of(self, a) -> torch.dtype:
        return getattr(a, self.dtype).dtype if isinstance(self.dtype, str) else self.dtype(a)


# -- the spec -----------------------------------------------------------------------

@dataclass(repr=False)
class OpSpec:
    """Everything about one op. See the module docstring; tests, the
    conformance kit and the benchmarks read the fields after ``kernels``.

    Args:
        name: the op's name (``kernelforge.ops.NAME``, ``torch.ops.kernelforge.NAME``).
        doc: the summary and the notes of the public function's docstring.
        args: the arguments in signature order (``Backend()`` last).
        outputs: the outputs of the functional form.
        run: ``run(a)`` computes them for checked arguments ``a`` (a namespace),
            honouring ``a.out`` / ``a.inplace`` where the op has them.
        kernels: ``() -> (KernelDef, ...)`` every kernel the op can launch.
        check: ``check(op, a)`` for rules across arguments.
        inplace: the name of the bool argument that selects the in-place form;
            ``mutates`` are then written and returned.
        mutates: arguments written in place (by the in-place form, or always
            when ``inplace`` is None).
        inline: whether a ``config.inline()`` trace may run the op's torch
            lowering in the caller's graph (False: it stays opaque, e.g. when
            it plans on the host).
        returns: ``returns(a, result)``: the public result from the custom op's.
        list_outputs: the custom op returns a list of the outputs that exist
            (an output whose shape rule gives None is absent: rotary without a key).
        example: the docstring's example.
    """
    name: str
    doc: str
    args: tuple
    outputs: tuple
    run: Callable
    kernels: Callable[[], tuple]
    check: Callable | None = None
    inplace: str | None = None
    mutates: tuple = ()
    inline: bool = True
    returns: Callable | None = None
    list_outputs: bool = False
    example: str = ""
    # -- for the tests, the conformance kit and the benchmarks (kernelforge.testing) --
    #: ``reference(a) -> outputs`` in float64 (or exact ints), written from the formula
    reference: Callable | None = None
    #: ``samples(budget) -> hypothesis strategy`` of ``Call``s (kernelforge.testing)
    samples: Callable | None = None
    #: bad-input cases beyond those the declarations imply: ``Bad(...)``s
    bad: tuple = ()
    #: dtypes the samples draw
    dtypes: tuple = FLOAT
    #: ``allowance(a, reference) -> per-output extra tolerance`` for a rounding the op specifies
    allowance: Callable | None = None
    #: ``[(label, Call factory)]``: shapes of real models for the benchmarks
    bench: tuple = ()
    #: bytes moved and flops of a call, for roofline ratios: ``cost(a) -> (bytes, flops)``
    cost: Callable | None = None
    #: ``peer(a)``: the plain torch an engine would run instead (the benchmarks' baseline)
    peer: Callable | None = None
    #: ``compare(a, outputs, reference)``: raise AssertionError when they disagree, for an
    #: op whose outputs the generic rule cannot compare (a random draw, undecided near ties)
    compare: Callable | None = None
    #: ``resize(call, rows) -> call``: the same call with another number of rows
    #: (the compile-count check: a new row count must build nothing)
    resize: Callable | None = None
    #: the vLLM op this one stands for and its calling convention, where one exists
    vllm: str = ""
    #: None: every call is checked in full. A tuple of argument names: the checks
    #: depend only on ``call_key`` (tensor types, dtypes, devices, shapes and
    #: strides; the other values) and leave nothing ``run`` reads, so a call with
    #: the key of one that passed skips them, unless one of these arguments is
    #: true (a check that reads tensor values); ``out=`` and in-place calls are
    #: always checked (their checks compare memory)
    checks_by_key: tuple | None = None
    op: Callable = field(init=False, repr=False)

    def __post_init__(self):
        names = [x.name for x in self.args]
        self._names = tuple(names)
        self._by_name = {x.name: x for x in self.args}
        self._tensors = tuple(x.name for x in self.args if isinstance(x, Tensor))
        self._graph = tuple(x for x in self.args if x.graph)
        self._args_class = _args_class(self)
        # per argument: whether a value other than None / False rules out skipping the checks
        self._unkeyed = tuple(isinstance(x, Out) or x.name == self.inplace or
                              x.name in (self.checks_by_key or ()) for x in self.args)
        self.op = _public(self)
        self._custom_ops()

    def __repr__(self) -> str:
        return f"OpSpec({self.name!r})"

    # -- a call -------------------------------------------------------------------
    def bind(self, values: tuple):
        """The arguments as a namespace (``a.x``, ``a.eps``), for checks and ``run``."""
        return self._args_class(*values)

    def validate(self, a) -> None:
        """Every declared check, then the op's own; raises ``OpArgError``."""
        op = self.name
        for x in self.args:
            x.check(op, a)
        if self.check is not None:
            self.check(op, a)
        mutated = self._mutated(a)
        if mutated:
            checks.no_overlap_among(op, mutated, [(n, getattr(a, n)) for n in self._tensors])

    def _call_key(self, values: tuple):
        """What the checks of a call depend on, or None when they may not be
        skipped (``checks_by_key``)."""
        parts = [self.name, config.env_backend()]
        for v, skip in zip(values, self._unkeyed):
            if skip and v is not None and v is not False:
                return None           # out=, in place, or a check of tensor values
            if isinstance(v, torch.Tensor):
                parts.append((v.__class__, v.dtype, v.device, v.shape, v.stride()))
            elif v is None or v.__class__ in _KEYED_SCALARS:
                parts.append((v.__class__, v))
            else:
                return None
        return tuple(parts)

    def _mutated(self, a) -> list:
        on = self.inplace is None or getattr(a, self.inplace)
        return [(n, getattr(a, n)) for n in self.mutates if on and getattr(a, n) is not None]

    def call(self, values: tuple):
        compiling = torch.compiler.is_compiling()
        key = None
        if self.checks_by_key is not None and not compiling:
            key = self._call_key(values)
            if key is not None and key in cache.checked:
                a = self.bind(values)
                res = self.run(a)
                return self.returns(a, res) if self.returns is not None else res
        a = self.bind(values)
        self.validate(a)
        if compiling and (not self.inline or checks.opaque()):
            return self._graph_call(a)
        if not compiling and "backend" in self._by_name:
            registry.select(getattr(a, a._first_tensor).device, a.backend)   # even for 0 rows
        if key is not None:
            if len(cache.checked) >= _MAX_CHECKED:
                cache.checked.clear()
            cache.checked.add(key)
        res = self.run(a)
        return self.returns(a, res) if self.returns is not None else res

    # -- the custom ops -------------------------------------------------------------
    def _graph_values(self, a) -> list:
        return [x.graph_value(a) if hasattr(x, "graph_value") else getattr(a, x.name)
                for x in self._graph]

    def _graph_call(self, a):
        ns = getattr(torch.ops.kernelforge, self.name + ("_" if self._inplace_on(a) else ""))
        res = ns(*self._graph_values(a))
        if self._inplace_on(a):
            return tuple(getattr(a, n) for n in self.mutates) if len(self.mutates) > 1 \
                else (getattr(a, self.mutates[0]) if self.mutates else None)
        if self.returns is not None:
            res = self.returns(a, res)
        out = getattr(a, "out", None)
        if out is not None:
            first = res[0] if isinstance(res, tuple) else res
            out.copy_(first)
            return (out, *res[1:]) if isinstance(res, tuple) else out
        return res

    def _inplace_on(self, a) -> bool:
        return self.inplace is not None and bool(getattr(a, self.inplace))

    def _from_graph(self, values, inplace: bool):
        """Arguments of a custom-op call, the host-only ones at their defaults."""
        it = iter(values)
        full = []
        for x in self.args:
            if x.graph:
                full.append(next(it))
            elif x.name == self.inplace:
                full.append(inplace)
            else:
                full.append(None if x.default is REQUIRED else x.default)
        return self.bind(tuple(full))

    def schema(self, inplace: bool = False) -> str:
        writes = inplace or self.inplace is None
        args = [x.schema_text(i, writes and x.name in self.mutates)
                for i, x in enumerate(self._graph)]
        if inplace or (self.inplace is None and self.mutates):
            ret = "()"
        elif self.list_outputs:
            ret = "Tensor[]"
        elif len(self.outputs) == 1:
            ret = "Tensor"
        else:
            ret = "(" + ", ".join("Tensor" for _ in self.outputs) + ")"
        return f"({', '.join(args)}) -> {ret}"

    def _custom_ops(self) -> None:
        forms = [False] + ([True] if self.inplace else [])
        for inplace in forms:
            name = self.name + ("_" if inplace else "")
            mutated = self.mutates if (inplace or self.inplace is None) else ()

            def impl(*values, _inplace=inplace):
                a = self._from_graph(values, _inplace)
                self.validate(a)
                res = self.run(a)
                return None if (_inplace or (self.inplace is None and self.mutates)) else \
                    self._graph_result(a, res)

            def fake(*values, _inplace=inplace, _mutated=mutated):
                if _mutated:
                    return None
                a = self._from_graph(values, False)
                outs = [torch.empty(tuple(o.shape(a)), dtype=o.dtype_of(a),
                                    device=getattr(a, a._first_tensor).device)
                        for o in self.outputs if o.shape(a) is not None]
                if self.list_outputs:
                    return outs
                return outs[0] if len(outs) == 1 else tuple(outs)

            op = torch.library.custom_op(f"kernelforge::{name}", impl, mutates_args=mutated,
                                         schema=self.schema(inplace))
            op.register_fake(fake)

    def _graph_result(self, a, res):
        """The functional custom op returns every output, as declared."""
        if self.list_outputs:
            return [r for r in res if r is not None]
        return res


#: scalar types a call key holds by value (NaN never equals itself: always checked)
_KEYED_SCALARS = frozenset((bool, int, float, str))
#: checked call keys kept before the set starts over
_MAX_CHECKED = 4096


def _words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


class Args:
    """A call's arguments by name (a plain class, so Dynamo traces it)."""

    def __repr__(self):
        return f"Args({', '.join(f'{n}={getattr(self, n)!r}' for n in self._names)})"


def _args_class(spec: OpSpec) -> type:
    body = "".join(f"    self.{n} = {n}\n" for n in spec._names) or "    pass\n"
    env: dict = {}
    exec(f"def __init__(self, {', '.join(spec._names)}):\n{body}", env)
    return type(f"{spec.name}_args", (Args,), {
        "__init__": env["__init__"], "_names": spec._names, "_first_tensor": spec._tensors[0],
        "_tensors": spec._tensors, "_outputs": spec.outputs})


def _public(spec: OpSpec) -> Callable:
    """The public function, generated with the declared signature so that
    ``help()``, ``inspect.signature`` and keyword errors are the real ones."""
    params, kw = [], False
    env = {"_call": spec.call}
    for x in spec.args:
        if x.kw_only and not kw:
            params.append("*")
            kw = True
        if x.default is REQUIRED:
            params.append(x.name)
        else:
            env[f"_d_{x.name}"] = x.default
            params.append(f"{x.name}=_d_{x.name}")
    names = ", ".join(spec._names)
    src = f"def {spec.name}({', '.join(params)}):\n    return _call(({names},))\n"
    exec(compile(src, f"<kernelforge op {spec.name}>", "exec"), env)
    fn = env[spec.name]
    fn.__doc__ = _docstring(spec)
    fn.__module__ = "kernelforge.ops"
    fn.spec = spec
    return fn


def _docstring(spec: OpSpec) -> str:
    lines = [spec.doc.strip(), "", "Args:"]
    for x in spec.args:
        lines.append(f"    {x.name}: {x.doc}")
    lines += ["Returns:"]
    for o in spec.outputs:
        lines.append(f"    {o.name}: {o.doc}")
    if spec.example:
        lines += ["", "Example:", *("    " + e for e in spec.example.strip().splitlines())]
    return "\n".join(lines)


# -- what the tests, the kit and the benchmarks call ----------------------------------

@dataclass
class Call:
    """One call of an op: its arguments by name (every public argument can be
    passed by keyword), and a label for reports."""
    kwargs: dict
    label: str = ""

    def with_(self, **changes) -> "Call":
        return Call({**self.kwargs, **changes}, self.label)


@dataclass
class Bad:
    """A bad-input case: ``mutate(call) -> call`` breaks a valid call, and the
    error must contain each of ``words`` (the argument's name in backticks first)."""
    label: str
    mutate: Callable[[Call], Call]
    words: tuple


def resize_rows(*names: str) -> Callable[[Call, int], Call]:
    """``OpSpec.resize`` for row-wise ops: the named tensors flattened to
    rows and cycled (or cut) to ``rows`` rows; other arguments unchanged."""
    def resize(call: Call, rows: int) -> Call:
        new = {}
        for n in names:
            t = call.kwargs.get(n)
            if t is None:
                continue
            flat = t.reshape(-1, t.shape[-1])
            if flat.shape[0]:
                idx = torch.arange(rows, device=t.device) % flat.shape[0]
                new[n] = flat[idx].contiguous()
            else:
                new[n] = torch.randn(rows, t.shape[-1], device=t.device).to(t.dtype)
        return call.with_(**new)
    return resize


def bench(make: Callable, *shapes: tuple) -> tuple:
    """``OpSpec.bench`` from ``make(device, dtype, *shape) -> kwargs`` at each
    shape (real models' sizes), labelled by the shape."""
    def label(shape):
        return "x".join(str(v) for v in shape)
    return tuple((label(s), lambda device, dtype, s=s: Call(make(device, dtype, *s), label(s)))
                 for s in shapes)
