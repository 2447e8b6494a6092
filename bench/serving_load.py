"""Load generator for any OpenAI-compatible server (``kernelforge serve``,
``vllm serve``), through the real ``openai.AsyncOpenAI`` client.

    python bench/serving_load.py --base-url http://127.0.0.1:8000/v1 --model NAME \\
        --concurrency 1 8 32 64 --requests 64 --max-tokens 64 --json out.json

For each concurrency C, C clients each send streamed requests back to back
(``stream=True, stream_options={"include_usage": True}``, temperature 0,
``ignore_eos`` so every request makes exactly ``max_tokens`` tokens) until
``--requests`` have been sent, and per request it measures:

* TTFT: send to the first chunk that carries text;
* ITL: the gaps between later chunks that carry text (a server streams one
  token per chunk unless it batches them: ``tokens_per_chunk`` shows which);
* output tokens (the usage chunk; the count of text chunks if none came);
* errors, by HTTP status or exception kind.

A level reports req/s and output tok/s (completed requests over the level's
wall time), p50/p99/mean of TTFT, ITL, TPOT and latency, and error counts.
``--disconnect-prob p`` (a soak) makes a client close its stream early, at
a random chunk, with probability p; those are counted as ``disconnected``,
not as errors, and left out of the latency percentiles.

Prompts are made from a seed (``make_prompts``), mixed in length, so every
server sees the same ones. Imports only the standard library and ``openai``;
the pytest bench (bench/test_serving_bench.py) calls ``run_level``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Optional

# words the prompts are drawn from (plain English, so a tokenizer sees ordinary text)
WORDS = (
    "the a river mountain city night morning garden quiet old young light dark "
    "story number engine road window letter music friend stone water fire wind "
    "small large bright slow quick careful strange simple ancient modern happy "
    "walks runs sings builds finds keeps opens closes remembers forgets carries "
    "under over beside through across before after because while although "
    "teacher farmer sailor painter doctor child machine bridge forest island "
    "winter summer autumn spring bread coffee paper clock door key map lamp "
    "and but or so then when where which who with without into from toward"
).split()


def make_prompts(n: int, seed: int = 0, min_words: int = 8, max_words: int = 128) -> list[str]:
    """``n`` prompts, deterministic in ``seed``: word counts log-uniform in
    [min_words, max_words] (many short prompts, some long ones), words from WORDS."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = int(round(math.exp(rng.uniform(math.log(min_words), math.log(max_words)))))
        body = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(f"Request {i}. Continue this text: {body}")
    return out


@dataclass
class RequestResult:
    index: int
    ok: bool = False
    disconnected: bool = False
    error: Optional[str] = None        # HTTP status ("500") or exception kind ("connection")
    ttft: Optional[float] = None       # seconds to the first chunk with text
    itls: list = field(default_factory=list)   # seconds between later chunks with text
    latency: Optional[float] = None    # seconds from send to the end of the stream
    output_tokens: int = 0             # from usage; text chunks when no usage came
    chunks: int = 0                    # chunks with text
    usage_seen: bool = False


