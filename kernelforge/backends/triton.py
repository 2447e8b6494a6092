"""triton: generated Triton kernels. Default on CUDA and ROCm GPUs; on CPU
tensors the same module runs under the Triton interpreter (for tests), and
``kernelforge aot-check`` compiles it for GPU targets without a GPU."""
from __future__ import annotations

import contextlib
import functools

import torch

from .. import cache, config
from ..lower import triton_printer
from .base import Backend


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # a broken install must not break import kernelforge
        return f"{type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_compat() -> None:
    """Triton 3.6's interpreter keeps scalar kernel arguments as 1-element
    arrays and converts them with ``int(array)``, which NumPy 2 rejects, so
    any loop bounded by a runtime size (``tl.range(0, N, ...)``) fails to
    run under the interpreter. Take the single element explicitly."""
    import triton.runtime.interpreter as interp
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


@contextlib.contextmanager
def _interpret(on: bool):
    from triton import knobs
    old = knobs.runtime.interpret
    knobs.runtime.interpret = on   # read by @triton.jit when the module is executed
    try:
        yield
    finally:
        knobs.runtime.interpret = old


class TritonBackend(Backend):
    name = "triton"
    description = "generated Triton kernels (GPUs; Triton interpreter on CPU tensors)"
    half_products_faster = True     # bf16/fp16 tensor-core products

    def schedule(self) -> triton_printer.TritonSchedule:
        return triton_printer.TritonSchedule(max_block=config.triton_max_block())

    def schedule_key(self) -> tuple:
        s = self.schedule()
        return (s.max_block, s.dynamic_block)

    def default_priority(self, device):
        if device.type != "cuda":       # decided without importing triton (~0.2 s)
            return None, (f"Triton has no native {device.type} target here; the interpreter "
                          "runs CPU tensors for testing (pass backend='triton')")
        err = triton_import_error()
        if err:
            return None, f"triton is not importable ({err})"
        if device.type == "cuda":
            kind = "ROCm" if torch.version.hip else "CUDA"
            return 30, f"Triton compiles native kernels for this {kind} GPU"
        return None, (f"Triton has no native {device.type} target here; the interpreter runs "
                      "CPU tensors for testing (pass backend='triton')")

    def can_run(self, device):
        err = triton_import_error()
        if err:
            return False, f"triton is not importable ({err})"
        if device.type in ("cuda", "cpu"):
            return True, ("native GPU kernels" if device.type == "cuda"
                          else "Triton interpreter on CPU tensors (slow; for testing)")
        return False, f"no Triton driver for {device.type} tensors"

    def source(self, kernel) -> str:
        return triton_printer.print_module(kernel, self.schedule())

    def load(self, kernel, interpret: bool):
        return cache.load_module("triton", kernel.name, self.source(kernel),
                                 before_exec=lambda: _interpret(interpret))

    def build(self, kernel, device):
        interpret = device.type == "cpu"
        if interpret:
            _interpreter_compat()
        launch = self.load(kernel, interpret=interpret).launch
        if device.type != "cuda":
            return launch
        first = next(i for i, p in enumerate(kernel.params) if p.kind != "scalar")

        def on_device(*args):
            # Triton launches on the current device: make it the tensors' one
            index = args[first].device.index
            if index is None or index == torch.cuda.current_device():
                return launch(*args)
            with torch.cuda.device(index):
                return launch(*args)

        return on_device
