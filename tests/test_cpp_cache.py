"""The C++ lowering's library cache (kernelforge/backends/cpp.py): entries
checked by SHA-256 before anything is loaded, keyed by compiler and
instruction set, leftovers of killed compiles removed, and an unusable cache
directory replaced by a private one. Loads of damaged entries run in a child
process, so a crash fails the test instead of killing pytest."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from kernelforge import cache
from kernelforge.backends import cpp

pytestmark = pytest.mark.skipif(cpp.compiler()[0] is None, reason="no C++ compiler here")

REAL_CXX = cpp.compiler()[0]
SRC_A = 'extern "C" int kf_a(int x) { return x + 41; }'
SRC_B = 'extern "C" int kf_b(int x) { return x + 99; }'
# a library that announces itself from its constructor, which dlopen runs
# before the caller can check anything
PLANTED = r'''
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void planted() {
    if (FILE* f = std::fopen(std::getenv("KF_MARKER"), "w")) std::fclose(f);
}
extern "C" int kf_a(int x) { return -1; }
'''

# loads `name` from the cache in a fresh process and calls fn(1)
CHILD = r'''
import json, sys, warnings
import kernelforge.backends.cpp as cpp
name, src, fn = sys.argv[1:4]
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    out = getattr(cpp.build_library(name, src), fn)(1)
print(json.dumps({"out": out, "warnings": [str(w.message) for w in seen]}))
'''


@pytest.fixture
def cdir(tmp_path, monkeypatch):
    """An empty cache directory for this test, and a process state that has
    loaded nothing from it and has no fallback."""
    monkeypatch.setenv("KERNELFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpp, "_loaded", {}, raising=False)
    monkeypatch.setattr(cache, "_fallback", {}, raising=False)
    return tmp_path / "cache" / "cpp"


def entry(cdir, name):
    """The path of ``name``'s one library in ``cdir``."""
    (found,) = [n for n in os.listdir(cdir) if n.startswith(name + "_") and n.endswith(".so")]
    return str(cdir / found)


def child(name, src, fn, env=None, timeout=120):
    res = subprocess.run([sys.executable, "-c", CHILD, name, src, fn], capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert res.returncode == 0, f"child died with {res.returncode}:\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_entry_carries_its_checksum_and_a_warm_load_does_not_compile(cdir, monkeypatch):
    assert cpp.build_library("a", SRC_A).kf_a(1) == 42
    with open(entry(cdir, "a"), "rb") as f:
        data = f.read()
    assert data.startswith(b"\x7fELF") and data[-cpp._TAG_LEN:].startswith(cpp._SO_TAG)

    monkeypatch.setattr(cpp, "_loaded", {})          # as a new process would start

    def no_compiler(*a, **k):
        raise AssertionError("compiled although a valid entry was cached")
    monkeypatch.setattr(cpp.subprocess, "run", no_compiler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpp.build_library("a", SRC_A).kf_a(1) == 42


def test_what_is_loaded_is_a_private_copy_not_the_cache_file(cdir):
    """Replacing or rewriting the entry after its check cannot change what
    runs: the process maps a private copy of the verified bytes."""
    assert cpp.build_library("b", SRC_B).kf_b(1) == 100
    path = entry(cdir, "b")
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert path not in maps
    assert "-b_" in maps and "(deleted)" in maps     # the copy, unlinked once loaded


def _truncate(path, other):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _empty(path, other):
    open(path, "wb").close()


def _flip_body(path, other):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    open(path, "wb").write(bytes(data))


def _flip_tag(path, other):
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x01
    open(path, "wb").write(bytes(data))


def _swap(path, other):
    """Another kernel's entry, valid for its own key, in this one's place."""
    os.replace(other, path)


def _planted(path, other):
    src = path + ".planted.cpp"
    open(src, "w").write(PLANTED)
    subprocess.run([cpp.compiler()[0], "-shared", "-fPIC", src, "-o", path], check=True)


def _directory(path, other):
    os.unlink(path)
    os.mkdir(path)


def _fifo(path, other):
    os.unlink(path)
    os.mkfifo(path)


@pytest.mark.parametrize("damage", [_truncate, _empty, _flip_body, _flip_tag, _swap, _planted,
                                    _directory, _fifo], ids=lambda f: f.__name__[1:])
def test_a_damaged_entry_is_rebuilt_never_loaded(cdir, tmp_path, damage):
    cpp.build_library("a", SRC_A)
    cpp.build_library("b", SRC_B)
    path = entry(cdir, "a")
    damage(path, entry(cdir, "b"))
    marker = tmp_path / "constructor-ran"
    got = child("a", SRC_A, "kf_a", env={"KF_MARKER": str(marker)})
    assert got["out"] == 42
    assert not marker.exists(), "the planted library's constructor ran"
    assert any("not loading it, rebuilding it" in w for w in got["warnings"]), \
        (got, sorted(os.listdir(cdir)), path)
    if damage is not _directory:      # (a directory in the way is not replaced)
        assert cpp._read_verified(path, cpp.entry_key("a", SRC_A)[1]) is not None  # rebuilt


def test_instruction_set_and_compiler_are_in_the_key(cdir, tmp_path, monkeypatch):
    cpp.build_library("a", SRC_A)
    monkeypatch.setattr(cpp, "isa_id", lambda: "x86_64\nflags: sse2\n")   # another CPU
    cpp.build_library("a", SRC_A)
    assert len(os.listdir(cdir)) == 4
    # the same compiler path reporting another version (an upgrade in place)
    cxx = tmp_path / "cxx"
    monkeypatch.setattr(cpp, "compiler", lambda: (str(cxx), ""))
    try:
        for version in ("12.2.0", "13.1.0"):
            cxx.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "c++ {version}"; exit 0; }}\n'
                           f'exec {REAL_CXX} "$@"\n')
            cxx.chmod(0o755)
            cpp.compiler_id.cache_clear()
            cpp.build_library("a", SRC_A)
    finally:
        cpp.compiler_id.cache_clear()
    assert len([n for n in os.listdir(cdir) if n.endswith(".so")]) == 4


