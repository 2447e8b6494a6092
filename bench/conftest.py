"""Shared state for the CPU benchmark suite (bench/test_rmsnorm_bench.py,
bench/test_rotary_bench.py, bench/test_attention_bench.py).

* ``copy_bandwidth``: this machine's memory bandwidth in GB/s (1e9 bytes/s),
  from a large ``dst.copy_(src)``. The copy benchmark in the suite sets it from
  its own median; when that case is deselected (``-k smoke``) the fixture
  measures a shorter copy itself, so every case can still report the fraction.
* ``record_case``: each case hands its median, byte count and labels (and
  its op: ``rms_norm``, the default, ``rotary``, ``attention`` or
  ``paged_attention``; attention cases also their FLOPs) here;
  ``pytest_terminal_summary`` prints one table from them at the end, with the
  ratios that are goals (all from medians of this same run), per op.

Bandwidth model: bytes moved = what the op must read plus what it must
write, once each (rms_norm: x + out + weight; fused: x + residual + out +
residual_out + weight; rotary: query and key read and written, positions and
the gathered cos/sin cache rows; attention: q + k + v + out, paged decode
counting the used cache blocks; copy: src + dst). An implementation that
moves more than that (a second read of x, a temporary) shows as a lower GB/s.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time

# Before torch loads Inductor: compile in this process. A pool of compile
# workers would be started in the background and, on a 2-core machine, steal
# CPU from the first timed cases. (Compile time is never timed here.)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# generated sources go to a private directory for the run, not the user's cache
if "KERNELFORGE_CACHE_DIR" not in os.environ:
    os.environ["KERNELFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernelforge-bench-cache-")
    # removed at exit: a run's generated sources and libraries (tens of MB) are its own
    atexit.register(shutil.rmtree, os.environ["KERNELFORGE_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402


from allocator import keep_freed_memory  # noqa: E402  (bench/ is on sys.path)

MALLOC_MODE = keep_freed_memory()

COPY_MIB = 256                       # fp32 source of the copy benchmark (and as much again written)

# goals, checked (reported, not asserted) by the summary
GOAL_VS_EAGER = 3.0                  # kf inductor at least 3x faster than eager F.rms_norm
GOAL_VS_COMPILE = 0.95               # kf inductor within 5% of a hand-written torch.compile
GOAL_COPY_FRACTION = 0.50            # kf inductor reaches half of the copy bandwidth
GOAL_ROTARY_VS_HF = 3.0              # rotary: kf inductor at least 3x eager HF-style, T=4096
GOAL_ATTN_PREFILL_VS_SDPA = 0.8      # attention prefill: kf inductor at least 0.8x SDPA (causal)
GOAL_PAGED_DECODE_VS_GATHER = 2.0    # paged decode: kf inductor at least 2x gather + SDPA

_STATE: dict = {"copy": None, "cases": [], "load_start": None}


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def pytest_sessionstart(session):
    _STATE["load_start"] = _loadavg()


def copy_bytes(numel: int, elsize: int = 4) -> int:
    return 2 * numel * elsize        # read src + write dst


def set_copy_result(median_s: float, nbytes: int, source: str) -> float:
    gbps = nbytes / median_s / 1e9
    _STATE["copy"] = {"median_s": median_s, "bytes": nbytes, "gbps": gbps, "source": source}
    return gbps


def _measure_copy_fallback() -> float:
    """A short, untabled copy measurement for runs that deselect the copy benchmark."""
    n = COPY_MIB * 1024 * 1024 // 4
    src = torch.full((n,), 1.5)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    times.sort()
    return set_copy_result(times[len(times) // 2], copy_bytes(n), "fixture fallback (7 copies)")


@pytest.fixture(scope="session")
def bench_state() -> dict:
    """The suite's shared dict: ``copy`` (bandwidth result) and ``cases``."""
    return _STATE


@pytest.fixture
def copy_bandwidth() -> float:
    """GB/s of a large fp32 copy on this machine, measured in this run."""
    if _STATE["copy"] is None:
        _measure_copy_fallback()
    return _STATE["copy"]["gbps"]


@pytest.fixture
def record_copy():
    """``record_copy(benchmark, nbytes)`` after the copy benchmark: its median
    becomes the bandwidth every later case reports a fraction of."""

    def record(benchmark, nbytes: int) -> None:
        stats = getattr(benchmark, "stats", None)
        if not stats:
            return
        gbps = set_copy_result(stats.stats.median, nbytes, "copy benchmark, this run")
        benchmark.extra_info.update({"bytes": nbytes, "gbps": round(gbps, 3),
                                     "fraction_of_copy_bw": 1.0})

    return record


