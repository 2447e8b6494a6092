"""Run a kernel on tensors: pick the backend for their device, find or build
the compiled kernel for this specialisation, call it."""
from __future__ import annotations

import functools
import types
import warnings

import torch

from . import cache, config
from .dynamo_marks import constant_result
from .backends import registry
from .ir import dtypes as dt


def _plan(kdef):
    """Per kernel, once: which args are tensors, where each static or derived
    axis is read (both are part of the specialisation key, so a call whose
    dims disagree with them never reuses a build), and which other dims must
    agree with the dim an axis was read from."""
    plan = kdef.launch_plan
    if plan is None:
        tensors, static, first, same = [], {}, {}, []
        keyed = set(kdef.static) | set(kdef.derived)
        for i, (name, ann) in enumerate(kdef.signature):
            if hasattr(ann, "axes"):
                tensors.append((i, name))
                for d, a in enumerate(ann.axes):
                    if a in keyed and a not in static:
                        static[a] = (i, d)
                    if a in first:
                        same.append((a, first[a], (i, d)))
                    else:
                        first[a] = (i, d)
        plan = kdef.launch_plan = (tensors, tuple(static.items()),
                                   f"{kdef.fn.__module__}.{kdef.name}", _agree(same))
    return plan


def _agree(same: list):
    """One Python expression that is True when every pair of dims named by
    the same axis agrees (one expression, not a per-call loop over the pairs:
    the check runs on every launch; docs/design.md, "Dispatch, caching, custom
    ops"); None when the kernel has no such pair."""
    if not same:
        return None
    terms = " and ".join(f"a[{i}].shape[{d}] == a[{j}].shape[{e}]"
                         for _, (i, d), (j, e) in same)
    fn = eval(f"lambda a: {terms}")       # built from ints only
    fn.pairs = tuple(same)
    return fn


def check_shapes(kdef, args) -> None:
    """Every dim named by the same axis has the same extent; a kernel would
    otherwise read or write past the smaller tensor."""
    _, _, _, agree = _plan(kdef)
    for axis, (i, d), (j, e) in (agree.pairs if agree else ()):
        if args[i].shape[d] != args[j].shape[e]:
            names = kdef.signature
            raise ValueError(
                f"{kdef.name}: `{names[j][0]}` dim {e} is axis {axis}, expected "
                f"{args[i].shape[d]} (dim {d} of `{names[i][0]}`), got {args[j].shape[e]}")


class NewTensor:
    """An output the caller has not allocated: ``launch`` returns it. A
    backend that can produce outputs itself (``build_functional``) allocates
    it inside its compiled code; for the others dispatch allocates it."""
    __slots__ = ("shape", "dtype", "device")

    def __init__(self, shape, dtype: torch.dtype, device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)


def specialization(kdef, args) -> tuple[dict, dict]:
    """(tensor dtypes, static axis sizes) of a call; checks that derived axes
    have the extent their rule gives and that no static axis is empty."""
    tensors, static, _, _ = _plan(kdef)
    dtypes = {name: dt.from_torch(args[i].dtype) for i, name in tensors}
    read = {a: int(args[i].shape[d]) for a, (i, d) in static}
    sizes = {a: v for a, v in read.items() if a in kdef.static}
    names = kdef.signature
    for a, rule in kdef.derived.items():
        if a not in read:
            continue
        want = int(rule(sizes))
        if read[a] != want:
            i, d = dict(static)[a]
            raise ValueError(f"{kdef.name}: `{names[i][0]}` dim {d} is axis {a}, expected "
                             f"{want} (derived from {sizes}), got {read[a]}")
    for a, v in read.items():
        if v == 0:
            i, d = dict(static)[a]
            raise ValueError(f"{kdef.name}: `{names[i][0]}` dim {d} is the static axis {a}, "
                             "expected at least 1, got 0 (an op returns empty outputs "
                             "without launching)")
    return dtypes, sizes


