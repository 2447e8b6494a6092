"""The checks every op gets from its spec, on any backend: the machinery of
the project's tests (``pytest --kf-backend=NAME``) and of ``kernelforge
conformance``. Needs the test extra (hypothesis): ``pip install kernelforge[test]``.

- ``check_reference``: a call's outputs against the spec's float64 reference,
  under the one tolerance policy, and untouched inputs;
- ``bad_cases``: bad-input cases derived from the declared arguments plus the
  spec's own; each must raise an error naming the argument;
- ``check_compile_count``: a new number of rows builds nothing new;
- ``check_poison``: inputs inside NaN-filled buffers and ``out=`` inside a
  sentinel buffer: no read or write outside a view.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from . import cache, checks
from .spec import Backend, Bool, Call, Float, Int, OpSpec, Out, Tensor
from .tolerance import assert_close


# -- sizes per backend ------------------------------------------------------------------

@dataclass
class Budget:
    """How large the samples for one backend may be. Backends that compile
    per static size draw those sizes from a short list (a compile costs
    seconds); the Triton interpreter runs one program per row in NumPy, so
    it gets few rows."""
    backend: str
    device: torch.device
    dtypes: tuple
    rows: int = 9
    free_sizes: bool = False
    force_rows: int | None = None
    #: how many of a spec's size choices to draw from (None: all); backends whose
    #: compiles take tens of seconds (Inductor) take the first few only
    size_choices: int | None = None

    def sizes(self, choices, free=None):
        """A strategy for a static size: ``free`` where compiles are free, else
        ``choices`` (list the most telling first)."""
        from hypothesis import strategies as st
        if self.free_sizes and free is not None:
            return free
        return st.sampled_from(list(choices)[:self.size_choices])

    def variant(self, draw, choices):
        """An optional specialisation (a weight dtype): every choice where
        compiles are cheap, the first one on slow compilers."""
        from hypothesis import strategies as st
        return draw(st.sampled_from(list(choices)[:1 if self.size_choices else None]))

    def lead_dims(self, draw) -> tuple:
        """Leading dims of a row-wise input: none, one or two, 0 and 1 rows included."""
        from hypothesis import strategies as st
        if self.force_rows is not None:
            return (self.force_rows,)
        lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
        if math.prod(lead) > self.rows:
            lead = [min(self.rows, 3)]
        return tuple(lead)

    def row_input(self, draw, sizes, free=None, scales=(1.0,)):
        """A row-wise input: ``(x, dtype, seed)`` with x of shape [*lead, n], n
        from ``sizes`` (any size from ``free`` where compiles are free), a
        dtype, leading dims, a scale and maybe strided rows."""
        from hypothesis import strategies as st
        n = draw(self.sizes(sizes, free))
        dtype = draw(st.sampled_from(self.dtypes))
        lead = self.lead_dims(draw)
        seed = draw(st.integers(0, 2 ** 31 - 1))
        x = self.tensor((*lead, n), dtype, seed, draw(st.sampled_from(list(scales))),
                        draw(st.booleans()))
        return x, dtype, seed

    def tensor(self, shape, dtype, seed: int, scale: float = 1.0,
               strided: bool = False) -> torch.Tensor:
        """Normal values times ``scale``; ``strided`` puts the rows inside wider
        rows (a row stride larger than the last dim, as a slice of a fused tensor)."""
        g = torch.Generator().manual_seed(seed)
        shape = tuple(shape)
        if strided and len(shape) >= 2:
            base = torch.randn(*shape[:-1], shape[-1] + 5, generator=g) * scale
            return base.to(dtype).to(self.device)[..., 3:3 + shape[-1]]
        return (torch.randn(shape, generator=g) * scale).to(dtype).to(self.device)


def budget(backend: str, device: torch.device, spec: OpSpec, **kw) -> Budget:
    if backend == "eager":
        return Budget(backend, device, spec.dtypes, rows=9, free_sizes=True, **kw)
    if backend == "triton" and device.type == "cpu":
        return Budget(backend, device, spec.dtypes, rows=3, **kw)
    if backend == "inductor":
        return Budget(backend, device, spec.dtypes, rows=9, size_choices=2, **kw)
    return Budget(backend, device, spec.dtypes, rows=9, **kw)


# -- calls -------------------------------------------------------------------------------

def bound(spec: OpSpec, call: Call, backend: str | None = None):
    """The call's arguments as the spec's namespace, defaults filled in (and
    ``backend``, for a spec that takes one)."""
    kw = call.kwargs
    if backend is not None and "backend" in spec._by_name:
        kw = {**kw, "backend": backend}
    b = inspect.signature(spec.op).bind(**kw)
    b.apply_defaults()
    return spec.bind(tuple(b.arguments[n] for n in spec._names))


def run(spec: OpSpec, call: Call, backend: str | None) -> tuple:
    """Call the op; its outputs as a tuple."""
    kw = {**call.kwargs, "backend": backend} if "backend" in spec._by_name else call.kwargs
    res = spec.op(**kw)
    return res if isinstance(res, tuple) else (res,)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits (NaN == NaN), for 'this input was not written' checks."""
    if t.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return t.detach().contiguous().view(ints).cpu().clone()
    return t.detach().cpu().clone()