def percentile(values: list, q: float) -> float:
    """The q-th percentile (0-100), linear between order statistics (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(values: list) -> dict:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": (sum(values) / len(values)) if values else float("nan"), "n": len(values)}


def _error_kind(exc: BaseException) -> str:
    import openai
    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code)
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return type(exc).__name__


async def one_request(client, model: str, prompt: str, index: int, *, max_tokens: int,
                      api: str = "completions", ignore_eos: bool = True,
                      cut_after: Optional[int] = None) -> RequestResult:
    """Send one streamed request and time its chunks; ``cut_after``: close the
    stream after that many text chunks (a client that goes away)."""
    res = RequestResult(index)
    kw = dict(model=model, max_tokens=max_tokens, temperature=0.0, stream=True,
              stream_options={"include_usage": True},
              extra_body={"ignore_eos": True} if ignore_eos else None)
    t0 = time.perf_counter()
    last = None
    try:
        if api == "chat":
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], **kw)
        else:
            stream = await client.completions.create(prompt=prompt, **kw)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens
                res.usage_seen = True
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            text = c.delta.content if api == "chat" else c.text
            if not text:                  # role-only or empty chunks carry no token
                continue
            res.chunks += 1
            if last is None:
                res.ttft = now - t0
            else:
                res.itls.append(now - last)
            last = now
            if cut_after is not None and res.chunks >= cut_after:
                await stream.close()
                res.disconnected = True
                break
        res.latency = time.perf_counter() - t0
        if not res.usage_seen:
            res.output_tokens = res.chunks
        res.ok = not res.disconnected
    except Exception as e:  # noqa: BLE001  (every failure is counted by kind)
        res.error = _error_kind(e)
        res.latency = time.perf_counter() - t0
    return res


def make_client(base_url: str, api_key: str = "EMPTY", timeout: float = 600.0):
    import openai
    # no retries: a retried request would hide an error and distort its latency
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                              timeout=timeout)


async def run_level_async(base_url: str, model: str, prompts: list, *, concurrency: int,
                          requests: int, max_tokens: int, api: str = "completions",
                          ignore_eos: bool = True, disconnect_prob: float = 0.0,
                          seed: int = 0, api_key: str = "EMPTY",
                          timeout: float = 600.0) -> dict:
    """``requests`` requests from ``concurrency`` clients sending back to back;
    request i gets ``prompts[i % len(prompts)]``. Returns the level's summary
    (``summarize``) with the per-request results under ``"requests"``."""
    client = make_client(base_url, api_key, timeout)
    next_index = 0
    results: list[RequestResult] = []

    async def worker():
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            # per-request generator: the same cuts whatever the interleaving
            rng = random.Random(seed * 1_000_003 + i)
            cut = None
            if disconnect_prob > 0 and rng.random() < disconnect_prob:
                cut = rng.randint(1, max(1, max_tokens - 1))
            results.append(await one_request(client, model, prompts[i % len(prompts)], i,
                                             max_tokens=max_tokens, api=api,
                                             ignore_eos=ignore_eos, cut_after=cut))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return summarize(results, wall, concurrency=concurrency, max_tokens=max_tokens)


def run_level(*args, **kw) -> dict:
    """``run_level_async`` from synchronous code (its own event loop)."""
    return asyncio.run(run_level_async(*args, **kw))


def summarize(results: list, wall_s: float, *, concurrency: int, max_tokens: int) -> dict:
    done = [r for r in results if r.ok]
    cut = [r for r in results if r.disconnected]
    errors: dict = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in done)
    chunks = sum(r.chunks for r in done)
    # time per output token after the first, per request (the server's decode pace)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done
            if r.ttft is not None and r.output_tokens > 1]
    return {
        "concurrency": concurrency, "requests": len(results), "max_tokens": max_tokens,
        "completed": len(done), "disconnected": len(cut),
        "failed": sum(errors.values()), "errors": errors,
        # with ignore_eos every completed request should make max_tokens tokens
        "short_outputs": sum(1 for r in done if r.output_tokens != max_tokens),
        "usage_missing": sum(1 for r in done if not r.usage_seen),
        "wall_s": wall_s,
        "req_s": len(done) / wall_s if wall_s > 0 else float("nan"),
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else float("nan"),
        "tokens_per_chunk": out_tokens / chunks if chunks else float("nan"),
        "ttft_s": _stats([r.ttft for r in done if r.ttft is not None]),
        "itl_s": _stats([x for r in done for x in r.itls]),
        "tpot_s": _stats(tpot),
        "latency_s": _stats([r.latency for r in done]),
        "requests_detail": [asdict(r) for r in results],
    }


def json_safe(x):
    """NaN and infinities as null (files stay strict JSON); floats rounded to
    the microsecond's digits, which keeps per-request timings small."""
    if isinstance(x, float):
        return round(x, 6) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def cpu_name() -> Optional[str]:
    """This machine's CPU model (/proc/cpuinfo), for the results' meta: the charts
    of ``kernelforge report`` name the machine a run was measured on."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def free_port() -> int:
    """A loopback port nobody listens on now (for a server about to start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def root_url(base_url: str) -> str:
    """The server's root (where /health is) from its OpenAI base URL (…/v1)."""
    b = base_url.rstrip("/")
    return b[:-3] if b.endswith("/v1") else b


def _get(url: str, api_key: Optional[str], timeout: float = 5.0):
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def wait_ready(base_url: str, timeout: float = 600.0, api_key: Optional[str] = None,
               alive=lambda: True) -> float:
    """Poll ``/health`` until it answers 200; seconds waited. ``alive()`` false
    (the server process ended) or ``timeout`` passed: RuntimeError."""
    t0 = time.monotonic()
    url = root_url(base_url) + "/health"
    while True:
        try:
            if _get(url, api_key)[0] == 200:
                return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        if not alive():
            raise RuntimeError(f"the server ended before {url} answered")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(1.0)


def served_models(base_url: str, api_key: Optional[str] = None) -> list[str]:
    """The model ids ``/v1/models`` lists."""
    _, body = _get(base_url.rstrip("/") + "/models", api_key)
    return [m["id"] for m in json.loads(body)["data"]]


def level_line(lv: dict, label: str = "") -> str:
    """One table row for a level (milliseconds for latencies)."""
    ms = lambda s: f"{s * 1e3:8.1f}"  # noqa: E731
    err = ",".join(f"{k}:{v}" for k, v in sorted(lv["errors"].items())) or "-"
    return (f"{label:<12} C={lv['concurrency']:<3} {lv['completed']:>4}/{lv['requests']:<4} "
            f"{lv['req_s']:7.2f} req/s {lv['output_tok_s']:8.1f} tok/s  TTFT p50 "
            f"{ms(lv['ttft_s']['p50'])} p99 {ms(lv['ttft_s']['p99'])}  ITL p50 "
            f"{ms(lv['itl_s']['p50'])} p99 {ms(lv['itl_s']['p99'])} ms  "
            f"cut {lv['disconnected']} err {err}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serving_load.py",
                                description="streamed load against an OpenAI-compatible server")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="model id (default: the first /v1/models lists)")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at eos (default: ignore_eos, fixed output length)")
    p.add_argument("--disconnect-prob", type=float, default=0.0,
                   help="probability that a client closes its stream early (soak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-words", type=int, default=8)
    p.add_argument("--max-words", type=int, default=128)
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed requests (at the first concurrency) before the levels")
    p.add_argument("--wait", type=float, default=0.0,
                   help="wait up to this many seconds for /health first")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--details", action="store_true",
                   help="keep every request's timings in the JSON")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not 0.0 <= args.disconnect_prob <= 1.0 or args.requests < 1 or args.max_tokens < 1:
        print("serving_load.py: need 0 <= --disconnect-prob <= 1, --requests and "
              "--max-tokens >= 1", file=sys.stderr)
        return 2
    if args.wait:
        wait_ready(args.base_url, args.wait, args.api_key)
    model = args.model or served_models(args.base_url, args.api_key)[0]
    prompts = make_prompts(args.requests, args.seed, args.min_words, args.max_words)
    common = dict(max_tokens=args.max_tokens, api=args.api, ignore_eos=args.ignore_eos,
                  seed=args.seed, api_key=args.api_key, timeout=args.timeout)
    if args.warmup:
        run_level(args.base_url, model, prompts, concurrency=args.concurrency[0],
                  requests=args.warmup, **common)
    levels = []
    for c in args.concurrency:
        lv = run_level(args.base_url, model, prompts, concurrency=c, requests=args.requests,
                       disconnect_prob=args.disconnect_prob, **common)
        if not args.details:
            lv.pop("requests_detail")
        levels.append(lv)
        print(level_line(lv), flush=True)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("json", "api_key")}
        meta.update(model=model, time=time.strftime("%Y-%m-%dT%H:%M:%S"), cpu=cpu_name())
        with open(args.json, "w") as f:
            json.dump(json_safe({"meta": meta, "levels": levels}), f, indent=1)
    return 1 if any(lv["failed"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
