"""Two cache layers.

* On disk: generated modules, named by the SHA-256 of their text, written
  atomically (temp file + rename) and checked on every load; a corrupt or
  truncated entry is rebuilt, never imported. (The C++ lowering's libraries
  follow the same rules: backends/cpp.py.) A cache directory that cannot be
  written falls back to a private temporary one for the process, with one
  warning (``fallback_dir``).
* In memory: compiled callables keyed by what specialises them (kernel,
  lowering, device, dtypes, static sizes, schedule). Rows and tokens are not
  part of any key, so a new batch size never recompiles. ``stats`` counts
  builds so tests can prove it.
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import sys
import types
import tempfile
import threading
import time
import warnings
from collections import Counter

from . import config

_TAG = "# kernelforge-sha256: "
stats: Counter = Counter()           # (kernel name, backend) -> number of builds
_memory: dict[tuple, object] = {}
# dispatch's per-call memo: (what the caller controls) -> (callable, backend
# decision, schedule key); emptied by registry.reset() (and so register())
launchers: dict[tuple, tuple] = {}
# spec.OpSpec's checked calls: (op, the arguments' key) of calls whose checks
# passed, so a repeat skips them; emptied with ``launchers``
checked: set = set()
_lock = threading.Lock()
# configured cache directory -> this process's private stand-in, once the
# configured one failed a write (a file in its place, read-only, disk full)
_fallback: dict[str, str] = {}
_fallback_lock = threading.Lock()      # not _lock: builds run while holding it


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def dirs(sub: str = "") -> list[str]:
    """Where entries may be found: the configured cache directory, then this
    process's fallback if it has one. ``sub`` names a subdirectory."""
    base = config.cache_dir()
    fb = _fallback.get(base)
    return [os.path.join(base, sub)] + ([os.path.join(fb, sub)] if fb else [])


def write_dir(sub: str = "") -> str:
    """Where a new entry goes: the fallback once the configured directory failed."""
    return dirs(sub)[-1]


def fallback_dir(sub: str, why) -> str:
    """After writing under the configured cache directory failed (``why``):
    this process's private temporary directory, made and warned about once,
    removed at exit. Builds then work but are not shared with other processes."""
    base = config.cache_dir()
    with _fallback_lock:
        fb = _fallback.get(base)
        if fb is None:
            fb = _fallback[base] = tempfile.mkdtemp(prefix="kernelforge-cache-")
            atexit.register(shutil.rmtree, fb, ignore_errors=True)
            warnings.warn(f"kernelforge: cannot use the cache directory {base} ({why}); "
                          f"using the private temporary directory {fb} for this process "
                          "instead (removed at exit: what it builds is not reused by "
                          "other processes)", RuntimeWarning, stacklevel=3)
    d = os.path.join(fb, sub)
    os.makedirs(d, exist_ok=True)
    return d


def write_source(kind: str, name: str, source: str) -> str:
    """Store ``source`` and return its path; reuse a valid entry, replace a corrupt one."""
    fname = f"{kind}_{name}_{digest(source)[:20]}.py"
    for d in dirs():
        path = os.path.join(d, fname)
        if os.path.exists(path):
            if _valid(path, source):
                return path
            warnings.warn(f"kernelforge: corrupt cache entry {path}; rebuilding it",
                          RuntimeWarning)
    text = source + "\n" + _TAG + digest(source) + "\n"
    try:
        return _write_atomic(write_dir(), fname, text)
    except OSError as e:
        return _write_atomic(fallback_dir("", e), fname, text)


def _write_atomic(d: str, fname: str, text: str) -> str:
    path = os.path.join(d, fname)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)        # atomic: readers see the old file or the whole new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _valid(path: str, source: str) -> bool:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    body, sep, tag = text.rpartition("\n" + _TAG)
    return bool(sep) and tag.strip() == digest(body) == digest(source)


def load_module(kind: str, name: str, source: str, before_exec=None):
    """Write (or reuse) the module file and import it from disk, so tracebacks,
    ``inspect`` and Triton's JIT all see real source lines."""
    path = write_source(kind, name, source)
    if config.dump():
        print(f"# ---- kernelforge {kind} module for `{name}` ({path}) ----\n{source}",
              file=sys.stderr)
    modname = f"kernelforge_generated.{kind}_{name}_{digest(source)[:20]}"
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    # registered, so that tools which look a function's module up by name
    # (Dynamo tracing an inlined op, pickling, inspect) find it
    if "kernelforge_generated" not in sys.modules:
        pkg = types.ModuleType("kernelforge_generated")
        pkg.__path__ = []
        sys.modules["kernelforge_generated"] = pkg
    sys.modules[modname] = mod
    if before_exec is not None:
        with before_exec():
            spec.loader.exec_module(mod)
    else:
        spec.loader.exec_module(mod)
    return mod


def get_or_build(key: tuple, build, label: tuple):
    """The callable cached under ``key``, built once; ``label`` names the
    build in ``stats``."""
    fn = _memory.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _memory.get(key)
        if fn is None:
            t0 = time.perf_counter()
            fn = build()
            _build_time[0] += time.perf_counter() - t0
            stats[label] += 1
            _memory[key] = fn
    return fn


_build_time = [0.0]


def build_seconds() -> float:
    """Seconds this process has spent building kernels (compiling, or loading
    them from the disk cache): what a start-up report calls compile time."""
    return _build_time[0]


def built(kernel, backend: str) -> bool:
    """Whether any specialisation of ``kernel`` is compiled for ``backend``."""
    return any(k[0] is kernel and k[1] == backend for k in list(_memory))
