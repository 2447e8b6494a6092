"""Per-call time of the small and large ops on the two compiled CPU
backends (cpp, the default, and inductor), best of N calls, same process.

    python3 tools/compare_cpu_backends.py          # ONE=1: one thread each

A quick same-run comparison for choosing the CPU default, not a benchmark
suite (bench/ holds those, with references and peers).
"""
import torch, time, kernelforge, os
ops = kernelforge.ops
if os.environ.get("ONE"): torch.set_num_threads(1)
def best(f, n=20):
    f(); f()
    b = 1e9
    for _ in range(n):
        t = time.perf_counter(); f(); b = min(b, time.perf_counter() - t)
    return b * 1e6
cases = {}
for T, H in ((1, 576), (32, 4096), (4096, 4096)):
    x = torch.randn(T, H); w = torch.randn(H)
    cases[f"rms_norm {T}x{H}"] = lambda be, x=x, w=w: ops.rms_norm(x, w, 1e-6, backend=be)
    r = torch.randn(T, H)
    cases[f"fused_add {T}x{H}"] = lambda be, x=x, w=w, r=r: ops.fused_add_rms_norm(x.clone(), r.clone(), w, 1e-6, backend=be)
for T in (1, 4096):
    pos = torch.randint(0, 4096, (T,)); q = torch.randn(T, 9 * 64); k = torch.randn(T, 3 * 64)
    cache = torch.randn(4096, 64)
    cases[f"rotary T={T}"] = lambda be, pos=pos, q=q, k=k, cache=cache: ops.rotary_embedding(pos, q, k, 64, cache, True, backend=be)
x = torch.randn(32, 128256) * 3
cases["sample 32x128256"] = lambda be: ops.sample(x, temperature=1.0, top_k=50, top_p=0.9, seeds=torch.arange(32), backend=be)
for name, f in cases.items():
    try:
        r = {be: best(lambda: f(be), 5 if "sample" in name or "4096x" in name else 20) for be in ("inductor", "cpp")}
    except Exception as e:
        print(name, "ERR", type(e).__name__, str(e)[:200]); continue
    print(f"{name:24s} inductor {r['inductor']:10.1f} us  cpp {r['cpp']:10.1f} us  speedup {r['inductor']/r['cpp']:.2f}x")
