"""eager: the torch printer's function, run op by op. The reference lowering
and the fallback on every device."""
from __future__ import annotations

from .. import cache
from ..lower import torch_printer
from .base import Backend


class EagerBackend(Backend):
    name = "eager"
    description = "plain eager torch (reference; runs wherever torch does)"
    collapses_loops = True      # the torch printer runs each seq_for as one pass

    def default_priority(self, device):
        return 10, "eager torch runs on every device"

    def can_run(self, device):
        return True, "eager torch runs on every device"

    def source(self, kernel) -> str:
        return torch_printer.print_module(kernel)

    def build(self, kernel, device):
        mod = cache.load_module("torch", kernel.name, self.source(kernel))
        return getattr(mod, kernel.name)
