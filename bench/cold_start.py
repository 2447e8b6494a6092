"""Cold start of ``kernelforge generate`` beside llama.cpp's, from fresh processes.

Run from a checkout (kernelforge installed; llama.cpp is the peer when
llama-cpp-python is importable, ``tools/install_peers.sh``)::

    python3 bench/cold_start.py [--model F.gguf] [--repeats N] [--max-tokens N] [--json OUT]

What it measures, per engine, each run a new process:

* kernelforge: ``kernelforge generate PROMPT --max-tokens N --stats`` (the
  console script next to this python; chat template, greedy). The wall time
  from spawn to the first byte on stdout (the first generated text) and to
  exit, plus the breakdown the command prints with ``--stats`` (import, load,
  compile, first token, prompt and generation rates). Where the command has
  no ``--stats`` or prints no stats lines, the wall times are still reported
  and the breakdown is marked missing.
* llama.cpp: ``python3 -c CODE`` that times ``import llama_cpp``, ``Llama(...)``
  (load; n_threads = cores) and a streamed greedy ``create_completion`` (first
  token, then the rest of N tokens) on the same GGUF file and the same prompt
  text: the chat template applied by kernelforge's tokenizer from the file's
  metadata, tokenized by llama.cpp with special tokens, no BOS added (as
  bench/runtime_peers.py does). Its spawn-to-first-byte and spawn-to-exit
  wall times are measured as for kernelforge.

The first run of each engine is a warm-up (it fills kernelforge's compiled-
kernel cache and the page cache) and is reported apart as "first run";
``--repeats`` more runs follow, alternating engines, and the table shows their
medians. Both stop at end-of-sequence or after N new tokens. Both engines'
"import" and "to first token (in process)" count from the process's start
(/proc), interpreter start included; "first token" is the prompt's forward
and the first sample. "process start"
is the median spawn-to-exit time of ``python3 -c pass``, the floor under
every spawn-to-first-token number. The issue's goal: kernelforge's spawn to
first token at most 3 s once the compiled-kernel cache is warm.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

GOAL_S = 3.0
DEFAULT_PROMPT = "Tell me a story about the number 7."

_NUM = r"([-+0-9.eE]+|nan|inf|n/a)"        # "n/a" (a time the command could not take): None
STATS_TIMES = re.compile(
    rf"kernelforge stats: import {_NUM}(?: s)? \| load {_NUM}(?: s)? \| compile {_NUM}(?: s)? \| "
    rf"first token {_NUM}(?: s)? \| to first token {_NUM}(?: s)?")
STATS_RATES = re.compile(
    rf"kernelforge stats: prompt (\d+) tokens in {_NUM} s \({_NUM} tok/s\) \| "
    rf"generation (\d+) tokens in {_NUM} s \({_NUM} tok/s\)")

# The llama.cpp side, run as ``python3 -c LLAMA_CODE model prompt n_ctx threads max_tokens``:
# generated text to stdout as it streams, one JSON line (prefixed) to stderr at the end.
LLAMA_CODE = r"""
import sys, time
t0 = time.perf_counter()
import llama_cpp
t1 = time.perf_counter()
import json, os
try:    # process start on the perf_counter clock (/proc, 10 ms), as kernelforge's stats count
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        t0 = min(t0, time.perf_counter() - (float(f.read().split()[0])
                                           - ticks / os.sysconf("SC_CLK_TCK")))
except (OSError, ValueError, IndexError):
    pass
model, prompt = sys.argv[1], sys.argv[2]
n_ctx, threads, max_tokens = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
t2 = time.perf_counter()
ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
seen = set()
def count(input_ids, logits):
    # called once per sampled token (end-of-sequence included) with the ids before it,
    # and once more after the loop with the same ids as the last: distinct lengths count
    seen.add(len(input_ids))
    return False
t3 = time.perf_counter()
first = None
finish = None
out = sys.stdout
for chunk in llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, stream=True,
                                   stopping_criteria=llama_cpp.StoppingCriteriaList([count])):
    if first is None:
        first = time.perf_counter()
    c = chunk["choices"][0]
    out.write(c["text"])
    out.flush()
    finish = c.get("finish_reason") or finish
