"""``kernelforge serve``: the OpenAI-compatible server (uvicorn) over one engine loop.

SIGTERM or Ctrl-C drains: the listening socket closes, the requests in
flight finish (up to ``--drain-timeout`` seconds), then the process exits.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, "
                       "streaming, /metrics)")
    s.add_argument("--model", default=None,
                   help="a .gguf file or a Hugging Face directory (default: SmolLM2-135M-Instruct)")
    s.add_argument("--served-model-name", default=None,
                   help="the name clients pass as 'model' (default: the model file's name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--backend", default=None, help="eager, inductor, triton, cpp (default: per device)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): the model's own quantization and this device's fast "
                        "dtype; float32 is exact fp32, dense (docs/runtime.md, 'Fast defaults')")
    s.add_argument("--quantization", default="auto", choices=["auto", "none", "int4", "int8"],
                   help="auto (default): a Q4_0/Q4_1 GGUF as int4, Q8_0 as int8, on a CPU with "
                        "--dtype auto; none: dense")
    s.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or a plug-in device's name (default: CUDA if "
                        "available, else cpu)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="requests in the running batch")
    s.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per forward (decode rows + prefill chunks)")
    s.add_argument("--max-model-len", type=int, default=None)
    kv = s.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-blocks", type=int, default=None, help="KV-cache blocks of 16 tokens")
    kv.add_argument("--kv-cache-gb", type=float, default=None, help="KV-cache size (default 0.5)")
    s.add_argument("--api-key", default=os.environ.get("KERNELFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (env KERNELFORGE_API_KEY)")
    s.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait for the batch; more get 503 + Retry-After")
    s.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take (0: no limit)")
    s.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for requests in flight")
    s.add_argument("--log-level", default="info")


def served_name(model) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.name


def cmd_serve(args) -> int:
    import uvicorn

    from ..runtime import LLM
    from .api import build_app
    from .engine import AsyncEngine

    for name in ("max_waiting", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            print(f"kernelforge serve: --{name.replace('_', '-')} must be >= 1, got "
                  f"{getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        llm = LLM(args.model, backend=args.backend, dtype=args.dtype,
                  max_num_seqs=args.max_num_seqs, num_blocks=args.kv_cache_blocks,
                  kv_cache_gb=args.kv_cache_gb or 0.5, max_model_len=args.max_model_len,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  quantization=None if args.quantization == "none" else args.quantization,
                  device=args.device,
                  progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"kernelforge serve: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or served_name(args.model)
    app = build_app(AsyncEngine(llm, max_waiting=args.max_waiting), name, api_key=args.api_key,
                    request_timeout=args.request_timeout or None)
    print(f"kernelforge serve: '{name}' on http://{args.host}:{args.port}/v1 "
          f"on {llm.device} ({llm.pool.num_blocks} KV blocks, max_model_len "
          f"{llm.max_model_len})",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                  log_level=args.log_level,
                                  timeout_graceful_shutdown=args.drain_timeout)).run()
    return 0