def check_reference(spec: OpSpec, call: Call, backend: str | None) -> None:
    """Run ``call`` on ``backend`` and compare every output with the spec's
    float64 reference (computed first, from the inputs as given); inputs the
    op does not write must come back bit for bit."""
    a = bound(spec, call, backend)
    ref = spec.reference(a)
    extra = spec.allowance(a, ref) if spec.allowance is not None else (None,) * len(ref)
    written = {n for n, _ in spec._mutated(a)}
    if getattr(a, "out", None) is not None:
        written.add("out")
    before = {n: _bits(getattr(a, n)) for n in spec._tensors
              if n not in written and isinstance(getattr(a, n), torch.Tensor)}
    outs = run(spec, call, backend)
    what = f"{spec.name}[{backend}] {call.label}"
    if spec.compare is not None:
        try:
            spec.compare(a, outs, ref)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
        _untouched(a, before, what)
        return
    if len(outs) != len(ref):
        raise AssertionError(f"{what}: {len(outs)} outputs, the reference has {len(ref)}")
    for i, (o, r, e) in enumerate(zip(outs, ref, extra)):
        name = spec.outputs[i].name
        if o is None or r is None:
            if (o is None) != (r is None):
                raise AssertionError(f"{what}: output `{name}` is {o!r}, the reference {r!r}")
            continue
        want = tuple(spec.outputs[i].shape(a))
        if tuple(o.shape) != want or o.dtype != spec.outputs[i].dtype_of(a):
            raise AssertionError(f"{what}: output `{name}` is {o.dtype} {list(o.shape)}, "
                                 f"expected {spec.outputs[i].dtype_of(a)} {list(want)}")
        if not o.dtype.is_floating_point:
            if not torch.equal(o.cpu(), r.to(o.dtype).cpu()):
                bad = int((o.cpu() != r.to(o.dtype).cpu()).sum())
                raise AssertionError(f"{what}: output `{name}` differs from the reference "
                                     f"in {bad} of {o.numel()} places")
        else:
            assert_close(o, r, o.dtype, f"{what}: output `{name}`", extra=e)
    _untouched(a, before, what)


def _untouched(a, before: dict, what: str) -> None:
    for n, bits in before.items():
        if not torch.equal(_bits(getattr(a, n)), bits):
            raise AssertionError(f"{what}: input `{n}` was written (the op must not write it)")


# -- bad input -------------------------------------------------------------------------

