"""vLLM's side of tests/test_integration_vllm.py and bench/test_vllm_bench.py,
run by the Python of vLLM's own environment (tools/install_vllm_peer.sh), where
kernelforge is installed beside vLLM:

    $KF_VLLM_PYTHON tests/vllm_check.py '{"model": DIR, "dtype": "float32", ...}'
    $KF_VLLM_PYTHON tests/vllm_check.py '{..., "serve": true}'

Runs ``vllm.LLM.generate`` once (greedy, ``new_tokens`` each, eos ignored,
prompt log-probabilities on) with the kernelforge plugin loaded or not (vLLM's
``VLLM_PLUGINS``), then ``repeats`` timed calls, and prints one JSON line:
token ids, prompt log-probabilities, seconds per timed call, and the
plugin's op call counts (``kernelforge.integrations.vllm.CALLS``; the engine
runs in this process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

With ``"serve": true`` it prints that line after the first call, then times one
generate call per ``run`` line read from stdin and answers
``{"s": seconds, "calls": ..., "seconds": ...}`` (the plugin's counts and,
with KERNELFORGE_VLLM_TIMING=1, its seconds in each op during that call), until
``quit``: the bench alternates two such processes, with and without the plugin.
"""
import json
import os
import sys
import time


def main(cfg: dict) -> dict:
    os.environ["VLLM_PLUGINS"] = "kernelforge" if cfg["plugin"] else ""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    prompts = cfg["prompts"]
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], seed=0,
              max_model_len=cfg.get("max_model_len", 512),
              max_num_seqs=max(len(prompts), 1),
              enforce_eager=cfg.get("enforce_eager", False),
              # on CPU, the share of host memory vLLM may claim for its KV cache
              gpu_memory_utilization=cfg.get("memory", 0.1))
    params = SamplingParams(temperature=0.0, max_tokens=cfg["new_tokens"], ignore_eos=True,
                            prompt_logprobs=0 if cfg.get("prompt_logprobs", True) else None)
    from kernelforge.integrations import vllm as plugin
    plugin.CALLS.clear()
    outs = llm.generate(prompts, params, use_tqdm=False)
    calls = dict(plugin.CALLS)
    times = []
    fast = SamplingParams(temperature=0.0, max_tokens=cfg["new_tokens"], ignore_eos=True)
    for _ in range(cfg.get("repeats", 0)):
        t = time.perf_counter()
        llm.generate(prompts, fast, use_tqdm=False)
        times.append(time.perf_counter() - t)
    logprobs = []
    for o in outs:
        row = []
        for tok, d in zip(o.prompt_token_ids, o.prompt_logprobs or []):
            row.append(None if d is None else d[tok].logprob)
        logprobs.append(row)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "prompt_logprobs": logprobs, "calls": calls, "times": times,
              "replaced": sorted(plugin._REGISTERED)}
    if cfg.get("serve"):
        print("KF_RESULT " + json.dumps(result), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            plugin.CALLS.clear()
            plugin.SECONDS.clear()
            t = time.perf_counter()
            llm.generate(prompts, fast, use_tqdm=False)
            took = time.perf_counter() - t
            print("KF_RESULT " + json.dumps({"s": took, "calls": dict(plugin.CALLS),
                                             "seconds": dict(plugin.SECONDS)}), flush=True)
    return result


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    result = main(cfg)
    if not cfg.get("serve"):
        print("KF_RESULT " + json.dumps(result), flush=True)
