"""inductor: the torch printer's function compiled by torch.compile.

Runtime-sized axes (rows, tokens) are compiled as unbacked dynamic dims, so
every row count, 0 and 1 included, reuses one compiled graph; static axes
(the hidden size) are literals in the source and part of the cache key.
"""
from __future__ import annotations

import torch

from .. import cache
from ..lower import torch_printer
from .base import Backend


class InductorBackend(Backend):
    name = "inductor"
    description = "torch.compile (Inductor): fused C++/OpenMP on CPU, any torch device"

    def default_priority(self, device):
        if device.type == "cuda":
            return 15, "Inductor runs on GPUs, but the Triton lowering is preferred there"
        return 20, f"Inductor compiles for {device.type} tensors"

    def can_run(self, device):
        return True, "torch.compile supports every device type torch has a backend for"

    def source(self, kernel) -> str:
        return torch_printer.print_module(kernel)

    def build(self, kernel, device):
        mod = cache.load_module("torch", kernel.name, self.source(kernel))
        # emulate_precision_casts: Inductor otherwise fuses through an explicit
        # f32 -> bf16 -> f32 round trip and skips the rounding the IR asked for.
        fn = torch.compile(getattr(mod, kernel.name), fullgraph=True, dynamic=False,
                           options={"emulate_precision_casts": True})
        dyn = [(i, tuple(d for d, a in enumerate(p.axes) if kernel.axes[a].size is None))
               for i, p in enumerate(kernel.params) if p.kind != "scalar"]
        dyn = [(i, dims) for i, dims in dyn if dims]
        # Unbacked: no 0/1 specialisation, so 0, 1 or 4096 rows share one graph.
        from torch._dynamo.decorators import mark_unbacked as mark

        def run(*args):
            for i, dims in dyn:
                for d in dims:
                    mark(args[i], d)
            return fn(*args)

        return run
