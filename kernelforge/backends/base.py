"""What a lowering must provide to be a backend. A vendor's backend is one
class like these in its own package, announced through the
``kernelforge.backends`` entry point group (see registry.py)."""
from __future__ import annotations

from typing import Callable

import torch


class Backend:
    #: unique name, used by ``backend=`` and KERNELFORGE_BACKEND
    name: str = ""
    #: one line for ``kernelforge ops`` and ``explain``
    description: str = ""
    #: True when a loop with per-row bounds (``seq_for(start=, stop=)``) runs as
    #: one masked pass over the whole axis, so work grows with the axis, not
    #: with the rows' ranges: ops then launch over pieces whose ranges are
    #: tight (attention: blocks of query rows with their own key span)
    collapses_loops: bool = False
    #: query rows per program for kernels whose block of rows is free to choose
    #: (attention): None lets the op pick for the device
    block_rows: int | None = None
    #: True when a product of 16-bit operands runs much faster than an fp32
    #: one (tensor cores): ops that may round an fp32 operand to 16 bits for
    #: a product then do so by default (attention's ``round_p``)
    half_products_faster: bool = False

    def default_priority(self, device: torch.device) -> tuple[int | None, str]:
        """How much this backend wants to be the default for ``device``
        (higher wins), or None with the reason it is not a default there."""
        raise NotImplementedError

    def can_run(self, device: torch.device) -> tuple[bool, str]:
        """Whether an explicit request for this backend can run on ``device``."""
        raise NotImplementedError

    def supports(self, kernel) -> tuple[bool, str]:
        """Whether this lowering has a rule for everything ``kernel`` uses; a
        kernel it cannot lower runs on the next default backend instead (an
        explicit ``backend=`` gets the reason as an error)."""
        return True, ""

    def schedule_key(self) -> tuple:
        """Knobs that change generated code; part of every cache key."""
        return ()

    def source(self, kernel) -> str:
        """The generated module for a specialised kernel (``kernelforge show``)."""
        raise NotImplementedError

    def build(self, kernel, device: torch.device) -> Callable[..., None]:
        """A callable taking the kernel's arguments in declaration order."""
        raise NotImplementedError
