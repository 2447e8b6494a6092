"""Run a kernel on tensors: pick the backend for their device, find or build
the compiled kernel for this specialisation, call it."""
from __future__ import annotations

import torch

from . import cache
from .backends import registry
from .ir import dtypes as dt


def _plan(kdef):
    """Per kernel, once: which args are tensors and where each static axis is read."""
    plan = getattr(kdef, "_launch_plan", None)
    if plan is None:
        tensors, static = [], {}
        for i, (name, ann) in enumerate(kdef.signature):
            if hasattr(ann, "axes"):
                tensors.append((i, name))
                for d, a in enumerate(ann.axes):
                    if a in kdef.static and a not in static:
                        static[a] = (i, d)
        plan = kdef._launch_plan = (tensors, tuple(static.items()),
                                    f"{kdef.fn.__module__}.{kdef.name}")
    return plan


def specialization(kdef, args) -> tuple[dict, dict]:
    tensors, static, _ = _plan(kdef)
    dtypes = {name: dt.from_torch(args[i].dtype) for i, name in tensors}
    sizes = {a: int(args[i].shape[d]) for a, (i, d) in static}
    return dtypes, sizes


def compiled(kdef, args, backend: str | None = None):
    """The callable that would run ``kdef`` on ``args``, and the decision."""
    tensors, static, qualname = _plan(kdef)
    device = args[tensors[0][0]].device
    decision = registry.select(device, backend)
    be = decision.backend
    key = (qualname, be.name, device.type,
           tuple(args[i].dtype for i, _ in tensors),
           tuple(args[i].shape[d] for _, (i, d) in static), be.schedule_key())

    def build():
        dtypes, sizes = specialization(kdef, args)
        return be.build(kdef.specialize(dtypes, sizes), device)

    return cache.get_or_build(key, build), decision


def launch(kdef, *args, backend: str | None = None) -> None:
    """Run kernel ``kdef`` with ``args`` in its declaration order."""
    fn, _ = compiled(kdef, args, backend)
    fn(*args)


def source(kdef, args, backend: str) -> str:
    """The generated module ``backend`` would run for these arguments."""
    dtypes, sizes = specialization(kdef, args)
    return registry.backends()[backend].source(kdef.specialize(dtypes, sizes))


__all__ = ["launch", "compiled", "source", "specialization", "torch"]
