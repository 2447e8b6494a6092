"""``kernelforge bench-runtime``: the runtime's throughput beside its peers, in one run.

Every engine gets the same GGUF file, the same chat-prompt text, greedy
decoding and exactly ``new_tokens`` new tokens per request (eos ignored);
tok/s = new tokens of all requests / median wall time of a generate call
(prefill included). Peers run where they are installed and are reported as
not installed otherwise:

* llama-cpp-python (``tools/install_peers.sh``), 2 threads, batch 1;
* transformers ``generate`` in fp32 (needs ``accelerate`` and ``gguf``), batch 1.

The pytest-benchmark form of the same comparison is
``bench/test_runtime_bench.py``.
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from typing import Callable, Optional


def story_request(i: int) -> list[dict]:
    """The chat messages of benchmark request ``i`` (every engine gets these)."""
    return [{"role": "user", "content": f"Tell me a story about the number {i}."}]


def chat_prompts(tokenizer, n: int) -> list[str]:
    """``n`` chat prompts as text, through the model's chat template
    (``tokenizer``: the runtime's, from ``loader.load``)."""
    return [tokenizer.apply_chat_template(story_request(i), add_generation_prompt=True)
            for i in range(n)]


def median_time(fn: Callable, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kf_rate(path, prompts: list, new_tokens: int, dtype: str, quantization: Optional[str],
            repeats: int) -> float:
    from . import LLM, SamplingParams
    llm = LLM(path, dtype=dtype, quantization=quantization, max_num_seqs=max(8, len(prompts)))
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return len(prompts) * new_tokens / median_time(lambda: llm.generate(prompts, params),
                                                   repeats)


def llama_cpp_generate(path, prompt: str, new_tokens: int) -> Callable:
    """One greedy generate call of llama-cpp-python on the same file and prompt
    text, 2 threads, exactly ``new_tokens`` tokens (eos banned by logit bias)."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_threads=2, n_threads_batch=2, n_ctx=512,
                verbose=False, seed=0)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def fn():
        llm.reset()
        out = llm.create_completion(ids, max_tokens=new_tokens, temperature=0.0, top_k=1,
                                    logit_bias={llm.token_eos(): -1e9})
        if out["usage"]["completion_tokens"] != new_tokens:
            raise RuntimeError(f"llama.cpp made {out['usage']['completion_tokens']} tokens, "
                               f"not {new_tokens}")
        return out
    return fn


def llama_cpp_rate(path, prompt: str, new_tokens: int, repeats: int) -> float:
    return new_tokens / median_time(llama_cpp_generate(path, prompt, new_tokens), repeats)


def transformers_rate(path, prompt: str, new_tokens: int, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = dict(gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw).eval()
    ids = tok(prompt, return_tensors="pt").input_ids

    def fn():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, attention_mask=torch.ones_like(ids))
    return new_tokens / median_time(fn, repeats)


def add_parser(sub) -> None:
    b = sub.add_parser("bench-runtime", help="runtime tok/s beside llama.cpp and transformers "
                                             "(where installed), same prompts and file")
    b.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M Q4_1)")
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--peers", default="llama.cpp,transformers",
                   help="comma-separated peers to run where installed ('' for none)")


def cmd_bench_runtime(args) -> int:
    from pathlib import Path

    from . import loader
    if args.new_tokens < 1 or args.repeats < 1:
        print("kernelforge: --new-tokens and --repeats must be >= 1", file=sys.stderr)
        return 2
    try:
        path = loader.default_model_path() if args.model is None else Path(args.model)
    except FileNotFoundError as e:
        print(f"kernelforge: {e}", file=sys.stderr)
        return 2
    _, _, tokenizer = loader.load(path)
    prompts = chat_prompts(tokenizer, 32)
    n = args.new_tokens
    rows = []         # (engine, batch, tok/s)
    for label, dtype, quant, batch in (("kf fp32", "float32", None, 1),
                                       ("kf bf16", "bfloat16", None, 1),
                                       ("kf bf16 + int4", "bfloat16", "int4", 1),
                                       ("kf bf16", "bfloat16", None, 32)):
        rows.append((label, batch, kf_rate(path, prompts[:batch], n, dtype, quant,
                                           args.repeats)))
        print(f"{rows[-1][0]:<28} B={batch:<3} {rows[-1][2]:8.1f} tok/s", flush=True)
    peers = {p.strip() for p in args.peers.split(",") if p.strip()}
    for name, module, fn in (("llama.cpp (Q4_1, 2 threads)", "llama_cpp", llama_cpp_rate),
                             ("transformers fp32", "transformers", transformers_rate)):
        if name.split(" ")[0] not in peers:
            continue
        if importlib.util.find_spec(module) is None:
            print(f"{name:<28} B=1   not installed")
            continue
        rows.append((name, 1, fn(path, prompts[0], n, args.repeats)))
        print(f"{name:<28} B=1   {rows[-1][2]:8.1f} tok/s", flush=True)
    return 0
