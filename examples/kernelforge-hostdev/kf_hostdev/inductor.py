"""Inductor (``torch.compile``) on hostdev: Inductor's CPU code generator.

hostdev memory is host memory, so the C++/OpenMP kernels Inductor writes
for the CPU, which work on raw data pointers, run on hostdev tensors as they
are. :func:`register` tells torch so:

- the CPU scheduling (``CppScheduling``: C++ kernels) for hostdev, with a
  Python wrapper that calls those kernels on hostdev buffers as it does on
  CPU ones (torch's own wrapper raises ``device hostdev nyi`` for a C++
  kernel on any device but cpu and mps), and the CPU's device op overrides
  (no streams, no device guard: one device, every kernel synchronous);
- a Dynamo device interface (the CPU's, with hostdev's synchronize and
  memory statistics, and no Triton);
- two places where Inductor decides by ``device.type == "cpu"`` what the
  CPU code generator needs, widened to hostdev: the scheduler's
  ``BaseSchedulerNode.is_cpu()`` (it skips Triton-only loop transformations
  for CPU nodes) and ``get_current_backend()`` (it names "triton" for every
  device type it does not know). Without them fusing a reduction with a
  pointwise, or any bfloat16 kernel, fails at compile time.

Buffers the compiled code allocates are made by ``empty_strided(...,
device='hostdev')``, the device's own allocator; ops Inductor does not
generate code for (extern kernels, fallbacks) run through the device's aten
kernels as in eager mode.

Not registered: a C++ wrapper (``cpp_wrapper=True``, AOTInductor), so that
option stops at "Device hostdev not supported" (torch/_inductor/graph.py,
init_wrapper_code). ``CppWrapperCpu`` with two overrides (``codegen_device``:
``cached_torch_device_type_privateuse1``; ``add_device_include``: the cpu
header) runs graphs made of Inductor's own kernels, but it calls every extern
or fallback aten op (mm, topk, sort...) through a C shim named for the
device, ``aoti_torch_hostdev_<op>`` (cpp_wrapper_cpu.py,
get_c_shim_func_name), and torch ships those for cpu, cuda, mps and xpu
only: such graphs fail to compile their C++.

``import kf_hostdev.inductor`` registers all this (``register()`` again is a
no-op); ``import kf_hostdev`` alone does not, as importing Inductor's code
generation takes seconds. KernelForge's ``inductor`` backend then runs on
hostdev tensors (``--import kf_hostdev.inductor`` for conformance), never by
default: ``hostdev_cpp`` stays the default there.
"""
from __future__ import annotations

import sys
import threading

import torch

NAME = "hostdev"

_lock = threading.Lock()
_registered = False


def _wrapper_classes():
    """The wrapper code generators for hostdev (classes made on first use:
    importing Inductor's code generation is slow and not needed before)."""
    from torch._inductor.codegen.wrapper import (PythonWrapperCodegen,
                                                 SubgraphPythonWrapperCodegen)

    class _CppKernelCalls:
        # PythonWrapperCodegen._generate_kernel_call_helper writes a direct
        # call for a C++ kernel (triton=False) only on cpu and mps, and raises
        # "device ... nyi" for every other non-GPU device. A hostdev C++
        # kernel is called exactly like a CPU one: data pointers, no stream.
        def _generate_kernel_call_helper(self, kernel_name, call_args, *, device=None,
                                         triton=True, **kwargs):
            from torch._inductor.virtualized import V
            device = device or V.graph.get_current_device_or_throw()
            if not triton and device.type == NAME:
                self.writeline(self.wrap_kernel_call(kernel_name, call_args))
                return
            super()._generate_kernel_call_helper(kernel_name, call_args, device=device,
                                                 triton=triton, **kwargs)

    class HostdevSubgraphWrapperCodegen(_CppKernelCalls, SubgraphPythonWrapperCodegen):
        pass

    class HostdevWrapperCodegen(_CppKernelCalls, PythonWrapperCodegen):
        @staticmethod
        def create(is_subgraph, subgraph_name, parent_wrapper, partition_signatures=None):
            if is_subgraph:
                return HostdevSubgraphWrapperCodegen(subgraph_name, parent_wrapper,
                                                     partition_signatures)
            return HostdevWrapperCodegen()

    return HostdevWrapperCodegen


