"""Plots of a serving run: output tok/s and latencies against concurrency.

    python bench/plot_serving.py bench/.results/serving.json --out docs/images

Reads the JSON that bench/test_serving_bench.py writes (both servers per level)
or that ``bench/serving_load.py --json`` writes (one server), and writes:

* serving_throughput.svg: output tok/s against concurrency, one line per server
  (the bench's value is the median over its rounds);
* serving_latency.svg: TTFT and ITL, p50 (solid) and p99 (dashed), against
  concurrency, one colour per server, log scale in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                       # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401  (ScalarFormatter for the axes)

COLOURS = {"kernelforge": "tab:blue", "vllm": "tab:orange"}


def series(data: dict) -> dict:
    """{server: [(concurrency, level summary), ...]} from either JSON layout;
    a level summary has output_tok_s, ttft_s and itl_s."""
    out: dict = {}
    for lv in data["levels"]:
        if "servers" in lv:                  # the bench: pooled rounds per server
            for name, s in lv["servers"].items():
                out.setdefault(name, []).append((lv["concurrency"], s["pooled"]))
        else:                                # serving_load.py: one server
            name = data.get("meta", {}).get("model") or "server"
            out.setdefault(name, []).append((lv["concurrency"], lv))
    return {n: sorted(v, key=lambda cv: cv[0]) for n, v in out.items()}


def _title(data: dict, what: str, rounds: str) -> str:
    meta = data.get("meta", {})
    bits = []
    if meta.get("max_tokens"):
        bits.append(f"{meta['max_tokens']} tokens per request")
    if meta.get("rounds"):
        bits.append(rounds.format(meta["rounds"]))
    return what + ("\n" + ", ".join(bits) if bits else "")


def _num(x) -> float:
    return float("nan") if x is None else x


def plot_throughput(data: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, pts) in enumerate(series(data).items()):
        cs = [c for c, _ in pts]
        ax.plot(cs, [_num(p["output_tok_s"]) for _, p in pts], marker="o", label=name,
                color=COLOURS.get(name, f"C{i + 2}"))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({c for pts in series(data).values() for c, _ in pts}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(_title(data, "Streamed completions: output throughput",
                        "median of {} rounds"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="svg")
    plt.close(fig)


def plot_latency(data: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    ser = series(data)
    for ax, key, label in ((axes[0], "ttft_s", "time to first token"),
                           (axes[1], "itl_s", "inter-token latency")):
        for i, (name, pts) in enumerate(ser.items()):
            colour = COLOURS.get(name, f"C{i + 2}")
            cs = [c for c, _ in pts]
            for q, style in (("p50", "-"), ("p99", "--")):
                ax.plot(cs, [_num(p[key][q]) * 1e3 for _, p in pts], style, marker="o",
                        color=colour, label=f"{name} {q}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({c for pts in ser.values() for c, _ in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ms")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(data, "Streamed completions: latency (p50 solid, p99 dashed)",
                        "pooled over {} rounds"),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="svg")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plot_serving.py", description=__doc__.split("\n")[0])
    p.add_argument("results", help="JSON from test_serving_bench.py or serving_load.py")
    p.add_argument("--out", default="docs/images", help="directory for the SVG files")
    args = p.parse_args(argv)
    data = json.loads(Path(args.results).read_text())
    if not data.get("levels"):
        print(f"plot_serving.py: no levels in {args.results}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_throughput(data, out / "serving_throughput.svg")
    plot_latency(data, out / "serving_latency.svg")
    print(f"wrote {out / 'serving_throughput.svg'} and {out / 'serving_latency.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
