"""A soak of ``kernelforge serve``: many mixed requests from concurrent clients,
some of which hang up mid-stream, over a KV cache small enough to force
preemption, with a waiting queue small enough to send 503s (clients retry).

    python3 bench/serving_soak.py                    # 1000 requests, 64 clients
    python3 bench/serving_soak.py --requests 200 --json soak.json

It passes (exit 0) when no valid request failed, no 5xx other than the
deliberate 503s came back, no KV block is held at the end (/metrics), and the
server's RSS after warm-up stays within --rss-tolerance of its first
post-warm-up sample.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai

import serving_load as load     # bench/ is this script's directory

WORDS = ("the a model token cache block batch request stream server kernel tensor "
         "attention rotary norm sample decode prefill latency memory budget").split()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line and not line.startswith("#"))}


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = load.free_port()
    cmd = [sys.executable, "-m", "kernelforge.cli", "serve", "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs),
           "--kv-cache-blocks", str(args.kv_cache_blocks), "--max-waiting", str(args.max_waiting),
           "--log-level", "warning"] + (["--model", args.model] if args.model else []) + (
               ["--dtype", args.dtype] if args.dtype else [])
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        load.wait_ready(url, timeout=300, alive=lambda: proc.poll() is None)
    except RuntimeError as e:
        proc.kill()
        raise SystemExit(f"the server did not come up: {e}") from None
    return proc, url


async def one_request(client, model, rng: random.Random, stats: dict, hang_up: float) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.choice((4, 16, 64, 160))))
    max_tokens = rng.choice((8, 24, 48, 96))
    chat = rng.random() < 0.5
    stop_after = rng.randrange(1, max_tokens) if rng.random() < hang_up else None
    kw = dict(model=model, max_tokens=max_tokens, temperature=rng.choice((0, 0.8)),
              stream=True, seed=rng.randrange(1 << 30))
    deadline = time.monotonic() + 1800         # retries after 503s: a client's patience
    while time.monotonic() < deadline:
        try:
            if chat:
                stream = await client.chat.completions.create(
                    messages=[{"role": "user", "content": prompt}], **kw)
            else:
                stream = await client.completions.create(prompt=prompt, **kw)
            n, finish = 0, None
            async for chunk in stream:
                for c in chunk.choices:
                    finish = c.finish_reason or finish
                n += 1
                if stop_after is not None and n >= stop_after:
                    await stream.close()
                    stats["disconnected"] += 1
                    return
            stats["ok" if finish in ("stop", "length") else "bad_finish"] += 1
            return
        except openai.APIStatusError as e:
            if e.status_code == 503:
                stats["503"] += 1
                await asyncio.sleep(float(e.response.headers.get("Retry-After", 1)))
                continue
            key = f"status_{e.status_code}"
            stats[key] = stats.get(key, 0) + 1
            return
        except openai.APIError as e:                # an error event inside a stream
            stats["stream_error"] += 1
            stats.setdefault("errors", []).append(str(e)[:200])
            return
    stats["gave_up"] += 1


async def soak(args, url: str, pid: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=600)
    model = (await client.models.list()).data[0].id
    rng = random.Random(args.seed)
    stats = {k: 0 for k in ("ok", "disconnected", "503", "bad_finish", "stream_error",
                            "gave_up")}
    rounds, per_round = args.rounds, args.requests // args.rounds
    rss = []
    for r in range(rounds):
        queue = [random.Random(rng.random()) for _ in range(per_round)]

        async def client_loop():
            while queue:
                await one_request(client, model, queue.pop(), stats, args.disconnect_prob)
        t = time.monotonic()
        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        rss.append(_rss_mb(pid))
        print(f"round {r + 1}/{rounds}: {per_round} requests in {time.monotonic() - t:.1f} s, "
              f"RSS {rss[-1]:.0f} MB, {dict((k, v) for k, v in stats.items() if k != 'errors')}",
              flush=True)
    return {"stats": stats, "rss_mb": rss}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default=None, help="the server's --dtype (default: its own)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--kv-cache-blocks", type=int, default=96,
                   help="small enough that long requests preempt each other")
    p.add_argument("--max-waiting", type=int, default=24)
    p.add_argument("--disconnect-prob", type=float, default=0.1)
    p.add_argument("--warmup-rounds", type=int, default=2)
    p.add_argument("--rss-tolerance", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    proc, url = start_server(args)
    try:
        t = time.monotonic()
        out = asyncio.run(soak(args, url, proc.pid))
        out["seconds"] = time.monotonic() - t
        time.sleep(1.0)
        m = _metrics(url)
    finally:
        proc.terminate()
        proc.wait(120)
    s = out["stats"]
    base = out["rss_mb"][args.warmup_rounds]
    growth = max(out["rss_mb"][args.warmup_rounds:]) / base - 1
    out.update(kv_blocks_used=m["kernelforge_kv_blocks_used"],
               preemptions=m["kernelforge_preemptions_total"], rss_growth=growth,
               args=vars(args))
    failed = {k: v for k, v in s.items() if k not in ("ok", "disconnected", "503", "errors") and v}
    checks = {"no valid request failed": not failed,
              "no KV block held at the end": m["kernelforge_kv_blocks_used"] == 0,
              f"RSS within {args.rss_tolerance:.0%} after warm-up": growth <= args.rss_tolerance,
              "the cache was small enough to preempt": m["kernelforge_preemptions_total"] > 0}
    out["checks"] = checks
    print(json.dumps({k: v for k, v in out.items() if k != "args"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