t4 = time.perf_counter()
out.write("\n")
out.flush()
n = len(seen) - (1 if finish == "stop" else 0)     # the end-of-sequence token is no text
first = t4 if first is None else first
print("llama.cpp stats: " + json.dumps({
    "version": llama_cpp.__version__, "import_s": t1 - t0, "load_s": t2 - t1,
    "first_token_s": first - t3, "to_first_token_s": first - t0,
    "prompt_tokens": len(ids), "prompt_s": first - t3,
    "gen_tokens": max(n - 1, 0), "gen_s": t4 - first, "completion_tokens": n,
    "finish_reason": finish}), file=sys.stderr, flush=True)
"""


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def kernelforge_command() -> list[str]:
    """The ``kernelforge`` console script next to this python (no pyenv shim
    in front of it), else the one on PATH, else ``python -c`` calling the CLI."""
    beside = Path(sys.executable).parent / "kernelforge"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("kernelforge")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from kernelforge.cli import main; "
                                  "sys.argv[0] = 'kernelforge'; sys.exit(main())"]


def timed_run(cmd: list[str], timeout: float) -> dict:
    """Spawn ``cmd``; seconds from spawn to the first byte on stdout and to exit,
    the stdout text and the stderr text."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    first = None
    out = bytearray()
    fd = p.stdout.fileno()
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if first is None:
                first = time.perf_counter() - t0
            out += chunk
        rc = p.wait()
        total = time.perf_counter() - t0
    finally:
        timer.cancel()
    reader.join()
    p.stdout.close()
    p.stderr.close()
    return {"cmd": cmd, "rc": rc, "spawn_to_first_byte_s": first, "spawn_to_exit_s": total,
            "timed_out": rc == -9 and total >= timeout,
            "stdout": out.decode("utf-8", "replace"),
            "stderr": b"".join(err).decode("utf-8", "replace")}


