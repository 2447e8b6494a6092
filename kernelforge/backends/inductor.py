"""inductor: the torch printer's function compiled by torch.compile.

Runtime-sized axes (rows, tokens) are compiled as dynamic dims, size-
obliviously, so every row count, 0 and 1 included, reuses one compiled graph;
static axes (the hidden size) are literals in the source and part of the cache
key. Scalar parameters (eps, offset) are passed as 0-d tensors, so a new value
is data, not a recompile.
"""
from __future__ import annotations

import logging
import threading

import torch

from .. import cache
from ..lower import torch_printer
from .base import Backend


_log = logging.getLogger("kernelforge.inductor")

#: device types Inductor generates code for in every torch build
_BUILTIN_CODEGEN = ("cpu", "cuda", "xpu", "mps")


def _has_codegen(device_type: str) -> bool:
    """Whether Inductor has a code generator for ``device_type``: the built-in
    ones, or one an out-of-tree device registered
    (torch._inductor.codegen.common.register_backend_for_device). Not cached:
    a plug-in may register one later (the registry caches its choice per
    device until registry.reset())."""
    if device_type in _BUILTIN_CODEGEN:
        return True
    try:
        from torch._inductor.codegen.common import (get_scheduling_for_device,
                                                    init_backend_registration)
        init_backend_registration()
        return get_scheduling_for_device(device_type) is not None
    except Exception:        # an Inductor without this API: assume it has none
        return False


class InductorBackend(Backend):
    name = "inductor"
    description = "torch.compile (Inductor): fused C++/OpenMP on CPU, any torch device"
    collapses_loops = True      # the torch printer runs each seq_for as one pass

    def default_priority(self, device):
        ok, why = self.can_run(device)
        if not ok:
            return None, why
        if device.type == "cuda":
            return 15, "Inductor runs on GPUs, but the Triton lowering is preferred there"
        return 20, f"Inductor compiles for {device.type} tensors"

    def can_run(self, device):
        if not _has_codegen(device.type):
            return False, (f"Inductor has no code generator for {device.type} tensors (an "
                           "out-of-tree device's plug-in registers none)")
        return True, f"torch.compile generates code for {device.type} tensors"

    def source(self, kernel, returns: tuple[str, ...] = (), aliases=()) -> str:
        return torch_printer.print_module(kernel, scalars_as_tensors=True, returns=returns,
                                          aliases=aliases)

    def build(self, kernel, device):
        return self._compile(kernel, ())

    def build_functional(self, kernel, device, returns: tuple[str, ...]):
        """Return the outputs named in ``returns`` from the compiled graph
        instead of writing into caller tensors: Inductor then writes them as
        fresh buffers, which is faster on CPU than copying into a mutated input
        (docs/design.md, "Outputs the caller did not allocate"). None when an
        output cannot be returned."""
        if not all(torch_printer.can_return(kernel, r) for r in returns):
            return None
        return self._compile(kernel, returns)

    def _compile(self, kernel, returns):
        params = [p for p in kernel.params if p.name not in returns]
        tensors = [i for i, p in enumerate(params) if p.kind != "scalar"]
        outputs = [i for i in tensors if params[i].kind == "out"]
        variants: dict[tuple, _Graph] = {}

        def run(*args):
            # In place (an output is the very object of an input): a variant
            # whose stores write into the input, so the graph gets one mutated
            # tensor, never two aliased ones (Inductor 2.13 miscompiles aliased
            # inputs with dynamic sizes).
            aliases = tuple((j, i) for j in outputs for i in tensors
                            if i != j and params[i].kind == "in" and args[i] is args[j])
            if not aliases:
                g = variants.get(())
                if g is None:
                    g = variants[()] = _Graph(kernel, self.source(kernel, returns), returns, set())
                return g(args)
            g = None
            if not _views_overlap(args, [j for j, _ in aliases], tensors):   # (per call)
                g = variants.get(aliases)
                if g is None:
                    names = tuple((params[j].name, params[i].name) for j, i in aliases)
                    src = self.source(kernel, returns, names)
                    g = variants[aliases] = _Graph(kernel, src, returns, {j for j, _ in aliases})
            if g is not None and not g.broken:
                try:
                    return g(args)
                except (torch._dynamo.exc.BackendCompilerFailed,
                        torch._inductor.exc.InductorError) as e:
                    # A compile (or a Dynamo recompile for new strides) failed
                    # before anything ran: use the path below from now on.
                    g.broken = True
                    _log.info("inductor: in-place %s falls back to temporaries: %s",
                              kernel.name, str(e).splitlines()[0])
            # Mutated tensors that are views of one buffer (q and k sliced from
            # a fused qkv), or a graph Inductor 2.13 cannot compile in place:
            # compute into temporaries and copy back (one extra pass).
            tmp = list(args)
            for j, _ in aliases:
                tmp[j] = torch.empty_like(args[j])
            run(*tmp)
            for j, _ in aliases:
                args[j].copy_(tmp[j])
            return None

        return run