def bad_cases(spec: OpSpec, call: Call) -> list[tuple[str, Call, tuple]]:
    """(label, bad call, words its error must contain): the cases the
    declarations imply (wrong type, dtype, rank, layout, device, values out
    of range, an unknown backend), then the spec's own ``bad``."""
    a = bound(spec, call)
    out = []

    def case(label, words, **change):
        out.append((label, call.with_(**change), tuple(words)))

    for x in spec.args:
        v = getattr(a, x.name)
        q = f"`{x.name}`"
        if isinstance(x, Out):
            if v is None:
                o = spec.outputs[0]
                shape, dtype = tuple(o.shape(a)), o.dtype_of(a)
                dev = getattr(a, a._first_tensor).device
                case("out of the wrong shape", (q, "shape"),
                     out=torch.empty((*shape[:-1], shape[-1] + 1), dtype=dtype, device=dev))
                case("out of the wrong dtype", (q, "float64"),
                     out=torch.empty(shape, dtype=torch.float64, device=dev))
            continue
        if isinstance(x, Tensor):
            if v is None:
                continue
            case(f"{x.name} not a tensor", (q, "torch.Tensor", "list"), **{x.name: [1.0, 2.0]})
            wrong = torch.int32 if v.dtype.is_floating_point else torch.float32
            if x.dtype_of is None and wrong not in (x.dtypes or ()):
                case(f"{x.name} of dtype {wrong}", (q, str(wrong).replace("torch.", "")),
                     **{x.name: v.to(wrong)})
            if x.dims is not None and x.dims[0] is not None and x.dims[0] >= 1:
                case(f"{x.name} 0-d", (q,), **{x.name: v.reshape(-1)[:1].reshape(())
                                               if v.numel() else
                                               torch.zeros((), dtype=v.dtype, device=v.device)})
            if x.dims is not None and x.dims[1] is not None:
                case(f"{x.name} with an extra dim", (q,), **{x.name: v[None]})
            if x.last_contiguous and v.dim() >= 1 and v.shape[-1] > 1:
                strided = torch.empty((*v.shape, 2), dtype=v.dtype, device=v.device)[..., 0]
                strided.copy_(v)
                case(f"{x.name} with a strided last dim", (q, "contiguous last dimension"),
                     **{x.name: strided})
            if x.name != a._first_tensor:
                case(f"{x.name} on another device", (q, "meta"), **{x.name: v.to("meta")})
        elif isinstance(x, Float):
            for bad in (float("nan"), float("inf"), 10 ** 400, "1.0", True):
                case(f"{x.name}={bad!r}", (q,), **{x.name: bad})
            if x.positive:
                for bad in (0.0, -1.0, 1e-50):
                    case(f"{x.name}={bad!r}", (q, "> 0"), **{x.name: bad})
        elif isinstance(x, Int):
            for bad in (1.5, True, "2"):
                case(f"{x.name}={bad!r}", (q,), **{x.name: bad})
            if x.low is not None:
                case(f"{x.name} below {x.low}", (q,), **{x.name: x.low - 1})
            if x.high is not None:
                case(f"{x.name} above {x.high}", (q,), **{x.name: x.high + 1})
        elif isinstance(x, Bool):
            for bad in (1, "yes"):
                case(f"{x.name}={bad!r}", (q, "bool"), **{x.name: bad})
        elif isinstance(x, Backend):
            case("an unknown backend", ("backend", "'no-such-backend'"),
                 backend="no-such-backend")
    for b in spec.bad:
        out.append((b.label, b.mutate(call), tuple(b.words)))
    return out


def check_bad(spec: OpSpec, label: str, call: Call, words: tuple, backend) -> None:
    """The call must raise a clear error (``OpArgError``, ``ValueError`` or
    ``TypeError``) whose message holds every one of ``words``."""
    kwargs = {**call.kwargs}
    if "backend" not in kwargs and "backend" in spec._by_name:
        kwargs["backend"] = backend
    try:
        spec.op(**kwargs)
    except (checks.OpArgError, ValueError, TypeError) as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        if missing:
            raise AssertionError(f"{spec.name}[{backend}] {label}: the error does not say "
                                 f"{missing}: {type(e).__name__}: {msg}") from e
        return
    raise AssertionError(f"{spec.name}[{backend}] {label}: accepted; expected an error "
                         f"naming {words[0]}")


# -- compiles and memory ------------------------------------------------------------------