def _device_interface():
    """Dynamo's device interface for hostdev: the CPU's (available, device 0,
    no streams, synchronous), with hostdev's own synchronize and memory
    statistics, and no Triton (Inductor writes C++ for hostdev)."""
    from torch._dynamo.device_interface import CpuInterface

    class HostdevInterface(CpuInterface):
        @staticmethod
        def device_count() -> int:
            return torch.hostdev.device_count()

        @staticmethod
        def current_device() -> int:
            return torch.hostdev.current_device()

        @staticmethod
        def set_device(device) -> None:
            torch.hostdev.set_device(device)

        @staticmethod
        def exchange_device(device: int) -> int:
            torch.hostdev.set_device(device)
            return 0

        @staticmethod
        def maybe_exchange_device(device: int) -> int:
            return 0

        @staticmethod
        def synchronize(device=None) -> None:
            torch.hostdev.synchronize(device)

        @staticmethod
        def memory_allocated(device=None) -> int:
            return torch.hostdev.memory_allocated(device)

        @staticmethod
        def is_triton_capable(device=None) -> bool:
            return False

        @staticmethod
        def raise_if_triton_unavailable(device=None) -> None:
            raise RuntimeError("hostdev: Inductor generates C++ for hostdev tensors, not Triton")

    HostdevInterface.device = staticmethod(lambda device: torch.hostdev.device(device))
    return HostdevInterface


def _scheduler_treats_hostdev_as_cpu() -> None:
    """Inductor's scheduler skips three Triton-only loop transformations for
    CPU nodes (BaseSchedulerNode.is_cpu(): loop index inversion, loop
    reordering and reindexing a pointwise to a reduction's groups, in
    torch/_inductor/scheduler.py), and so must it for hostdev nodes, which
    the CPU code generator writes too: otherwise fusing a reduction with a
    pointwise fails in _try_reindex_pointwise_for_reduction ("TypeError:
    can't multiply sequence by non-int of type 'tuple'": the C++ scheduling's
    node groups are not SIMD ones)."""
    from torch._inductor.scheduler import BaseSchedulerNode
    cpu = BaseSchedulerNode.is_cpu
    if getattr(cpu, "_kf_hostdev", False):
        return

    def is_cpu(self) -> bool:
        if cpu(self):
            return True
        device = self.get_device()
        return device is not None and device.type == NAME

    is_cpu._kf_hostdev = True
    is_cpu.__doc__ = cpu.__doc__
    BaseSchedulerNode.is_cpu = is_cpu


def _backend_name_is_cpp() -> None:
    """torch._inductor.utils.get_current_backend() names the code generator
    of a device type: cpu, mps, xpu and tpu by name, "every other device" by
    config.cuda_backend ("triton"). Code generation asks it what it writes
    (dtype propagation upcasts bfloat16/float16 loads to float32 for
    "triton"; the common CSE handles ``masked`` per backend), so for hostdev
    it must say "cpp": otherwise a bfloat16 kernel fails in the C++ code
    generator (cpp.py get_to_dtype_expr: "KeyError: None"). The function is
    imported by name into torch._inductor.codegen.common and
    torch._inductor.scheduler: those names are replaced too."""
    import torch._inductor.codegen.common as common
    import torch._inductor.scheduler as scheduler
    import torch._inductor.utils as utils
    original = utils.get_current_backend
    if getattr(original, "_kf_hostdev", False):
        return

    def get_current_backend(device_type=None):
        if not device_type:
            from torch._inductor.virtualized import V
            device_type = V.graph.get_current_device_or_throw().type
        if device_type == NAME:
            return "cpp"        # the scheduling registered for hostdev
        return original(device_type)

    get_current_backend._kf_hostdev = True
    get_current_backend.__doc__ = original.__doc__
    for module in (utils, common, scheduler):
        if getattr(module, "get_current_backend", None) is original:
            module.get_current_backend = get_current_backend


def register() -> None:
    """Register Inductor's CPU code generation and a Dynamo device interface
    for hostdev tensors (idempotent; importing this module calls it)."""
    global _registered
    with _lock:
        if _registered:
            return
        if torch._C._get_privateuse1_backend_name() != NAME:
            raise RuntimeError("kf_hostdev.inductor.register(): the hostdev device is not "
                               "registered in this process (import kf_hostdev first)")
        from torch._dynamo.device_interface import register_interface_for_device
        from torch._inductor.codegen.common import (register_backend_for_device,
                                                    register_device_op_overrides)
        from torch._inductor.codegen.cpp import CppScheduling
        from torch._inductor.codegen.cpu_device_op_overrides import CpuDeviceOpOverrides

        register_interface_for_device(NAME, _device_interface())
        # no streams, no device guard, nothing to synchronise: the CPU's
        register_device_op_overrides(NAME, CpuDeviceOpOverrides())
        # no C++ wrapper (cpp_wrapper=True): see the module's docstring
        register_backend_for_device(NAME, CppScheduling, _wrapper_classes())
        _scheduler_treats_hostdev_as_cpu()
        _backend_name_is_cpp()
        _registered = True
    # KernelForge's registry caches each device's default backend: its
    # inductor backend can run on hostdev from now on
    registry = sys.modules.get("kernelforge.backends.registry")
    if registry is not None:
        registry.reset()


# importing kf_hostdev.inductor imported kf_hostdev first: the device exists
register()
