"""``kernelforge.explain``: which lowering an op call would use, and why."""
from __future__ import annotations

import torch

from . import cache, dispatch
from .backends import registry


class Explanation:
    def __init__(self, op: str, device, decision, kernels):
        self.op, self.device, self.decision, self.kernels = op, device, decision, kernels
        self.backend = decision.backend.name

    def __str__(self) -> str:
        lines = [f"op {self.op} on {self.device} tensors", str(self.decision)]
        for name, key, built in self.kernels:
            state = "compiled and cached" if built else "not compiled yet"
            lines.append(f"kernel {name}: specialised for {key} ({state})")
        return "\n".join(lines)

    __repr__ = __str__


def explain(op: str, *args, backend: str | None = None) -> Explanation:
    """Say which backend ``kernelforge.ops.<op>(*args)`` would run and why.

    Args:
        op: an op name, e.g. "rms_norm".
        args: the tensors the op would get, in the kernel's argument order
            for the specialisation key (dtypes, static sizes); only the first
            tensor's device is needed to choose the backend.
        backend: an explicit backend, as the op's ``backend=`` would take.

    Example:
        >>> print(kernelforge.explain("rms_norm", x, w))
    """
    from .ops import KERNELS
    if op not in KERNELS:
        raise ValueError(f"explain: `op` expected one of {sorted(KERNELS)}, got {op!r}")
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    decision = registry.select(device, backend)
    kernels = []
    for kdef in KERNELS[op]:
        fits = all(i < len(args) and isinstance(args[i], torch.Tensor)
                   and args[i].dim() == len(a.axes)
                   for i, (_, a) in enumerate(kdef.signature) if hasattr(a, "axes"))
        if fits:   # (ops with several kernels: describe those these arguments fit)
            dtypes, sizes = dispatch.specialization(kdef, args)
            built = cache.built(kdef, decision.backend.name)
            spec = ", ".join(f"{n}={d}" for n, d in dtypes.items()) + "".join(
                f", {a}={v}" for a, v in sizes.items())
            kernels.append((kdef.name, spec, built))
    return Explanation(op, device, decision, kernels)
