"""KernelForge: LLM inference ops written once in a small kernel IR and
lowered to Triton, torch.compile/Inductor and eager torch.

    import kernelforge
    y = kernelforge.ops.rms_norm(x, w, 1e-6)          # backend chosen per device
    print(kernelforge.explain("rms_norm", x, w))      # which lowering, and why
    torch.ops.kernelforge.rms_norm(x, w, 1e-6, 0.0, None)   # inside torch.compile graphs
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers torch.ops.kernelforge.*)
from . import rope  # noqa: E402,F401  (cos/sin cache builders)
from . import graph  # noqa: E402,F401  (capture and replay: kernelforge.graph.capture)
from .explain import explain  # noqa: E402,F401
from .dispatch import launch  # noqa: E402,F401
