"""hostdev_cpp: KernelForge's C++ lowering on hostdev tensors.

hostdev memory is host memory (``data_ptr()`` is a host address), so the
kernels the ``cpp`` backend generates and builds run on hostdev tensors as
they are, in place; only the device check differs. The default for hostdev
tensors (priority 30, above every built-in), and only for them.

This module is what the ``kernelforge.backends`` entry point loads in every
process that picks a backend: it imports kernelforge only, never the device
(``kf_hostdev``): a hostdev tensor exists only once its owner imported
``kf_hostdev``, which is when this backend has anything to run.
"""
from __future__ import annotations

import os

from kernelforge.backends import cpp

DEVICE = "hostdev"
PRIORITY = 30


class HostdevCppBackend(cpp.CppBackend):
    name = "hostdev_cpp"
    description = "generated C++ on hostdev tensors (the device's memory is host memory)"

    def default_priority(self, device):
        if device.type != DEVICE:
            return None, "hostdev tensors only"
        cxx, why = cpp.compiler()
        if cxx is None:
            return None, why
        return PRIORITY, (f"hostdev memory is host memory: C++ for this CPU runs on it in "
                          f"place, built with {os.path.basename(cxx)}")

    def can_run(self, device):
        if device.type != DEVICE:
            return False, "hostdev tensors only"
        cxx, why = cpp.compiler()
        return (True, f"C++ built with {cxx}, on hostdev memory") if cxx else (False, why)