@pytest.fixture
def record_case():
    """``record_case(benchmark, group=, impl=, nbytes=, op="rms_norm", flops=None)``
    after the timed call: fills ``benchmark.extra_info`` and remembers the case
    for the summary (``op`` picks the block of goal ratios the group appears
    in; ``flops``, the work of one call, adds GFLOP/s)."""

    def record(benchmark, *, group: str, impl: str, nbytes: int, op: str = "rms_norm",
               flops: float | None = None) -> None:
        stats = getattr(benchmark, "stats", None)
        if not stats:                # --benchmark-disable: nothing was timed
            return
        median = stats.stats.median
        copy = _STATE["copy"] or {"gbps": float("nan")}
        gbps = nbytes / median / 1e9
        benchmark.extra_info.update({
            "bytes": nbytes, "gbps": round(gbps, 3),
            "copy_gbps": round(copy["gbps"], 3),
            "fraction_of_copy_bw": round(gbps / copy["gbps"], 4),
        })
        case = {"group": group, "impl": impl, "op": op, "median_s": median,
                "min_s": stats.stats.min, "rounds": stats.stats.rounds,
                "bytes": nbytes, "gbps": gbps}
        if flops is not None:
            case["flops"] = flops
            case["gflops"] = flops / median / 1e9
            benchmark.extra_info.update({"flops": flops, "gflops": round(case["gflops"], 3)})
        _STATE["cases"].append(case)

    return record


# -- the summary table ------------------------------------------------------------

IMPL_ORDER = ("kf_cpp", "kf_inductor", "kf_inductor_inplace", "kf_inductor_nocheck", "kf_eager",
              "torch_F_rms_norm", "torch_add_F_rms_norm", "eager_formula", "compiled_formula",
              "hf_eager", "hf_compiled", "range_check_only",
              "torch_sdpa", "gather_sdpa_gqa", "gather_sdpa_repeat")
ATTENTION_OPS = ("attention", "paged_attention")


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:9.3f} ms" if s >= 1e-3 else f"{s * 1e6:9.1f} us"


def _goal(value: float, goal: float, fmt: str) -> str:
    if value != value:
        return "n/a"
    return f"{fmt.format(value)} (goal >= {fmt.format(goal)}: {'met' if value >= goal else 'MISSED'})"


def _sample_lines(groups) -> list[str]:
    """Sampling: kf_inductor against the sort-based torch sampler (goal >= 2x)."""
    out = ["", "sample: kf_inductor against the sort-based sampler (vLLM's native path), "
               "from medians of this run:"]
    for g, impls in groups.items():
        kf, peer = impls.get("kf_inductor"), impls.get("torch_sort")
        if kf and peer:
            out.append(f"  {g}: {_goal(peer['median_s'] / kf['median_s'], 2.0, '{:.2f}x')}")
    return out


