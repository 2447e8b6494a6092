"""cpp: generated C++ (OpenMP over programs, loops kept), built by the host
C++ compiler into a shared library and called through ctypes.

The CPU lowering that keeps a kernel's loops: where Inductor runs a seq_for
as one masked pass over the whole axis (``collapses_loops``), this one walks
it chunk by chunk with the carried values in registers and L1, as the Triton
lowering does on a GPU. Built libraries are cached on disk, keyed by the
SHA-256 of their source, compiler command, compiler identity and this CPU's
instruction set, so a specialisation compiles once per machine (seconds
with g++ -O3); each load checks the entry's own SHA-256 before loading a
private copy of it (see build_library).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import itertools
import os
import re
import shutil
import socket
import stat
import subprocess
import sysconfig
import tempfile
import time
import warnings

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


# The library cache (in cache.dirs("cpp")). An entry ``{name}_{key}.so`` is
# the library's bytes followed by _SO_TAG and the hex SHA-256 of the key and
# those bytes: truncated, changed, swapped-in or planted files fail the check
# and are rebuilt, never loaded. The key covers the source, the command, the
# compiler's identity and the instruction set that -march=native means here.
_SO_TAG = b"\0kernelforge-sha256 "
_TAG_LEN = len(_SO_TAG) + 64
_MAX_ENTRY = 1 << 30                 # larger is not a library this lowering built
_WORK_PREFIX = ".build."             # a compile's private directory: .build.{host}.{pid}.*
_STALE_S = 3600                      # a work directory this old is abandoned, whoever made it
_loaded: dict[str, ctypes.CDLL] = {}  # full key -> library, so a process loads each once
_copies = itertools.count()          # unique names for private copies (dlopen matches by name)


@functools.lru_cache(maxsize=None)
def compiler_id() -> str:
    """The compiler's path (and what it resolves to) and its --version output:
    a changed or different compiler gets new cache entries. Once per process."""
    cxx, _ = compiler()
    real = os.path.realpath(cxx)
    why = ""
    for _ in range(2):                   # once more after a transient failure (EAGAIN)
        try:
            res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
            if res.returncode == 0 and res.stdout.strip():
                return f"{cxx} -> {real}\n{res.stdout.strip()}"
            why = f"exit status {res.returncode}"
        except (OSError, subprocess.SubprocessError) as e:
            why = str(e)
    try:
        st = os.stat(real)
        ident = f"size {st.st_size}, mtime {st.st_mtime_ns}"
    except OSError as e:
        ident = f"unknown ({e})"
    warnings.warn(f"kernelforge cpp backend: `{cxx} --version` failed ({why}); the library "
                  f"cache is keyed by the compiler file's {ident} instead", RuntimeWarning)
    return f"{cxx} -> {real}\n{ident}"


_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "flags",      # x86
               "CPU implementer", "CPU architecture", "CPU variant", "CPU part",
               "Features")                                                   # arm


@functools.lru_cache(maxsize=None)
def isa_id() -> str:
    """What -march=native resolves to on this machine: the CPU's identity and
    feature flags from /proc/cpuinfo's first processor (what the compiler
    reads through cpuid/hwcaps), or where there is none, the compiler's own
    answer (one more compiler run). Once per process."""
    text = ""
    try:
        with open("/proc/cpuinfo", "rb") as f:    # the first block only: large
            raw = b""                             # machines list hundreds of CPUs
            while b"\n\n" not in raw:
                chunk = f.read(8192)
                if not chunk:
                    break
                raw += chunk
        for line in raw.split(b"\n\n", 1)[0].decode(errors="replace").splitlines():
            k, _, v = line.partition(":")
            if k.strip() in _CPU_FIELDS:
                text += f"{k.strip()}: {' '.join(v.split())}\n"
    except OSError:
        pass
    if not text:
        cxx, _ = compiler()
        try:
            text = subprocess.run([cxx, flags()[1], "-Q", "--help=target"], capture_output=True,
                                  text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            text = f"unknown ({e})"
    return f"{os.uname().machine}\n{text}"


def entry_key(name: str, source: str, cmd_flags: list[str] | None = None) -> tuple[str, str]:
    """(file stem, full key) of the cache entry for ``source`` built with
    ``cmd_flags`` (default ``flags()``)."""
    cxx, _ = compiler()
    fl = flags() if cmd_flags is None else cmd_flags
    key = cache.digest("\n".join((source, " ".join([cxx, *fl]), compiler_id(), isa_id())))
    return f"{name}_{key[:20]}", key


def _tag(key: str, body: bytes) -> bytes:
    return _SO_TAG + hashlib.sha256(key.encode() + b"\0" + body).hexdigest().encode()


def build_library(name: str, source: str, cmd_flags: list[str] | None = None) -> ctypes.CDLL:
    """Compile ``source`` with ``cmd_flags`` (default ``flags()``), or reuse its
    verified cache entry, and load it."""
    cxx, why = compiler()
    if cxx is None:
        raise RuntimeError(f"kernelforge cpp backend: {why}")
    cmd_flags = flags() if cmd_flags is None else cmd_flags
    stem, key = entry_key(name, source, cmd_flags)
    lib = _loaded.get(key)
    if lib is not None:
        return lib
    for d in cache.dirs("cpp"):
        body = _read_verified(os.path.join(d, stem + ".so"), key)
        if body is not None:
            try:
                lib = _load_copy(body, stem)
                break
            except OSError as e:     # e.g. a library it links against is gone
                warnings.warn(f"kernelforge cpp backend: cache entry {d}/{stem}.so passed "
                              f"its checksum but does not load ({e}); rebuilding it",
                              RuntimeWarning)
    else:
        lib = _load_copy(_build(stem, key, [cxx, *cmd_flags], source), stem)
    _loaded[key] = lib
    return lib


def _read_verified(path: str, key: str) -> bytes | None:
    """The library bytes of the entry at ``path`` if its checksum holds; None
    if there is none, or (with a warning) if it is unreadable or corrupt."""
    try:   # O_NONBLOCK: a FIFO planted at the path must not hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):      # no entry (or no directory)
        return None
    except OSError as e:
        return _corrupt(path, f"unreadable ({e.strerror})")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _corrupt(path, "not a regular file")
        if st.st_size > _MAX_ENTRY:
            return _corrupt(path, f"{st.st_size} bytes: too large")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(_MAX_ENTRY + 1)
    except OSError as e:
        return _corrupt(path, f"unreadable ({e.strerror})")
    finally:
        os.close(fd)
    body, tag = data[:-_TAG_LEN], data[-_TAG_LEN:]
    if len(data) < _TAG_LEN or not tag.startswith(_SO_TAG):
        return _corrupt(path, "truncated or not written by kernelforge (no checksum)")
    if tag != _tag(key, body):
        return _corrupt(path, "corrupt (its checksum does not match: changed on disk, "
                              "or another library put in its place)")
    return body


def _corrupt(path: str, why: str) -> None:
    warnings.warn(f"kernelforge cpp backend: cache entry {path} is {why}; not loading it, "
                  "rebuilding it", RuntimeWarning, stacklevel=4)
    return None


def _load_copy(body: bytes, stem: str) -> ctypes.CDLL:
    """dlopen ``body`` from a private copy (0600, unique name, unlinked once
    loaded): what runs is what was verified, whatever later happens to the
    cache file. The system's temp dir, else beside the entries (a noexec /tmp)."""
    errors = []
    for d in (None, *cache.dirs("cpp")):
        try:
            fd, path = tempfile.mkstemp(prefix=f"kernelforge-{os.getpid()}-{next(_copies)}-",
                                        suffix=f"-{stem}.so", dir=d)
        except OSError as e:
            errors.append(f"{d or tempfile.gettempdir()}: {e}")
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    raise OSError(f"kernelforge cpp backend: cannot load {stem}.so: " + "; ".join(errors))


