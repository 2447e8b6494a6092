"""cpp: generated C++ (OpenMP over programs, loops kept), built by the host
C++ compiler into a shared library and called through ctypes.

The CPU lowering that keeps a kernel's loops: where Inductor runs a seq_for
as one masked pass over the whole axis (``collapses_loops``), this one walks
it chunk by chunk with the carried values in registers and L1, as the Triton
lowering does on a GPU. Built libraries are cached on disk by the SHA-256 of
their source and compiler command, so a specialisation compiles once per
machine (about 1-3 s with g++ -O3).
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sysconfig
import tempfile

import torch

from .. import cache, config
from ..lower import cpp_printer
from .base import Backend


@functools.lru_cache(maxsize=None)
def compiler() -> tuple[str | None, str]:
    """The C++ compiler (CXX, else c++ / g++ / clang++ on PATH) and why not, if none."""
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand), ""
    return None, "no C++ compiler found (set CXX or install g++)"


def flags() -> list[str]:
    """-O3 for this CPU (its vector width); no -ffast-math: masks rely on inf and
    NaN; no FMA contraction (each op rounds, as in torch, so elementwise
    kernels match eager bit for bit; ``kf_dot`` opts back in)."""
    arch = "-mcpu=native" if "arm" in (sysconfig.get_platform() or "") or \
        os.uname().machine in ("aarch64", "arm64") else "-march=native"
    return ["-O3", arch, "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
            "-std=c++17",
            "-shared", "-fPIC", "-w"]


def build_library(name: str, source: str) -> ctypes.CDLL:
    """Compile ``source`` (cached on disk by source and command) and load it."""
    cxx, why = compiler()
    if cxx is None:
        raise RuntimeError(f"kernelforge cpp backend: {why}")
    cmd = [cxx, *flags()]
    key = cache.digest(source + "\n" + " ".join(cmd))[:20]
    d = os.path.join(config.cache_dir(), "cpp")
    os.makedirs(d, exist_ok=True)
    lib = os.path.join(d, f"{name}_{key}.so")
    if not os.path.exists(lib):
        src = os.path.join(d, f"{name}_{key}.cpp")     # kept beside it: readable, debuggable
        fd, tmp_src = tempfile.mkstemp(dir=d, suffix=".cpp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".so")
        os.close(fd)
        try:
            # each process compiles its own copy: another one may be writing `src`
            res = subprocess.run([*cmd, tmp_src, "-o", tmp], capture_output=True, text=True)
            if res.returncode:
                os.replace(tmp_src, src)       # kept, to read next to the error
                raise RuntimeError(f"kernelforge cpp backend: compiling {src} failed:\n"
                                   f"{res.stderr[-4000:]}")
            os.replace(tmp_src, src)
            os.replace(tmp, lib)      # atomic: a concurrent reader sees all or nothing
        finally:
            for leftover in (tmp_src, tmp):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    return ctypes.CDLL(lib)


_P = ctypes.POINTER
_zeros: dict[int, torch.Tensor] = {}


def _scratch(t: torch.Tensor) -> int:
    """Zeros for an empty tensor: a masked lane of a load reads a clamped
    address (0 in an empty dim, up to the last index of the others) before
    selecting 0, so it must point at readable memory."""
    span = 1 + sum(max(n - 1, 0) * st for n, st in zip(t.shape, t.stride()))
    nbytes = max(span * t.element_size(), 64)
    buf = _zeros.get(nbytes)
    if buf is None:
        buf = _zeros[nbytes] = torch.zeros(nbytes, dtype=torch.uint8)
    return buf.data_ptr()


class CppBackend(Backend):
    name = "cpp"
    description = "generated C++ compiled by the host compiler (OpenMP; CPU, loops kept)"
    # 128 query rows x 128-key chunks: prefill S=1024 D=64 ran in 17.8 ms here
    # against 21.5 ms at 64 rows and 30 ms at 32 (1 thread, same run)
    block_rows = 128

    def schedule(self) -> cpp_printer.CppSchedule:
        return cpp_printer.CppSchedule()

    def schedule_key(self) -> tuple:
        s = self.schedule()
        return (s.max_block, s.dynamic_block, s.tail_block)

    def default_priority(self, device):
        if device.type != "cpu":
            return None, "generates host code: CPU tensors only"
        cxx, why = compiler()
        if cxx is None:
            return None, why
        # above Inductor (20): per call 2x less overhead on small ops, attention
        # 2.3x (prefill) and 14x (paged decode) faster, large memory-bound ops
        # about even (docs/benchmarks.md)
        return 25, f"C++ for this CPU, built with {os.path.basename(cxx)}"

    def can_run(self, device):
        if device.type != "cpu":
            return False, "generates host code: CPU tensors only"
        cxx, why = compiler()
        return (True, f"C++ built with {cxx}") if cxx else (False, why)

    def supports(self, kernel):
        missing = cpp_printer.unsupported(kernel)
        if missing:
            return False, f"the C++ lowering has no rule for {', '.join(missing)} yet"
        return True, ""

    def source(self, kernel) -> str:
        return cpp_printer.print_module(kernel, self.schedule())

    def _load(self, kernel, restrict: bool):
        src = cpp_printer.print_module(kernel, self.schedule(), restrict=restrict)
        fn = getattr(build_library(kernel.name, src), kernel.name)
        fn.restype = None
        fn.argtypes = [_P(ctypes.c_int64), _P(ctypes.c_double), ctypes.c_int64]
        return fn

    def build(self, kernel, device):
        fn = self._load(kernel, restrict=True)
        overlapping = []          # built on the first call whose outputs share memory

        def aliased():
            if not overlapping:
                overlapping.append(self._load(kernel, restrict=False))
            return overlapping[0]

        lay = cpp_printer.layout(kernel)
        tensors, sizes = lay["tensors"], lay["sizes"]
        floats, ints = lay["floats"], lay["ints"]
        outs = {i for i in tensors if kernel.params[i].kind == "out"}
        ins = [i for i in tensors if i not in outs]
        n_ptr = len(tensors)
        n_str = sum(len(kernel.params[i].axes) - 1 for i in tensors)
        ArgA = ctypes.c_int64 * max(n_ptr + n_str + len(sizes) + len(ints), 1)
        FA = ctypes.c_double * max(len(floats), 1)
        no_floats = FA()
        size_dims = [(tensors[j], d) for j, d in sizes]     # (argument, dim) per runtime size
        threads = torch.get_num_threads

        def pack(args):
            """The int64 argument array (and the contiguous copies it points
            into, kept alive by the caller until the call returns)."""
            ptrs, strides, back = [], [], None
            for i in tensors:
                t = args[i]
                st = t.stride()
                if st and st[-1] != 1 and t.shape[-1] > 1:
                    # the generated code assumes a contiguous last dim
                    c = t.contiguous()
                    back = (back or []) + [(t if i in outs else None, c)]
                    t, st = c, c.stride()
                strides += st[:-1]
                ptrs.append(t.data_ptr() if t.numel() else _scratch(t))
            ptrs += strides
            ptrs += [args[i].shape[d] for i, d in size_dims]
            if ints:
                ptrs += [int(args[i]) for i in ints]
            return ArgA(*ptrs), (FA(*[float(args[i]) for i in floats]) if floats
                                 else no_floats), back

        def call(c_fn, args):
            arr, farr, back = pack(args)
            c_fn(arr, farr, threads())
            for t, c in back or ():
                if t is not None:
                    t.copy_(c)          # an output that was copied to be contiguous

        def chosen(args):
            """The restrict build, or the aliasing one when an output shares
            an input's storage."""
            if outs:
                mem = {args[i].untyped_storage().data_ptr() for i in outs}
                if any(args[i].untyped_storage().data_ptr() in mem for i in ins):
                    return aliased()
            return fn

        def run(*args):
            # the hot path of every op on CPU: one int64 array per call
            call(chosen(args), args)

        def fresh(*args):
            # dispatch allocated every output: none can share an input's memory
            call(fn, args)

        def bind(*args):
            """A no-argument call of this kernel on ``args`` (kernelforge.graph):
            the argument array packed and the aliasing decided once, here."""
            arr, farr, back = pack(args)
            if back:            # strided last dims are copied per call: no shortcut
                return functools.partial(run, *args)
            c_fn = chosen(args)

            def bound():
                c_fn(arr, farr, threads())
            bound.keep = args           # the tensors the array points into stay alive
            bound.kernel = kernel.name  # for profiles of a replay
            return bound

        run.fresh = fresh
        run.bind = bind
        return run