def _views_overlap(args, mutated, tensors) -> bool:
    """Whether a mutated tensor shares its storage with another tensor argument
    that is not the very same object."""
    for j in mutated:
        ptr = args[j].untyped_storage().data_ptr()
        for i in tensors:
            if args[i] is not args[j] and args[i].untyped_storage().data_ptr() == ptr:
                return True
    return False


class _Graph:
    """One compiled function: dynamic runtime dims, scalars as 0-d tensors."""

    def __init__(self, kernel, src: str, returns, dropped: set[int]):
        mod = cache.load_module("torch", kernel.name, src)
        # emulate_precision_casts: Inductor otherwise fuses through an explicit
        # f32 -> bf16 -> f32 round trip and skips the rounding the IR asked for.
        options = {"emulate_precision_casts": True}
        if len(dropped) > 1:
            # Two mutated inputs computed from each other (fused add + norm in
            # place) hit a KeyError in Inductor 2.13's CPU loop fusion unless
            # buffers read twice are realised first.
            options["realize_reads_threshold"] = 1
        self.fn = torch.compile(getattr(mod, kernel.name), fullgraph=True, dynamic=False,
                                options=options)
        params = [p for p in kernel.params if p.name not in returns]
        self.keep = [i for i in range(len(params)) if i not in dropped]
        params = [params[i] for i in self.keep]
        dyn = [(i, tuple(d for d, a in enumerate(p.axes) if kernel.axes[a].size is None))
               for i, p in enumerate(params) if p.kind != "scalar"]
        self.dyn = [(i, dims) for i, dims in dyn if dims]
        self.scalars = [(i, p.dtype.torch) for i, p in enumerate(params) if p.kind == "scalar"]
        self.first_call = threading.Lock()
        self.warm = False
        self.broken = False      # its compile failed; the caller uses another path

    def __call__(self, args):
        args = [args[i] for i in self.keep]
        for i, d in self.scalars:          # eps is data: a new value must not recompile
            args[i] = _scalar_tensor(i, args[i], d)
        for i, dims in self.dyn:
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(args[i], d)
        if self.warm:
            return self.fn(*args)
        # The first compile treats runtime sizes size-obliviously: one graph
        # serves every row count (0 and 1 included), and unlike unbacked
        # sizes it still lets Inductor write straight into the outputs.
        # (The switch is process-wide torch config: held only for this call.)
        with self.first_call:
            with _backed_size_oblivious():
                out = self.fn(*args)
            self.warm = True
        return out


_scalars: dict[tuple, torch.Tensor] = {}


def _scalar_tensor(position: int, v, dtype) -> torch.Tensor:
    # one tensor per (argument position, value): eps and offset with equal
    # values must still be distinct objects, or Dynamo guards on the aliasing
    key = (position, v, dtype)
    t = _scalars.get(key)
    if t is None:
        if len(_scalars) > 256:
            _scalars.clear()
        t = _scalars[key] = torch.tensor(v, dtype=dtype)
    return t


def _backed_size_oblivious():
    import torch.fx.experimental._config as fx_config
    return fx_config.patch(backed_size_oblivious=True)