class _Unusable(Exception):
    """Writing in a cache directory failed (permissions, a file in its place, disk full)."""


def _build(stem: str, key: str, cmd: list[str], source: str) -> bytes:
    """Compile ``source`` and store it as a verified entry; the library's bytes.
    Where the cache directory cannot be used, cache.fallback_dir's instead."""
    d = cache.write_dir("cpp")
    try:
        body = _compile(d, stem, cmd, source)
    except _Unusable as e:
        d = cache.fallback_dir("cpp", e)
        try:
            body = _compile(d, stem, cmd, source)
        except _Unusable as e2:
            raise RuntimeError(f"kernelforge cpp backend: cannot build {stem}.so: {e2}") from None
    entry = body + _tag(key, body)
    try:
        _store(d, stem, entry)
    except OSError as e:
        _store(cache.fallback_dir("cpp", f"storing {stem}.so: {e}"), stem, entry)
    return body


def _compile(d: str, stem: str, cmd: list[str], source: str) -> bytes:
    """Run the compiler in a private work directory under ``d`` (its own
    temporaries too, through TMPDIR), which is removed afterwards, or by a
    later build's _clean_stale if this process is killed."""
    try:
        os.makedirs(d, exist_ok=True)
        _clean_stale(d)
        work = tempfile.mkdtemp(prefix=f"{_WORK_PREFIX}{_host()}.{os.getpid()}.", dir=d)
    except OSError as e:
        raise _Unusable(e) from None
    try:
        src, out = os.path.join(work, stem + ".cpp"), os.path.join(work, stem + ".so")
        try:
            with open(src, "w") as f:
                f.write(source)
        except OSError as e:
            raise _Unusable(e) from None
        res = subprocess.run([*cmd, src, "-o", out], capture_output=True, text=True,
                             env={**os.environ, "TMPDIR": work})
        if res.returncode:
            io = [m for m in _IO_ERRORS if m in res.stderr]
            if io:
                raise _Unusable(f"the compiler could not write in {d}: {io[0]}")
            kept = os.path.join(d, stem + ".cpp")     # kept, to read next to the error
            with contextlib.suppress(OSError):
                os.replace(src, kept)
            raise RuntimeError(f"kernelforge cpp backend: compiling {kept} failed:\n"
                               f"{res.stderr[-4000:]}")
        with contextlib.suppress(OSError):       # beside the entry: readable, debuggable
            os.replace(src, os.path.join(d, stem + ".cpp"))
        with open(out, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _store(d: str, stem: str, entry: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{_WORK_PREFIX}{_host()}.{os.getpid()}.", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(entry)
        os.replace(tmp, os.path.join(d, stem + ".so"))   # atomic: readers see all or nothing
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_IO_ERRORS = tuple(os.strerror(e) for e in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                             errno.EACCES, errno.EIO))


@functools.lru_cache(maxsize=None)
def _host() -> str:
    """This host and pid namespace, as a name part: a pid in a work directory's
    name is only checked where it means the same process (a cache directory
    shared over NFS or between containers)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return cache.digest(f"{socket.gethostname()}\n{ns}")[:12]


def _clean_stale(d: str) -> None:
    """Remove what killed builds left in ``d``: work directories and
    temporaries of a process of this host that is gone, and any older than
    _STALE_S (another host's, or a reused pid). Runs before each build: a
    killed compile left its entry unbuilt, so the next process needing it
    builds and cleans."""
    now = time.time()
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        if n.startswith(_WORK_PREFIX):
            parts = n[len(_WORK_PREFIX):].split(".")
            gone = (len(parts) >= 2 and parts[0] == _host() and parts[1].isdigit()
                    and not _alive(int(parts[1])))
        elif _OLD_TEMP.fullmatch(n):    # tempfile.mkstemp names (earlier versions)
            gone = False
        else:
            continue
        p = os.path.join(d, n)
        try:
            if not gone and now - os.lstat(p).st_mtime < _STALE_S:
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass


_OLD_TEMP = re.compile(r"tmp[a-z0-9_]{8}\.(cpp|so)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # EPERM: someone else's process, alive
        pass
    return True


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


#: a call whose tensors hold fewer elements than this runs on one thread: waking
#: the OpenMP team costs more than the work (PyTorch's grain size is 32768
#: elements per op for the same reason)
PARALLEL_ELEMENTS = 1 << 16


class CppBackend(Backend):
    name = "cpp"
    description = "generated C++ compiled by the host compiler (OpenMP; CPU, loops kept)"
    # 128 query rows x 128-key chunks: the fastest block of rows for causal
    # prefill (docs/benchmarks.md, "Measured (CPU), the C++ lowering")
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
        # above Inductor (20): less per-call overhead on small ops, much faster
        # attention, large memory-bound ops about even (docs/benchmarks.md,
        # "Measured (CPU), the C++ lowering")
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

    def compile_flags(self) -> list[str]:
        """The compiler's flags (a backend built on this lowering may change them:
        a portable instruction set, another optimisation level)."""
        return flags()

    def source(self, kernel) -> str:
        return cpp_printer.print_module(kernel, self.schedule())

    def _load(self, kernel, restrict: bool):
        src = cpp_printer.print_module(kernel, self.schedule(), restrict=restrict)
        fn = getattr(build_library(kernel.name, src, self.compile_flags()), kernel.name)
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
            """The int64 argument array, the float array, the contiguous copies
            it points into (kept alive by the caller until the call returns)
            and the threads to run on."""
            ptrs, strides, back = [], [], None
            elems = 0
            for i in tensors:
                t = args[i]
                st = t.stride()
                if st and st[-1] != 1 and t.shape[-1] > 1:
                    # the generated code assumes a contiguous last dim
                    c = t.contiguous()
                    back = (back or []) + [(t if i in outs else None, c)]
                    t, st = c, c.stride()
                strides += st[:-1]
                n = t.numel()
                elems += n
                ptrs.append(t.data_ptr() if n else _scratch(t))
            ptrs += strides
            ptrs += [args[i].shape[d] for i, d in size_dims]
            if ints:
                ptrs += [int(args[i]) for i in ints]
            return ArgA(*ptrs), (FA(*[float(args[i]) for i in floats]) if floats
                                 else no_floats), back, \
                (threads() if elems >= PARALLEL_ELEMENTS else 1)

        def call(c_fn, args):
            arr, farr, back, n_threads = pack(args)
            c_fn(arr, farr, n_threads)
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
            arr, farr, back, n_threads = pack(args)
            if back:            # strided last dims are copied per call: no shortcut
                return functools.partial(run, *args)
            c_fn = chosen(args)
            if n_threads == 1:
                def bound():
                    c_fn(arr, farr, 1)
            else:
                def bound():
                    c_fn(arr, farr, threads())
            bound.keep = args           # the tensors the array points into stay alive
            bound.kernel = kernel.name  # for profiles of a replay
            return bound

        run.fresh = fresh
        run.bind = bind
        return run
