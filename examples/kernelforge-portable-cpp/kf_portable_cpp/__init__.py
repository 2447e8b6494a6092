"""portable_cpp: KernelForge's C++ lowering, compiled for a baseline
instruction set instead of this machine's (``-march=native``).

What a vendor plug-in looks like when it reuses a lowering: one Backend
subclass that changes how the generated code is built, announced through
the ``kernelforge.backends`` entry point in this package's pyproject. The
libraries it builds run on any x86-64-v2 CPU (or any ARMv8-A one), so they
can be shipped prebuilt, at the cost of the wider vector units. It is never
a default: ask for it with ``backend="portable_cpp"`` or
``KERNELFORGE_BACKEND=portable_cpp``.
"""
import os

from kernelforge.backends import cpp


class PortableCppBackend(cpp.CppBackend):
    name = "portable_cpp"
    description = "the C++ lowering built for a baseline CPU (x86-64-v2 / armv8-a), shippable"

    def compile_flags(self) -> list[str]:
        arm = os.uname().machine in ("aarch64", "arm64")
        base = "-march=armv8-a" if arm else "-march=x86-64-v2"
        return [base if f.startswith(("-march=", "-mcpu=")) else f for f in cpp.flags()]

    def default_priority(self, device):
        return None, "a plug-in for portable builds: request it with backend='portable_cpp'"