def _check_arity(kdef, args) -> None:
    want = len(kdef.signature)
    if len(args) != want:
        names = ", ".join(n for n, _ in kdef.signature)
        raise TypeError(f"launch({kdef.name}): expected {want} arguments ({names}), "
                        f"got {len(args)}")


def compiled(kdef, args, backend: str | None = None):
    """The callable that would run ``kdef`` on ``args`` (returning the
    tensors for its NewTensor arguments), and the backend decision."""
    tensors, static, qualname, agree = kdef.launch_plan or _plan(kdef)
    if len(args) != len(kdef.signature):
        _check_arity(kdef, args)
    if agree is not None and not agree(args):
        check_shapes(kdef, args)           # raises, naming the dims
    ts = [args[i] for i, _ in tensors]
    device = ts[0].device
    # The hot path of every op: one dict lookup keyed by what the caller
    # controls (the backend argument and variable, device, dtypes, which
    # outputs are new, static sizes). A hit skips backend selection; the
    # entry keeps the schedule it was built for, and registry.register()
    # empties the memo, so a new backend or schedule never reuses it.
    fast = (kdef, backend, config.env_backend(), device.type, device.index,
            tuple([(t.dtype, t.__class__) for t in ts]),
            tuple([args[i].shape[d] for _, (i, d) in static]))
    hit = cache.launchers.get(fast)
    if hit is not None and hit[2] == hit[1].backend.schedule_key():
        return hit[0], hit[1]
    decision = registry.select(device, backend)
    be = decision.backend
    new = tuple([i for i, _ in tensors if isinstance(args[i], NewTensor)])
    # an explicit choice may not fall back (Backend.supports): a key of its own
    explicit = decision.forced
    sched = be.schedule_key()
    key = (kdef, be.name, device.type, tuple([t.dtype for t in ts]),
           tuple([args[i].shape[d] for _, (i, d) in static]), sched, new, explicit)

    def build():
        dtypes, sizes = specialization(kdef, args)
        kernel = kdef.specialize(dtypes, sizes)
        runs_on = be
        ok, why = be.supports(kernel)
        if not ok:
            if explicit:
                raise ValueError(f"backend: {be.name!r} cannot run kernel `{kernel.name}`: {why}")
            runs_on = registry.fallback(device, kernel, be).backend
        outs = [i for i, (_, a) in enumerate(kdef.signature) if getattr(a, "kind", "") == "out"]
        names = [kdef.signature[i][0] for i in new]
        fresh = set(new) == set(outs)
        tried = []
        while True:
            try:
                return _runner(runs_on, kernel, device, new, names, fresh=fresh)
            except Exception as e:
                if explicit:        # backend= or KERNELFORGE_BACKEND: the caller asked for it
                    raise
                tried.append(runs_on)
                nxt = registry.fallback(device, kernel, *tried, reason=f"building it failed "
                                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                warnings.warn(f"kernelforge: the default backend {runs_on.name!r} failed to "
                              f"build `{kernel.name}` ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); running it on "
                              f"{nxt.backend.name!r} instead", RuntimeWarning, stacklevel=2)
                runs_on = nxt.backend

    fn = cache.get_or_build(key, build, (qualname, be.name))
    cache.launchers[fast] = (fn, decision, sched)
    return fn, decision


def _runner(be, kernel, device, new: tuple, new_names: list, fresh: bool = False):
    """``fresh``: every output is allocated here, so none can share memory
    with an input (a backend's ``build`` may offer a ``fresh`` variant of its
    callable that skips that check)."""
    if new:
        fn = be.build_functional(kernel, device, tuple(new_names))
        if fn is not None:
            keep = [i for i in range(len(kernel.params)) if i not in new]
            return lambda *a: fn(*[a[i] for i in keep])
    raw = be.build(kernel, device)
    if not new:
        def run(*a):
            raw(*a)
            return ()
        # graph capture (kernelforge.graph): a backend may bind a call to its
        # arguments once (the cpp backend packs its C argument array)
        bind = getattr(raw, "bind", None)
        if bind is not None:
            run.bind = bind
        return run
    call = getattr(raw, "fresh", raw) if fresh else raw
    empty = torch.empty

    def run_alloc(*a):
        a = list(a)
        outs = []
        for i in new:
            spec = a[i]
            a[i] = t = empty(spec.shape, dtype=spec.dtype, device=spec.device)
            outs.append(t)
        call(*a)
        return tuple(outs)
    return run_alloc


#: the recorder of the running ``kernelforge.graph.capture``, else None
_capture = None


def launch(kdef, *args, backend: str | None = None) -> tuple:
    """Run kernel ``kdef`` with ``args`` in its declaration order; returns the
    outputs given as ``NewTensor`` (in order), allocated by the backend."""
    if torch.compiler.is_compiling():
        return _traced(kdef, args)
    if _capture is not None:
        _check_arity(kdef, args)
        return _capture.launch(kdef, args, backend)
    fn, _ = compiled(kdef, args, backend)
    return fn(*args)


def _traced(kdef, args) -> tuple:
    """Inside a torch.compile trace (config.inline()): run the kernel's torch
    lowering as plain torch ops, so they join the caller's graph. Static axes
    specialise the trace (int() guards on them)."""
    _planned(kdef)                      # outside the trace: no guard on a None plan
    tensors, static, _, _ = kdef.launch_plan
    dtypes = tuple((name, args[i].dtype) for i, name in tensors)
    sizes = tuple((a, int(args[i].shape[d])) for a, (i, d) in static)
    fn = getattr(_LOWERINGS, _torch_lowering(kdef, dtypes, sizes))
    args = list(args)
    outs = []
    for i, _ in tensors:
        spec = args[i]
        if isinstance(spec, NewTensor):
            args[i] = t = torch.empty(spec.shape, dtype=spec.dtype, device=spec.device)
            outs.append(t)
    fn(*args)
    return tuple(outs)


# Objects a trace fetches by a key computed outside it (assume_constant_result):
# module attributes, which Dynamo reads when accessed (a dict would be read
# once, at its first access in the trace, and miss entries added later).
_LOWERINGS = types.ModuleType("kernelforge_traced_lowerings")
_FACTORIES = types.ModuleType("kernelforge_traced_factories")


def kernel_factory(fn):
    """``functools.lru_cache`` for functions that build a KernelDef from
    constant arguments (``attention_kernel(softcap, block_q)``), callable
    inside a torch.compile trace: the trace looks the kernel up by a string
    key instead of tracing the kernel's construction."""
    cached = functools.lru_cache(maxsize=None)(fn)

    @constant_result
    def key_of(*args) -> str:
        key = "k" + cache.digest(f"{fn.__module__}.{fn.__qualname__}{args!r}")[:32]
        setattr(_FACTORIES, key, cached(*args))
        return key

    @functools.wraps(fn)
    def factory(*args):
        if torch.compiler.is_compiling():
            return getattr(_FACTORIES, key_of(*args))
        return cached(*args)

    return factory


@constant_result
def _planned(kdef) -> bool:
    _plan(kdef)
    return True


@constant_result
def _torch_lowering(kdef, dtypes: tuple, sizes: tuple) -> str:
    """Build (outside the trace, while tracing) the torch printer's function
    for a specialisation and return its name in _LOWERINGS; the trace then
    reads it from there (a global it can guard on) and inlines its torch ops."""
    name = "k" + cache.digest(repr((kdef.name, id(kdef), dtypes, sizes)))[:32]
    if not hasattr(_LOWERINGS, name):
        kernel = kdef.specialize({n: dt.from_torch(d) for n, d in dtypes}, dict(sizes))
        setattr(_LOWERINGS, name, registry.backends()["eager"].build(kernel, torch.device("cpu")))
    return name


def source(kdef, args, backend: str) -> str:
    """The generated module ``backend`` would run for these arguments."""
    dtypes, sizes = specialization(kdef, args)
    return registry.backends()[backend].source(kdef.specialize(dtypes, sizes))


__all__ = ["NewTensor", "launch", "compiled", "source", "specialization", "check_shapes"]
