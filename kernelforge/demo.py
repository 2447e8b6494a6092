"""``kernelforge demo``: the ops on every backend available here (RMSNorm
family, rotary embeddings, attention), each one's max error against a
float64 formula, its time, and the Triton source of one kernel."""
from __future__ import annotations

import time
import warnings

import torch

import kernelforge
from kernelforge.backends import registry

from .kernels import attention
from .tolerance import assert_close, tolerance


def _ref_rms(x, w, eps, offset):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + offset)


def _ref_rotary(pos, x, cache):
    """NeoX rotation as complex multiplication, float64; x is [T, H, D]."""
    c = cache.double()[pos]
    h = c.shape[1] // 2
    z = torch.complex(x[..., :h].double(), x[..., h:].double()) * \
        torch.complex(c[:, None, :h], c[:, None, h:])
    return torch.cat([z.real, z.imag], -1)


def _ref_causal_attention(q, k, v):
    """One sequence, causal, float64; q [S, Hq, D], k and v [S, Hkv, D].
    Returns the output and softmax |V|, the scale of the error the op's
    ``round_p`` may add (docs/tolerance.md)."""
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(g, 1))
    s = s * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(q.shape[0], q.shape[0], dtype=torch.bool,
                                 device=q.device).triu(1), float("-inf"))
    p, vv = torch.softmax(s, -1), v.double().repeat_interleave(g, 1)
    return torch.einsum("hqk,khd->qhd", p, vv), torch.einsum("hqk,khd->qhd", p, vv.abs())


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(rows: int = 64, hidden: int = 4096) -> int:
    # the Triton interpreter evaluates padded lanes too (0/0 there is expected and masked)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [n for n, b in registry.backends().items() if b.can_run(dev)[0]]
    print(f"kernelforge {kernelforge.__version__} demo on {dev} "
          f"(torch {torch.__version__}); default backend here: {registry.select(dev).backend.name}")
    print(f"rows={rows} hidden={hidden}; error = max |out - float64 reference|; "
          "tolerance per the dtype policy (docs/tolerance.md)\n")
    print(f"{'op':<20}{'dtype':<10}{'backend':<10}{'max err':>10}{'rtol':>10}{'time':>12}  ok")
    failed = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(rows, hidden, device=dev, dtype=dtype)
        r = torch.randn(rows, hidden, device=dev, dtype=dtype)
        w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype)
        for name in names:
            # the Triton interpreter runs kernels in numpy, one program at a time: keep it small
            xs, rs = (x[:4], r[:4]) if name == "triton" and dev.type == "cpu" else (x, r)
            reps = 1 if name == "triton" and dev.type == "cpu" else 20
            cases = {
                "rms_norm": (lambda: kernelforge.ops.rms_norm(xs, w, 1e-6, backend=name),
                             lambda: _ref_rms(xs, w, 1e-6, 0.0)),
                "fused_add_rms_norm": (
                    lambda: kernelforge.ops.fused_add_rms_norm(xs, rs, w, 1e-6, backend=name)[0],
                    lambda: _ref_rms((xs + rs), w, 1e-6, 0.0)),
            }
            if dtype != torch.float16:     # (each new dtype is another Inductor compile)
                S = 4 if name == "triton" and dev.type == "cpu" else 64
                pos = torch.randint(0, 512, (S,), device=dev)
                cache = kernelforge.rope.cos_sin_cache(64, 512, device=dev)
                qh = torch.randn(S, 8, 64, device=dev).to(dtype)
                kh, vh = (torch.randn(S, 2, 64, device=dev).to(dtype) for _ in range(2))
                cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
                cases["rotary_embedding"] = (
                    lambda: kernelforge.ops.rotary_embedding(pos, qh, None, 64, cache,
                                                             backend=name)[0],
                    lambda: _ref_rotary(pos, qh, cache))
                cases["attention"] = (
                    lambda: kernelforge.ops.attention(qh, kh, vh, cu, cu, backend=name),
                    lambda: _ref_causal_attention(qh, kh, vh))
            for op, (run, ref) in cases.items():
                y, y_ref = run(), ref()
                tol, extra = tolerance(dtype), None
                if op == "attention":
                    y_ref, mag = y_ref
                    if attention.rounds_p(None, dtype, registry.backends()[name]):
                        extra = tol.rtol * mag      # p rounded to dtype: its allowance
                err = (y.double() - y_ref).abs().max().item()
                secs = _time(run, reps)
                try:
                    assert_close(y, y_ref, dtype, op, extra=extra)
                    ok = True
                except AssertionError:
                    ok = False
                failed += not ok
                print(f"{op:<20}{str(dtype)[6:]:<10}{name:<10}{err:>10.2e}{tol.rtol:>10.1e}"
                      f"{secs * 1e6:>10.1f}us  {'yes' if ok else 'NO'}")
    from . import dispatch
    from .kernels.rmsnorm import rms_norm_fwd
    from .cli import example_args
    print("\nGenerated Triton for rms_norm (bf16, hidden 4096):\n")
    print(dispatch.source(rms_norm_fwd, example_args(rms_norm_fwd, torch.bfloat16, 4096), "triton"))
    return 1 if failed else 0