def builds(spec: OpSpec, backend: str) -> int:
    """Compiled specialisations of the spec's kernels on ``backend`` so far."""
    names = {f"{k.fn.__module__}.{k.name}" for k in spec.kernels()}
    return sum(n for (kname, be), n in cache.stats.items() if be == backend and kname in names)


def check_compile_count(spec: OpSpec, call_at, backend: str) -> None:
    """``call_at(rows)`` gives the same call with another number of rows:
    after the first, other row counts (0 and 1 included) build nothing."""
    run(spec, call_at(5), backend)
    first = builds(spec, backend)
    frames = _dynamo_frames()
    for rows in (0, 1, 2, 7):
        run(spec, call_at(rows), backend)
    if builds(spec, backend) != first or _dynamo_frames() != frames:
        raise AssertionError(f"{spec.name}[{backend}]: a new number of rows compiled again "
                             f"({builds(spec, backend) - first} builds, "
                             f"{_dynamo_frames() - frames} torch.compile frames)")


def _dynamo_frames() -> int:
    from torch._dynamo.utils import counters
    return sum(counters["frames"].values())


def _poisoned(t: torch.Tensor, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """``t``'s values in a view inside a larger buffer filled with ``fill``:
    one extra index before and after in every leading dim, 3 before and 5
    after in the last. Returns (view, buffer)."""
    if t.dim() == 0:
        return t.clone(), t.clone()
    shape = [n + 2 for n in t.shape[:-1]] + [t.shape[-1] + 8]
    buf = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    view = buf[tuple(slice(1, 1 + n) for n in t.shape[:-1]) + (slice(3, 3 + t.shape[-1]),)]
    view.copy_(t)
    return view, buf


def check_poison(spec: OpSpec, call: Call, backend: str) -> None:
    """Float inputs inside NaN-filled buffers, ``out=`` (where the op has one)
    inside a buffer of 123.0: outputs still match the reference (a read
    outside a view would bring NaN in) and no cell outside a view changes."""
    a = bound(spec, call, backend)
    ref = spec.reference(a)
    extra = spec.allowance(a, ref) if spec.allowance is not None else (None,) * len(ref)
    changed, bufs = {}, []
    for n in spec._tensors:
        v = getattr(a, n)
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and n != "out":
            view, buf = _poisoned(v, float("nan"))
            changed[n] = view
            bufs.append((n, view, buf, "nan"))
    has_out = any(isinstance(x, Out) for x in spec.args)
    if has_out and getattr(a, "out", None) is None and \
            spec.outputs[0].dtype_of(a).is_floating_point and not spec._inplace_on(a):
        o = spec.outputs[0]
        target = torch.empty(tuple(o.shape(a)), dtype=o.dtype_of(a),
                             device=getattr(a, a._first_tensor).device)
        view, buf = _poisoned(target, 123.0)
        changed["out"] = view
        bufs.append(("out", view, buf, 123.0))
    poisoned = call.with_(**changed)
    outs = run(spec, poisoned, backend)
    what = f"{spec.name}[{backend}] {call.label} (inputs inside NaN-filled buffers)"
    if spec.compare is not None:
        spec.compare(bound(spec, poisoned, backend), outs, ref)
    for i, (o, r, e) in enumerate(zip(outs, ref, extra) if spec.compare is None else ()):
        if o is None:
            continue
        if o.dtype.is_floating_point:
            assert_close(o, r, o.dtype, f"{what}: output `{spec.outputs[i].name}`", extra=e)
        elif not torch.equal(o.cpu(), r.to(o.dtype).cpu()):
            raise AssertionError(f"{what}: output `{spec.outputs[i].name}` differs")
    for n, view, buf, fill in bufs:
        outside = torch.ones(buf.shape, dtype=torch.bool, device=buf.device)
        outside[tuple(slice(1, 1 + s) for s in view.shape[:-1]) +
                (slice(3, 3 + view.shape[-1]),)] = False
        cells = buf[outside]
        ok = cells.isnan().all() if fill == "nan" else (cells == fill).all()
        if not bool(ok):
            raise AssertionError(f"{what}: a write landed outside `{n}`")
