"""The backend contract: everything a lowering may provide to be a backend.

A backend is one subclass of ``Backend`` in its own package, announced in
that package's pyproject through the ``kernelforge.backends`` entry point
group (the built-ins are announced the same way, in kernelforge's own
pyproject). backends/README.md walks through writing one; ``kernelforge
conformance --backend NAME`` gives it a verdict.

Required: ``name``, ``default_priority``, ``can_run``, ``source``, ``build``.
Everything else has a default that is right for a backend that compiles a
specialised kernel into a callable and runs it on tensors it is given.

The callable ``build`` returns takes the kernel's arguments in declaration
order (tensors, then scalars as Python numbers) and writes the outputs in
place. It may carry two optional attributes, read by dispatch:

- ``fresh``: the same call for when dispatch allocated every output itself,
  so no output can share memory with an input (skips an aliasing check);
- ``bind(*args) -> callable``: a no-argument call of the kernel on these
  very tensors, for ``kernelforge.graph`` capture and replay (pack the
  arguments once instead of per call).
"""
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

    # -- where it runs ------------------------------------------------------------
    def default_priority(self, device: torch.device) -> tuple[int | None, str]:
        """How much this backend wants to be the default for ``device``
        (higher wins; the built-ins use 10 eager, 20 inductor, 25 cpp, 30
        triton on GPUs), or None with the reason it is not a default there."""
        raise NotImplementedError

    def can_run(self, device: torch.device) -> tuple[bool, str]:
        """Whether an explicit request for this backend can run on ``device``."""
        raise NotImplementedError

    def supports(self, kernel) -> tuple[bool, str]:
        """Whether this lowering has a rule for everything ``kernel`` uses; a
        kernel it cannot lower runs on the next default backend instead (an
        explicit ``backend=`` gets the reason as an error)."""
        return True, ""

    # -- what it generates ----------------------------------------------------------
    def schedule_key(self) -> tuple:
        """Knobs that change generated code (block sizes from the environment);
        part of every cache key, so a new value never reuses an old build."""
        return ()

    def source(self, kernel) -> str:
        """The generated module for a specialised kernel (``kernelforge show``)."""
        raise NotImplementedError

    # -- running it -------------------------------------------------------------------
    def build(self, kernel, device: torch.device) -> Callable[..., None]:
        """Compile a specialised kernel; a callable taking the kernel's
        arguments in declaration order (see the module docstring for its
        optional ``fresh`` and ``bind``). Compile here, not on the first
        call: an exception raised here by a backend chosen by default makes
        dispatch warn and fall back to the next backend."""
        raise NotImplementedError

    def build_functional(self, kernel, device: torch.device,
                         returns: tuple[str, ...]) -> Callable[..., tuple] | None:
        """Optional: a callable that allocates the outputs named in
        ``returns`` itself and returns them (in order), taking the other
        arguments. None (the default) lets dispatch allocate them and call
        ``build``'s callable; Inductor writes fresh buffers faster than it
        copies into given ones, so it provides this."""
        return None