def summary_lines() -> list[str]:
    cases, copy = _STATE["cases"], _STATE["copy"]
    if not cases and copy is None:
        return []
    copy_gbps = copy["gbps"] if copy else float("nan")
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
             f"load average at start {_STATE['load_start']}, at end {_loadavg()} "
             "(a load above the CPU count means other work shared the cores)",
             f"allocator: {MALLOC_MODE}"]
    if copy:
        lines.append(f"copy bandwidth: {copy_gbps:.2f} GB/s  ({copy['bytes'] / 2**20:.0f} MiB moved "
                     f"per copy, median {_fmt_time(copy['median_s']).strip()}; {copy['source']})")
    if not cases:
        return lines
    w = max(len(c["group"]) + len(c["impl"]) + 3 for c in cases)
    lines.append(f"{'case':<{w}} {'median':>12} {'GB/s':>8} {'% copy bw':>10} {'min':>12} {'rounds':>6}")
    groups: dict[str, dict] = {}
    for c in cases:
        groups.setdefault(c["group"], {})[c["impl"]] = c
    for g, impls in groups.items():
        for impl in sorted(impls, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else 99):
            c = impls[impl]
            lines.append(f"{g + ' | ' + impl:<{w}} {_fmt_time(c['median_s']):>12} "
                         f"{c['gbps']:8.2f} {100 * c['gbps'] / copy_gbps:9.1f}% "
                         f"{_fmt_time(c['min_s']):>12} {c['rounds']:>6}")
    rotary = {g for g, impls in groups.items()
              if any(c.get("op") == "rotary" for c in impls.values())}
    attention = {g for g, impls in groups.items()
                 if any(c.get("op") in ATTENTION_OPS for c in impls.values())}
    sample = {g for g, impls in groups.items()
              if any(c.get("op") == "sample" for c in impls.values())}
    specs = {g for g, impls in groups.items()
             if any(c.get("op") == "spec" for c in impls.values())}
    if specs:
        lines.extend(_spec_lines({g: i for g, i in groups.items() if g in specs}, copy_gbps))
        groups = {g: i for g, i in groups.items() if g not in specs}
        if not groups:
            return lines
    if sample and len(sample) == len(groups):
        return lines + _sample_lines(groups)
    if len(rotary) == len(groups):
        return lines + _rotary_lines(groups, copy_gbps)
    if len(rotary | attention) == len(groups):          # no RMSNorm group ran
        if rotary:
            lines.extend(_rotary_lines({g: i for g, i in groups.items() if g in rotary},
                                       copy_gbps))
        return lines + _attention_lines({g: i for g, i in groups.items() if g in attention},
                                        copy_gbps)
    lines.append("")
    lines.append("kf_cpp (backend='cpp', the CPU default) and kf_inductor ratios, from medians "
                 "of this run; goals apply to the 4096x4096 groups:")
    for g, impls, kf in [(g, i, kf) for g, i in groups.items() for kf in ("kf_cpp", "kf_inductor")]:
        ind = impls.get(kf)
        if ind is None or g in rotary or g in attention:
            continue
        eager_peer = impls.get("torch_F_rms_norm") or impls.get("torch_add_F_rms_norm")
        comp = impls.get("compiled_formula")
        # the goals are set for the 4096x4096 cases; other groups get plain ratios
        goal = _goal if "4096x4096" in g else (lambda v, _g, fmt: fmt.format(v))
        parts = []
        if eager_peer:
            parts.append("vs eager " + eager_peer["impl"] + ": "
                         + goal(eager_peer["median_s"] / ind["median_s"], GOAL_VS_EAGER, "{:.2f}x"))
        if comp:
            parts.append("vs hand torch.compile: "
                         + goal(comp["median_s"] / ind["median_s"], GOAL_VS_COMPILE, "{:.2f}x"))
        parts.append("of copy bw: " + goal(ind["gbps"] / copy_gbps, GOAL_COPY_FRACTION, "{:.0%}"))
        if "kf_eager" in impls:
            parts.append(f"vs kf eager: {impls['kf_eager']['median_s'] / ind['median_s']:.2f}x")
        lines.append(f"  {g} ({kf}):")
        lines.extend(f"      {p}" for p in parts)
    if rotary:
        lines.extend(_rotary_lines({g: i for g, i in groups.items() if g in rotary}, copy_gbps))
    if attention:
        lines.extend(_attention_lines({g: i for g, i in groups.items() if g in attention},
                                      copy_gbps))
    return lines


def _spec_lines(groups: dict, copy_gbps: float) -> list[str]:
    """bench/test_ops_bench.py: each backend's speed against the op's peer (the
    plain torch an engine runs without kernelforge) and its share of the copy
    bandwidth, from medians of this run."""
    lines = ["", "ops from their specs: each backend against the peer (higher is faster) "
             "and its GB/s as a share of the copy bandwidth, medians of this run:"]
    for g, impls in groups.items():
        peer = impls.get("peer")
        parts = []
        for impl in sorted(i for i in impls if i.startswith("kf_")):
            c = impls[impl]
            vs = f"{peer['median_s'] / c['median_s']:.2f}x peer, " if peer else ""
            parts.append(f"{impl} {vs}{c['gbps'] / copy_gbps:.0%} of copy bw")
        lines.append(f"  {g}: " + "; ".join(parts))
    return lines


def _rotary_lines(groups: dict, copy_gbps: float) -> list[str]:
    """Ratios for the rotary groups (bench/test_rotary_bench.py); the goal
    applies to the T=4096 groups."""
    lines = ["", "rotary_embedding kf_inductor ratios, from medians of this run; the goal "
             "(>= 3x eager HF-style) applies to the T=4096 groups:"]
    for g, impls in groups.items():
        ind = impls.get("kf_inductor")
        if ind is None:
            continue
        goal = _goal if "T=4096" in g else (lambda v, _g, fmt: fmt.format(v))
        parts = []
        if "hf_eager" in impls:
            parts.append("vs hf_eager: " + goal(impls["hf_eager"]["median_s"] / ind["median_s"],
                                                GOAL_ROTARY_VS_HF, "{:.2f}x"))
        if "hf_compiled" in impls:
            comp = impls["hf_compiled"]["median_s"] / ind["median_s"]
            parts.append(f"vs hf_compiled: {comp:.2f}x")
        if "kf_eager" in impls:
            parts.append(f"vs kf eager: {impls['kf_eager']['median_s'] / ind['median_s']:.2f}x")
        parts.append(f"of copy bw: {ind['gbps'] / copy_gbps:.0%}")
        if "kf_inductor_inplace" in impls:
            parts.append("in place vs out of place: "
                         f"{ind['median_s'] / impls['kf_inductor_inplace']['median_s']:.2f}x")
        if "kf_inductor_nocheck" in impls:
            nochk = impls["kf_inductor_nocheck"]
            diff_us = (ind["median_s"] - nochk["median_s"]) * 1e6
            chk = (f"positions range check: {diff_us:+.1f} us "
                   "(median check_positions=True - False)")
            if "range_check_only" in impls:
                chk += f"; the check alone: {impls['range_check_only']['median_s'] * 1e6:.1f} us"
            parts.append(chk)
        lines.append(f"  {g}:")
        lines.extend(f"      {p}" for p in parts)
    return lines