def test_a_compiler_without_version_output_is_keyed_by_its_file(tmp_path, monkeypatch):
    cxx = tmp_path / "cxx"
    cxx.write_text("#!/bin/sh\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setattr(cpp, "compiler", lambda: (str(cxx), ""))
    cpp.compiler_id.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="--version` failed .*keyed by the compiler file"):
            ident = cpp.compiler_id()
    finally:
        cpp.compiler_id.cache_clear()
    assert f"size {cxx.stat().st_size}, mtime {cxx.stat().st_mtime_ns}" in ident


def test_instruction_set_is_what_this_cpu_reports():
    isa = cpp.isa_id()
    assert isa.startswith(os.uname().machine) and cpp.isa_id() is isa   # computed once
    try:
        info = open("/proc/cpuinfo").read().split("\n\n")[0]
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            assert " ".join(value.split()) in isa
            break
    assert cpp.compiler()[0] in cpp.compiler_id()


def test_a_killed_compile_leaves_nothing_behind(cdir, tmp_path):
    """SIGKILL while the compiler runs; the next build removes what it left."""
    started = tmp_path / "started"
    slow = tmp_path / "slow-cxx"
    slow.write_text(f'#!/bin/sh\ncase "$1" in --version) exec {cpp.compiler()[0]} --version;; esac\n'
                    f'touch "{started}"\nsleep 60\nexec {cpp.compiler()[0]} "$@"\n')
    slow.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "a", SRC_A, "kf_a"],
                            env={**os.environ, "CXX": str(slow)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the child never reached the compiler"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)        # the child and its compiler
        proc.wait()
    left = os.listdir(cdir)
    assert left, "the killed compile left nothing to clean (the test would prove nothing)"
    cpp.build_library("b", SRC_B)
    stem = os.path.basename(entry(cdir, "b"))[:-3]
    assert sorted(os.listdir(cdir)) == [stem + ".cpp", stem + ".so"]


def test_stale_work_files_go_and_live_ones_stay(tmp_path):
    old = time.time() - 2 * cpp._STALE_S
    here = cpp._host()
    names = {
        f".build.{here}.{os.getppid()}.live1": True,        # a live process of this host
        f".build.{here}.999999999.dead1": False,            # no such pid
        ".build.0123456789ab.4242.elsewhere": True,         # another host, recent
        ".build.0123456789ab.4243.oldelse": False,          # another host, abandoned
        "tmpab_cd123.so": True,                             # old-style temporary, recent
        "tmpab_cd124.cpp": False,                           # old-style temporary, abandoned
        "kernel_0123456789abcdef0123.so": True,             # an entry: never touched
    }
    for n in names:
        p = tmp_path / n
        if n.startswith(".build"):
            p.mkdir()
            (p / "x.cpp").write_text("")
        else:
            p.write_text("")
        if n.endswith(("oldelse", "124.cpp")) or n.startswith("kernel"):
            os.utime(p, (old, old))
    cpp._clean_stale(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)


def test_a_file_where_the_cache_directory_should_be_falls_back_with_one_warning(cdir,
                                                                                 monkeypatch):
    blocker = cdir.parent
    blocker.parent.mkdir(exist_ok=True)
    blocker.write_text("not a directory")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cpp.build_library("a", SRC_A).kf_a(1) == 42
        assert cpp.build_library("b", SRC_B).kf_b(1) == 100
        path = cache.write_source("torch", "probe", "x = 1")
    assert len(seen) == 1 and "cannot use the cache directory" in str(seen[0].message)
    fallback = cache._fallback[str(blocker)]
    assert path.startswith(fallback)
    assert os.path.exists(os.path.join(fallback, "cpp", cpp.entry_key("a", SRC_A)[0] + ".so"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only directories")
def test_a_read_only_cache_directory_falls_back(cdir):
    cdir.parent.mkdir()
    cdir.parent.chmod(0o555)
    try:
        with pytest.warns(RuntimeWarning, match="cannot use the cache directory"):
            assert cpp.build_library("a", SRC_A).kf_a(1) == 42
    finally:
        cdir.parent.chmod(0o755)


def test_a_full_disk_falls_back(cdir, tmp_path, monkeypatch):
    """A compiler that cannot write its output in the cache directory (as
    with ENOSPC) is not a compile error: the build moves to the fallback."""
    real = cpp.compiler()[0]
    full = tmp_path / "full-cxx"
    full.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in '
                    f'{cdir}/*.so) echo "ld: final link failed: {os.strerror(28)}" >&2; exit 1;; '
                    f'esac; done\nexec {real} "$@"\n')
    full.chmod(0o755)
    monkeypatch.setattr(cpp, "compiler", lambda: (str(full), ""))
    with pytest.warns(RuntimeWarning, match="cannot use the cache directory .*No space left"):
        assert cpp.build_library("a", SRC_A).kf_a(1) == 42


def test_a_real_compile_error_still_raises_and_keeps_the_source(cdir):
    with pytest.raises(RuntimeError, match="compiling .*broken_.*cpp failed"):
        cpp.build_library("broken", 'extern "C" int f( { }')
    assert [n for n in os.listdir(cdir) if n.endswith(".cpp")]
    assert not [n for n in os.listdir(cdir) if n.startswith(".build")]