def process_start(repeats: int = 5) -> float:
    """Median spawn-to-exit seconds of ``python3 -c pass``."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def parse_kf_stats(stderr: str) -> Optional[dict]:
    """The two ``kernelforge stats:`` lines as numbers; None if either is missing."""
    a, b = STATS_TIMES.search(stderr), STATS_RATES.search(stderr)
    if a is None or b is None:
        return None
    f = [None if x == "n/a" else float(x) for x in a.groups()]
    return {"import_s": f[0], "load_s": f[1], "compile_s": f[2], "first_token_s": f[3],
            "to_first_token_s": f[4],
            "prompt_tokens": int(b.group(1)), "prompt_s": float(b.group(2)),
            "prompt_tok_s": float(b.group(3)),
            "gen_tokens": int(b.group(4)), "gen_s": float(b.group(5)),
            "gen_tok_s": float(b.group(6))}


def parse_llama_stats(stderr: str) -> Optional[dict]:
    for line in reversed(stderr.splitlines()):
        if line.startswith("llama.cpp stats: "):
            s = json.loads(line[len("llama.cpp stats: "):])
            s["prompt_tok_s"] = s["prompt_tokens"] / s["prompt_s"] if s["prompt_s"] > 0 else None
            s["gen_tok_s"] = s["gen_tokens"] / s["gen_s"] if s["gen_s"] > 0 else None
            return s
    return None


def chat_prompt_text(model: Path, prompt: str) -> tuple[str, int]:
    """``prompt`` through the model's chat template (kernelforge's tokenizer
    from the GGUF metadata, the text ``kernelforge generate`` builds), and its
    token count."""
    import gguf
    from kernelforge.runtime import tokenizer as tok_mod
    reader = gguf.GGUFReader(model)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tok = tok_mod.from_gguf_metadata(meta)
    if not tok.chat_template:
        return prompt, len(tok.encode(prompt))
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True)
    return text, len(tok.encode(text))


def tail(text: str, n: int = 6) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-n:])


def run_kf(cmd: list[str], timeout: float) -> dict:
    r = timed_run(cmd, timeout)
    r["engine"] = "kernelforge"
    r["stats"] = parse_kf_stats(r["stderr"]) if r["rc"] == 0 else None
    return r


def run_llama(cmd: list[str], timeout: float) -> dict:
    r = timed_run(cmd, timeout)
    r["engine"] = "llama.cpp"
    r["stats"] = parse_llama_stats(r["stderr"]) if r["rc"] == 0 else None
    return r


def fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summarize(rows: list[dict]) -> dict:
    """Medians over ``rows`` (one run or several) of every reported number;
    None where no run has it."""
    ok = [r for r in rows if r["rc"] == 0]

    def med(get):
        vals = [v for v in (get(r) for r in ok) if v is not None]
        return statistics.median(vals) if vals else None
    s = {"runs": len(rows), "ok": len(ok),
         "spawn_to_first_byte_s": med(lambda r: r["spawn_to_first_byte_s"]),
         "spawn_to_exit_s": med(lambda r: r["spawn_to_exit_s"])}
    for k in ("import_s", "load_s", "compile_s", "first_token_s", "to_first_token_s",
              "prompt_tok_s", "gen_tok_s", "prompt_tokens", "gen_tokens"):
        s[k] = med(lambda r: (r["stats"] or {}).get(k))
    return s


def table(groups: list[tuple[str, list[dict]]], start_s: float) -> str:
    head = ("| engine | runs | import s | load s | compile s | first token s | "
            "to first token s (in process) | spawn to first token s | spawn to exit s | "
            "prompt tok/s (tokens) | generation tok/s (tokens) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for name, rows in groups:
        if not rows:
            continue
        s = summarize(rows)
        compile_s = fmt(s["compile_s"]) if rows[0]["engine"] == "kernelforge" else "n/a"

        def rate(r, n):
            if r is None:
                return "-"
            return f"{r:.1f} ({n:.0f})" if n is not None else f"{r:.1f}"
        runs = f"{s['ok']}" if s["ok"] == s["runs"] else f"{s['ok']} of {s['runs']} ok"
        lines.append(
            f"| {name} | {runs} | {fmt(s['import_s'])} | {fmt(s['load_s'])} | {compile_s} | "
            f"{fmt(s['first_token_s'])} | {fmt(s['to_first_token_s'])} | "
            f"**{fmt(s['spawn_to_first_byte_s'])}** | {fmt(s['spawn_to_exit_s'])} | "
            f"{rate(s['prompt_tok_s'], s['prompt_tokens'])} | "
            f"{rate(s['gen_tok_s'], s['gen_tokens'])} |")
    lines.append(f"| process start (`python3 -c pass`, spawn to exit) | 5 | | | | | | "
                 f"{fmt(start_s)} | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="a .gguf file for both engines (default: kernelforge's default model)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs per engine after the first (warm-up) run (default 5)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--no-llama", action="store_true", help="kernelforge only")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the raw rows here")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.max_tokens < 1:
        ap.error("--repeats and --max-tokens must be at least 1")

    if args.model is not None:
        model = Path(args.model)
        if not model.is_file():
            ap.error(f"no such file: {model}")
    else:
        from kernelforge.runtime import loader
        model = Path(loader.default_model_path())
    threads = cores()

    notes = []
    kf_cmd = kernelforge_command() + ["generate", args.prompt, "--max-tokens",
                                      str(args.max_tokens)]
    if args.model is not None:
        kf_cmd += ["--model", str(model)]
    llama_cmd = None
    if args.no_llama:
        notes.append("llama.cpp: skipped (--no-llama)")
    elif subprocess.run([sys.executable, "-c", "import llama_cpp"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL).returncode != 0:
        notes.append("llama.cpp: skipped: llama_cpp is not importable by "
                     f"{sys.executable} (tools/install_peers.sh installs it)")
    elif model.suffix != ".gguf":
        notes.append(f"llama.cpp: skipped: {model} is not a .gguf file")
    else:
        text, n_prompt = chat_prompt_text(model, args.prompt)
        n_ctx = max(512, -(-(n_prompt + args.max_tokens + 16) // 256) * 256)
        llama_cmd = [sys.executable, "-c", LLAMA_CODE, str(model), text, str(n_ctx),
                     str(threads), str(args.max_tokens)]

    print(f"model {model}; prompt {args.prompt!r} (chat template), up to {args.max_tokens} "
          f"new tokens, greedy; {threads} cores; 1 first run + {args.repeats} timed runs "
          f"per engine; load average {load_average()} (other work on these cores skews "
          f"every number, llama.cpp's most: its threads spin)", flush=True)
    start_s = process_start()

    # warm-up (first) runs; find out whether `kernelforge generate` takes --stats
    kf_first = run_kf(kf_cmd + ["--stats"], args.timeout)
    if kf_first["rc"] != 0 and "--stats" in kf_first["stderr"] and \
            "unrecognized arguments" in kf_first["stderr"]:
        notes.append("kernelforge: breakdown missing: this `kernelforge generate` has no "
                     "--stats (ran without it; wall-clock times only)")
        kf_first = run_kf(kf_cmd, args.timeout)
    else:
        kf_cmd = kf_cmd + ["--stats"]
    print(f"  kernelforge first run: rc {kf_first['rc']}, "
          f"{fmt(kf_first['spawn_to_first_byte_s'])} s to first token", flush=True)
    llama_first = None
    if llama_cmd is not None:
        llama_first = run_llama(llama_cmd, args.timeout)
        print(f"  llama.cpp first run: rc {llama_first['rc']}, "
              f"{fmt(llama_first['spawn_to_first_byte_s'])} s to first token", flush=True)

    kf_rows, llama_rows = [], []
    for i in range(args.repeats):
        kf_rows.append(run_kf(kf_cmd, args.timeout))
        if llama_cmd is not None:
            llama_rows.append(run_llama(llama_cmd, args.timeout))
        print(f"  round {i + 1}/{args.repeats}: kernelforge "
              f"{fmt(kf_rows[-1]['spawn_to_first_byte_s'])} s"
              + (f", llama.cpp {fmt(llama_rows[-1]['spawn_to_first_byte_s'])} s"
                 if llama_rows else "") + " to first token", flush=True)

    all_rows = [("kernelforge", True, kf_first)] + [("kernelforge", False, r) for r in kf_rows]
    if llama_first is not None:
        all_rows += [("llama.cpp", True, llama_first)] + [("llama.cpp", False, r)
                                                          for r in llama_rows]
    for name, _, r in all_rows:
        if r["rc"] != 0:
            why = "timed out" if r["timed_out"] else f"exit status {r['rc']}"
            notes.append(f"{name}: a run failed ({why}):\n{tail(r['stderr'])}")
            break
    kf_ok = [r for r in [kf_first] + kf_rows if r["rc"] == 0]
    if kf_ok and "--stats" in kf_cmd and any(r["stats"] is None for r in kf_ok):
        notes.append("kernelforge: breakdown missing in some runs: no `kernelforge stats:` "
                     "lines on stderr")

    print()
    groups = [("kernelforge, first run", [kf_first]),
              (f"kernelforge, median of {args.repeats}", kf_rows)]
    if llama_first is not None:
        groups += [("llama.cpp, first run", [llama_first]),
                   (f"llama.cpp, median of {args.repeats}", llama_rows)]
    print(table(groups, start_s))
    print()
    kf = summarize(kf_rows)
    if kf["spawn_to_first_byte_s"] is not None:
        t = kf["spawn_to_first_byte_s"]
        verdict = "met" if t <= GOAL_S else "NOT met"
        line = f"kernelforge spawn to first token {t:.3f} s (goal <= {GOAL_S:.0f} s: {verdict})"
        if llama_rows:
            lc = summarize(llama_rows)["spawn_to_first_byte_s"]
            if lc:
                line += f"; llama.cpp {lc:.3f} s, ratio kf/llama.cpp {t / lc:.2f}x"
        print(line)
    if llama_first is not None and llama_first["stats"]:
        print(f"llama-cpp-python {llama_first['stats']['version']}, n_threads {threads}; "
              f"prompt tok/s = prompt tokens / first token time, generation tok/s = "
              f"tokens after the first / time after the first")
    for n in notes:
        print("note: " + n)

    if args.json:
        raw = []
        for name, first, r in all_rows:
            raw.append({"engine": name, "first_run": first,
                        **{k: v for k, v in r.items() if k not in ("engine",)}})
            raw[-1]["cmd"] = [c if len(c) < 200 else c[:60] + "..." for c in r["cmd"]]
        with open(args.json, "w") as f:
            json.dump({"model": str(model), "prompt": args.prompt,
                       "max_tokens": args.max_tokens, "cores": threads,
                       "load_average_at_end": load_average(),
                       "process_start_s": start_s, "rows": raw}, f, indent=1)
        print(f"raw rows: {args.json}")
    return 0 if all(r["rc"] == 0 for _, _, r in all_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