def _attention_lines(groups: dict, copy_gbps: float) -> list[str]:
    """GFLOP/s of every implementation and kf_cpp's and kf_inductor's ratios for the
    attention groups (bench/test_attention_bench.py): prefill against SDPA
    (goal >= 0.8x), paged decode against gather + SDPA (goal >= 2x the
    enable_gqa peer, the faster one)."""
    lines = ["", "attention kf_cpp (the CPU default) and kf_inductor ratios, from medians of "
             "this run; goals (kf_cpp): prefill >= "
             f"{GOAL_ATTN_PREFILL_VS_SDPA:g}x torch_sdpa (kf time <= "
             f"{1 / GOAL_ATTN_PREFILL_VS_SDPA:.2f}x SDPA's), paged decode >= "
             f"{GOAL_PAGED_DECODE_VS_GATHER:g}x gather_sdpa_gqa; FLOPs count unmasked "
             "(query, key) pairs only:"]
    for g, impls in groups.items():
        lines.append(f"  {g}:")
        for impl in sorted(impls, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else 99):
            c = impls[impl]
            gf = f"{c['gflops']:8.2f} GFLOP/s" if "gflops" in c else " " * 16
            lines.append(f"      {impl:<20} {_fmt_time(c['median_s'])}  {gf}  "
                         f"{c['gbps']:7.2f} GB/s ({c['gbps'] / copy_gbps:.0%} of copy bw)")
        decode = any(c.get("op") == "paged_attention" for c in impls.values())
        goal_peer, goal = (("gather_sdpa_gqa", GOAL_PAGED_DECODE_VS_GATHER) if decode
                           else ("torch_sdpa", GOAL_ATTN_PREFILL_VS_SDPA))
        # the goal is for the default CPU backend (cpp); Inductor's ratios for reference
        for kf in ("kf_cpp", "kf_inductor"):
            ind = impls.get(kf)
            if ind is None:
                continue
            for impl, c in impls.items():
                if impl.startswith("kf_") and impl != "kf_eager":
                    continue
                ratio = c["median_s"] / ind["median_s"]
                label = f"{kf} vs {impl}: "
                lines.append("      " + label + (_goal(ratio, goal, "{:.2f}x")
                                                 if impl == goal_peer and kf == "kf_cpp"
                                                 else f"{ratio:.2f}x"))
    return lines


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # after pytest-benchmark's own table, and even when it reports a regression
    try:
        return (yield)
    finally:
        lines = summary_lines()
        if lines:
            ops = frozenset(c.get("op", "rms_norm") for c in _STATE["cases"])
            title = {frozenset({"rotary"}): "kernelforge rotary benchmark summary",
                     frozenset({"sample"}): "kernelforge sampling benchmark summary",
                     frozenset({"rms_norm", "rotary"}):
                         "kernelforge RMSNorm and rotary benchmark summary",
                     }.get(ops, "kernelforge RMSNorm benchmark summary")
            if ops == frozenset({"spec"}):
                title = "kernelforge ops benchmark summary (from the specs)"
            if ops & set(ATTENTION_OPS):
                names = [n for n, o in (("RMSNorm", "rms_norm"), ("rotary", "rotary"))
                         if o in ops] + ["attention"]
                title = ("kernelforge " + (" and ".join(names) if len(names) < 3 else
                                           ", ".join(names[:-1]) + " and " + names[-1])
                         + " benchmark summary")
            terminalreporter.section(title, sep="-")
            for line in lines:
                terminalreporter.write_line(line)


def pytest_benchmark_update_machine_info(config, machine_info):
    # saved with every --benchmark-autosave run, so comparisons show the set-up
    machine_info["kernelforge_bench"] = {
        "allocator": MALLOC_MODE, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
