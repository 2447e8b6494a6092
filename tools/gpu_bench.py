#!/usr/bin/env python3
"""GPU benchmark of the RMSNorm family, rotary embeddings and attention:
kernelforge's Triton lowering against torch peers and the card's measured
copy bandwidth.

    python3 tools/gpu_bench.py            (tools/gpu_check.sh runs it as its last step)

Times with ``triton.testing.do_bench`` (median of its repetitions; it
flushes L2 between calls): a large device copy (the measured HBM bandwidth),
then kernelforge ``backend="triton"`` at 4096x4096 bf16 and fp32 and
``fused_add_rms_norm`` bf16, with ``torch.nn.functional.rms_norm`` and a
``torch.compile``'d formula as peers; then ``rotary_embedding`` (T = 64 and
4096 tokens, 32 query heads, 8 key heads, head size 128, full rotary, fp32
cos/sin cache of 8192 positions; bf16 and fp32) on Triton out of place, in
place, and out of place with ``check_positions=False`` (the default check is
a device min/max plus one host sync per call), against transformers' Llama
formula eager (``bench/peers.py: hf_rotary``) and ``torch.compile``'d; then
attention (bf16): causal prefill of one sequence (S=4096, 32 query and kv
heads, head size 128; the cases are in tools/gpu_attention.py) against
``F.scaled_dot_product_attention`` under the
flash backend (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``, the default
backend where flash is unavailable), in TFLOP/s over the unmasked pairs;
and paged decode (32 sequences, one query token each, context 1024 and
4096, 32 query heads, 8 kv heads, head size 128, block size 16, blocks in a
random permutation) with and without the host-side block-table check,
against gather + SDPA (``bench/peers.py: gather_sdpa``), as GB/s over q,
the used cache blocks and out. Each
case is checked once against a float64 formula
(kernelforge.tolerance.assert_close; the HF formula in bf16 against a bound
relative to its two terms, as in bench/test_rotary_bench.py) before it is
timed. Bytes moved = the op's compulsory reads + writes, once each (rotary:
query and key read and written, positions, the gathered cache rows).

Prints a table last: case, time (us), GB/s, % of the copy bandwidth, and the
goals (rms_norm 4096x4096 bf16 on Triton >= 85% of copy; rotary T=4096 bf16
on Triton >= 80% of copy; attention prefill on Triton >= 1.0x SDPA flash;
paged decode on Triton >= 80% of copy). Also written to
``$OUT/gpu_bench.txt`` when $OUT is set. Without a GPU it says so and exits 0.
Works from a plain working tree: when kernelforge is not installed it is
imported from the repository.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

# tools/ is on sys.path when this file runs as a script
from gpu_attention import attention_cases

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-6
GOAL_TRITON_BF16_FRACTION = 0.85
GOAL_ROTARY_BF16_FRACTION = 0.80       # rotary T=4096 bf16 on Triton
COPY_BYTES_EACH_WAY = 1 << 30          # a 1 GiB source, 1 GiB written
ROWS, HIDDEN = 4096, 4096
ROTARY_TOKENS = (64, 4096)
ROTARY_HQ, ROTARY_HKV, ROTARY_HEAD, ROTARY_MAX_POSITION = 32, 8, 128, 8192
DEVICE = "cuda"


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def import_kernelforge():
    """The installed package, or the one in this working tree."""
    try:
        import kernelforge
        return kernelforge
    except ImportError as e:
        log(f"kernelforge is not installed ({e}); importing it from {REPO}")
    for name in [m for m in sys.modules if m == "kernelforge" or m.startswith("kernelforge.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "kernelforge", REPO / "kernelforge" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernelforge")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernelforge"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: no GPU: torch.cuda.is_available() is False (torch "
              f"{torch.__version__}); nothing to measure. Run this on a machine with an "
              "NVIDIA (or ROCm) GPU.", flush=True)
        return 0
    try:
        import triton
        from triton.testing import do_bench
    except Exception as e:  # noqa: BLE001
        print(f"gpu_bench: triton is not importable ({type(e).__name__}: {e}); cannot time.")
        return 2

    # the defaults the engines see: no test-suite block cap, no forced backend
    for var in ("KERNELFORGE_TRITON_MAX_BLOCK", "KERNELFORGE_BACKEND"):
        if os.environ.pop(var, None) is not None:
            log(f"unset {var} for the benchmark")
    kernelforge = import_kernelforge()
    from kernelforge.tolerance import assert_close
    import torch.nn.functional as F

    dev = torch.device(DEVICE)
    card = torch.cuda.get_device_name()
    log(f"card: {card}; torch {torch.__version__}, triton {triton.__version__}, "
        f"kernelforge from {Path(kernelforge.__file__).parent}")

    def median_ms(fn) -> float:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    rows: list[dict] = []
    failures: list[str] = []

    # -- the card's copy bandwidth --------------------------------------------------
    n = COPY_BYTES_EACH_WAY // 4
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    if not torch.equal(dst, src):
        failures.append("copy")
    t = median_ms(lambda: dst.copy_(src))
    copy_gbps = 2 * COPY_BYTES_EACH_WAY / (t * 1e-3) / 1e9
    rows.append({"case": f"copy {COPY_BYTES_EACH_WAY / 2**30:g} GiB fp32 (read + write)",
                 "ms": t, "gbps": copy_gbps})
    log(f"copy: {t * 1e3:.1f} us, {copy_gbps:.0f} GB/s")
    del src, dst
    torch.cuda.empty_cache()

    # -- implementations ------------------------------------------------------------
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from peers import formula

    def ref_rms(x, w):
        x64 = x.double()
        return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + EPS) * w.double()

    def graph_ms(fn) -> float:
        """Device time alone: the call replayed from a CUDA graph (no host
        overhead). Only for calls without host syncs (nan if capture fails)."""
        try:
            from triton.testing import do_bench_cudagraph
            return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))
        except Exception as e:  # noqa: BLE001
            log(f"CUDA graph timing failed: {type(e).__name__}: {str(e)[:400]}")
            torch.cuda.synchronize()
            return float("nan")

    def run_case(name, fn, refs, dtype, nbytes, goal=None, check=None, graph=False):
        try:
            got = fn()                       # compiles (Triton / Inductor) outside timing
            got = got if isinstance(got, tuple) else (got,)
            for i, (a, ref) in enumerate(zip(got, refs)):
                if check is not None:        # check(i, actual, reference, what) raises
                    check(i, a, ref, f"{name} output {i}")
                else:
                    assert_close(a, ref, dtype, f"{name} output {i}")
            ok = "ok"
        except Exception as e:  # noqa: BLE001  a broken case is reported, not fatal
            log(f"{name}: FAILED check: {type(e).__name__}: {str(e)[:300]}")
            failures.append(name)
            rows.append({"case": name, "ms": float("nan"), "gbps": float("nan"),
                         "note": "WRONG RESULT / ERROR, not timed"})
            return
        ms = median_ms(fn)
        gbps = nbytes / (ms * 1e-3) / 1e9
        note = ""
        if goal is not None:
            frac = gbps / copy_gbps
            note = f"goal >= {goal:.0%} of copy: {'met' if frac >= goal else 'MISSED'}"
        rows.append({"case": name, "ms": ms, "gbps": gbps, "note": note, "check": ok,
                     "graph_ms": graph_ms(fn) if graph else float("nan")})
        log(f"{name}: {ms * 1e3:.1f} us, {gbps:.0f} GB/s")

    ops = kernelforge.ops
    m, hidden = ROWS, HIDDEN
    g = torch.Generator(device=dev).manual_seed(0)
    # KF_GPU_ONLY=attention times attention alone (device time is scarce on a lent card)
    only = os.environ.get("KF_GPU_ONLY", "")
    for dname, dtype in (() if only == "attention" else
                         (("bf16", torch.bfloat16), ("fp32", torch.float32))):
        x = torch.randn(m, hidden, device=dev, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(hidden, device=dev, generator=g)).to(dtype)
        refs = (ref_rms(x, w),)
        nbytes = 2 * x.numel() * x.element_size() + w.numel() * w.element_size()
        grp = f"rms_norm {m}x{hidden} {dname}"
        compiled = torch.compile(formula, fullgraph=True, dynamic=False)
        run_case(f"{grp} | kf triton", lambda: ops.rms_norm(x, w, EPS, backend="triton"),
                 refs, dtype, nbytes, goal=GOAL_TRITON_BF16_FRACTION if dname == "bf16" else None,
                 graph=True)
        run_case(f"{grp} | torch F.rms_norm", lambda: F.rms_norm(x, (hidden,), w, EPS),
                 refs, dtype, nbytes, graph=True)
        run_case(f"{grp} | torch.compile formula", lambda: compiled(x, w), refs, dtype, nbytes,
                 graph=True)
        del x, w, refs

    if only != "attention":
        fused_cases(ops, run_case, ref_rms, dev, g)

    # -- rotary embeddings ----------------------------------------------------------
    rotary_groups = []
    try:
        if only != "attention":
            rotary_groups = rotary_cases(kernelforge, run_case, dev, g)
    except Exception as e:  # noqa: BLE001  the RMSNorm rows above still get printed
        log(f"rotary: FAILED to set up: {type(e).__name__}: {str(e)[:300]}")
        failures.append("rotary set-up")
    torch.cuda.empty_cache()

    # -- attention ------------------------------------------------------------------
    attention_groups, attention_goals = [], []
    try:
        attention_groups, attention_goals = attention_cases(kernelforge, run_case, rows, dev, g,
                                                            log=log)
    except Exception as e:  # noqa: BLE001  the rows above still get printed
        log(f"attention: FAILED to set up: {type(e).__name__}: {str(e)[:300]}")
        failures.append("attention set-up")
    torch.cuda.empty_cache()

    # -- sampling -------------------------------------------------------------------
    sampling_groups = []
    try:
        if only != "attention":
            sampling_groups = sampling_cases(kernelforge, run_case, dev, g)
    except Exception as e:  # noqa: BLE001
        log(f"sampling: FAILED to set up: {type(e).__name__}: {str(e)[:300]}")
        failures.append("sampling set-up")
    torch.cuda.empty_cache()

    # -- the table, last ------------------------------------------------------------
    lines = [f"GPU benchmark: {card} (torch {torch.__version__}, triton {triton.__version__}); "
             "times are do_bench medians; GB/s = compulsory bytes / time",
             "graph (us): the same call replayed from a CUDA graph (device time, no host "
             "overhead), for calls without host syncs",
             f"{'case':<52} {'time (us)':>10} {'graph (us)':>10} {'GB/s':>8} {'% copy':>7}  note"]
    for row in rows:
        pct = 100 * row["gbps"] / copy_gbps
        gr = row.get("graph_ms", float("nan"))
        gr = f"{gr * 1e3:10.1f}" if gr == gr else f"{'-':>10}"
        lines.append(f"{row['case']:<52} {row['ms'] * 1e3:10.1f} {gr} {row['gbps']:8.0f} "
                     f"{pct:6.1f}%  {row.get('note', '')}")
    by = {row["case"]: row for row in rows}
    for grp in (f"rms_norm {m}x{hidden} bf16", f"rms_norm {m}x{hidden} fp32",
                f"fused_add_rms_norm {m}x{hidden} bf16", *rotary_groups, *attention_groups,
                *sampling_groups):
        kf = by.get(f"{grp} | kf triton")
        if not kf or kf["ms"] != kf["ms"]:
            continue
        peers = [(k.split(" | ")[1], v) for k, v in by.items()
                 if k.startswith(grp + " | ") and not k.endswith("kf triton") and v["ms"] == v["ms"]]
        lines.append(f"{grp}: kf triton speed-up " +
                     ", ".join(f"vs {p}: {v['ms'] / kf['ms']:.2f}x" for p, v in peers))
    if rotary_groups:
        lines.append(f"rotary: {ROTARY_HQ} query heads, {ROTARY_HKV} key heads, head size "
                     f"{ROTARY_HEAD}, full rotary, fp32 cos/sin cache [{ROTARY_MAX_POSITION}, "
                     f"{ROTARY_HEAD}], random positions; 'kf triton' checks positions (device "
                     "min/max + one host sync per call), 'no pos check' passes "
                     "check_positions=False")
    lines.extend(attention_goals)
    lines.append(f"card: {card}")
    if failures:
        lines.append(f"FAILED checks: {', '.join(failures)}")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_bench.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log(f"table written to {path}")
    return 1 if failures else 0


def fused_cases(ops, run_case, ref_rms, dev, g) -> None:
    """fused_add_rms_norm (bf16) on Triton against torch add + F.rms_norm and
    the compiled formula."""
    import torch
    import torch.nn.functional as F
    from peers import fused_formula
    m, hidden, dtype = ROWS, HIDDEN, torch.bfloat16
    x = torch.randn(m, hidden, device=dev, generator=g).to(dtype)
    r = torch.randn(m, hidden, device=dev, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=dev, generator=g)).to(dtype)
    s = (x.double() + r.double()).to(dtype)
    refs = (ref_rms(s, w), s)
    nbytes = 4 * x.numel() * x.element_size() + w.numel() * w.element_size()
    grp = f"fused_add_rms_norm {m}x{hidden} bf16"
    compiled_fused = torch.compile(fused_formula, fullgraph=True, dynamic=False)

    def add_then_f():
        t_ = x + r
        return F.rms_norm(t_, (hidden,), w, EPS), t_

    run_case(f"{grp} | kf triton",
             lambda: ops.fused_add_rms_norm(x, r, w, EPS, backend="triton"), refs, dtype, nbytes)
    run_case(f"{grp} | torch add + F.rms_norm", add_then_f, refs, dtype, nbytes)
    run_case(f"{grp} | torch.compile formula", lambda: compiled_fused(x, r, w), refs, dtype,
             nbytes)


def rotary_cases(kernelforge, run_case, dev, gen) -> list:
    """Time ``rotary_embedding`` on Triton against the HF formula, eager and
    compiled, for ROTARY_TOKENS x (bf16, fp32); returns the group names."""
    import torch
    from kernelforge.rope import cos_sin_cache
    from kernelforge.tolerance import assert_close, tolerance
    from peers import hf_rotary

    ops, D = kernelforge.ops, ROTARY_HEAD
    cache = cos_sin_cache(D, ROTARY_MAX_POSITION, 10000.0, device=dev)

    def ref_rotary(pos, x):
        """NeoX RoPE in float64 (full rotary)."""
        T = pos.shape[0]
        x64 = x.double().reshape(T, -1, D)
        c = cache.double()[pos]
        cos, sin = c[:, None, : D // 2], c[:, None, D // 2:]
        x1, x2 = x64[..., : D // 2], x64[..., D // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).reshape(x.shape)

    def hf_check(dtype, pos, xs):
        """The HF formula rounds cos, sin, both products and the sum to the input
        dtype: bf16 is held to 2 x rtol times |x1 cos| + |x2 sin| (bench/test_rotary_bench.py)."""
        def check(i, a, ref, what):
            if dtype == torch.float32:
                assert_close(a, ref, dtype, what)
                return
            T = pos.shape[0]
            m = xs[i].double().reshape(T, -1, D).abs()
            c = cache.double()[pos].abs()
            cos, sin = c[:, None, : D // 2], c[:, None, D // 2:]
            m1, m2 = m[..., : D // 2], m[..., D // 2:]
            mag = torch.cat((m1 * cos + m2 * sin, m2 * cos + m1 * sin), -1).reshape(a.shape)
            tol = tolerance(dtype)
            err = (a.double() - ref).abs()
            bad = err > tol.atol + 2 * tol.rtol * mag
            if bool(bad.any()) or not bool(torch.isfinite(a).all()):
                raise AssertionError(f"{what}: {int(bad.sum())} elements beyond 2 x rtol x "
                                     f"(|x1 cos| + |x2 sin|); max error {err.max().item():.3e}")
        return check

    groups = []
    for dname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        hf_compiled = torch.compile(hf_rotary, fullgraph=True, dynamic=False)
        for T in ROTARY_TOKENS:
            pos = torch.randint(0, ROTARY_MAX_POSITION, (T,), device=dev, generator=gen)
            q = torch.randn(T, ROTARY_HQ * D, device=dev, generator=gen).to(dtype)
            k = torch.randn(T, ROTARY_HKV * D, device=dev, generator=gen).to(dtype)
            qi, ki = q.clone(), k.clone()            # rotated in place, again on every call
            refs = (ref_rotary(pos, q), ref_rotary(pos, k))
            nbytes = (2 * (q.numel() + k.numel()) * q.element_size()
                      + pos.numel() * pos.element_size() + T * D * cache.element_size())
            grp = f"rotary T={T} {dname}"
            groups.append(grp)
            goal = GOAL_ROTARY_BF16_FRACTION if (dname == "bf16" and T == 4096) else None
            run_case(f"{grp} | kf triton",
                     lambda: ops.rotary_embedding(pos, q, k, D, cache, backend="triton"),
                     refs, dtype, nbytes, goal=goal)
            run_case(f"{grp} | kf triton in place",
                     lambda: ops.rotary_embedding(pos, qi, ki, D, cache, inplace=True,
                                                  backend="triton"),
                     refs, dtype, nbytes, goal=goal)
            run_case(f"{grp} | kf triton no pos check",
                     lambda: ops.rotary_embedding(pos, q, k, D, cache, check_positions=False,
                                                  backend="triton"),
                     refs, dtype, nbytes, goal=goal, graph=True)
            check = hf_check(dtype, pos, (q, k))
            run_case(f"{grp} | HF formula eager", lambda: hf_rotary(pos, q, k, cache, D),
                     refs, dtype, nbytes, check=check)
            run_case(f"{grp} | torch.compile HF formula",
                     lambda: hf_compiled(pos, q, k, cache, D), refs, dtype, nbytes, check=check)
            del pos, q, k, qi, ki, refs
    return groups


SAMPLE_B, SAMPLE_V, SAMPLE_TOP_K, SAMPLE_TOP_P = 32, 128256, 50, 0.9


def sampling_cases(kernelforge, run_case, dev, gen) -> list:
    """``sample`` on Triton (B=32, V=128256, fp32, per-request top_k=50 and
    top_p=0.9, seeds) against vLLM's sort-based torch sampler (goal >= 10x).
    Checked: every drawn token lies in the float64 kept set."""
    import torch
    from peers import torch_sort_sample

    B, V = SAMPLE_B, SAMPLE_V
    logits = torch.randn(B, V, device=dev, generator=gen) * 3
    k = torch.full((B,), SAMPLE_TOP_K, dtype=torch.int64, device=dev)
    p = torch.full((B,), SAMPLE_TOP_P, device=dev)
    x = logits.double()
    vals, order = torch.sort(x, dim=-1, descending=True)
    keep = x >= vals[:, SAMPLE_TOP_K - 1:SAMPLE_TOP_K]
    w = torch.where(keep, torch.exp(x - x.max(-1, keepdim=True).values), 0.0)
    w = w / w.sum(-1, keepdim=True)
    ws = w.gather(1, order)
    above = torch.empty_like(w).scatter_(1, order, ws.cumsum(-1) - ws)
    kept = keep & (above < SAMPLE_TOP_P)

    def check(i, a, ref, what):
        if a.shape != (B,) or not bool(kept[torch.arange(B, device=dev), a].all()):
            raise AssertionError(f"{what}: a token outside the top-k/top-p kept set")

    seeds = torch.arange(B, device=dev)
    grp = f"sample B={B} V={V} fp32"
    nbytes = logits.numel() * 4
    run_case(f"{grp} | kf triton",
             lambda: kernelforge.ops.sample(logits, temperature=1.0, top_k=k, top_p=p,
                                            seeds=seeds, offsets=0, backend="triton"),
             (None,), torch.float32, nbytes, check=check)
    run_case(f"{grp} | kf triton no validate",
             lambda: kernelforge.ops.sample(logits, temperature=1.0, top_k=k, top_p=p,
                                            seeds=seeds, offsets=0, validate=False,
                                            backend="triton"),
             (None,), torch.float32, nbytes, check=check, graph=True)
    gen2 = torch.Generator(device=dev).manual_seed(0)
    run_case(f"{grp} | torch sort-based", lambda: torch_sort_sample(logits, k, p, gen2),
             (None,), torch.float32, nbytes, check=check)
    return [grp]


if __name__ == "__main__":
    sys.exit(main())
