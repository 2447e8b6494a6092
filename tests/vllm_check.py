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


def layers() -> dict:
    """Each replaced layer built the way vLLM builds it, against its own
    forward_native (vLLM's reference), without an engine: the largest
    difference and the reference's largest magnitude per layer, and the calls."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from kernelforge.integrations import vllm as plugin
    plugin.register()
    from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul
    from vllm.model_executor.layers.layernorm import LayerNorm, RMSNorm
    from vllm.model_executor.layers.rotary_embedding import get_rope
    torch.manual_seed(0)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
            "rope_theta": 10000.0}
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
              "rope_theta": 500000.0}
    with set_current_vllm_config(VllmConfig()):
        made = {"LayerNorm": LayerNorm(64), "RMSNorm": RMSNorm(64),
                "GeluAndMul": GeluAndMul(approximate="tanh"), "SiluAndMul": SiluAndMul(),
                "RotaryEmbedding": get_rope(32, 128, True, None, torch.float32),
                "Llama3RotaryEmbedding": get_rope(32, 128, True, llama3, torch.float32),
                "YaRNScalingRotaryEmbedding": get_rope(32, 128, True, yarn, torch.float32)}
    out = {}
    with torch.no_grad():
        for name, layer in made.items():
            for p in layer.parameters():
                p.normal_()
            x = torch.randn(5, 64)
            if "Rotary" in name:
                pos = torch.tensor([0, 5, 60, 100, 127])
                q, k = torch.randn(5, 4 * 32), torch.randn(5, 2 * 32)
                want = torch.cat(layer.forward_native(pos, q.clone(), k.clone()), -1)
                got = torch.cat(layer(pos, q.clone(), k.clone()), -1)
            elif name == "RMSNorm":
                r = torch.randn(5, 64)
                want = torch.cat(layer.forward_native(x.clone(), r.clone()), -1)
                got = torch.cat(layer(x.clone(), r.clone()), -1)
                want = torch.cat([want, layer.forward_native(x)], -1)
                got = torch.cat([got, layer(x)], -1)
            else:
                want, got = layer.forward_native(x), layer(x)
            out[name] = {"class": type(layer).__name__, "diff": (got - want).abs().max().item(),
                         "scale": want.abs().max().item()}
    return {"layers": out, "calls": dict(plugin.CALLS)}


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
    result = layers() if cfg.get("layers") else main(cfg)
    if not cfg.get("serve"):
        print("KF_RESULT " + json.dumps(result), flush=True)
