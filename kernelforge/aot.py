"""Ahead-of-time compiles of every registered kernel for GPU targets, with
no GPU present: ``triton.compile(ASTSource(...), target=GPUTarget(...))``
yields a cubin for NVIDIA or an hsaco for AMD."""
from __future__ import annotations

import time
from dataclasses import dataclass

from .ir import dtypes as dt

TARGETS = {
    "sm_80": ("cuda", 80, 32),
    "sm_90": ("cuda", 90, 32),
    "gfx942": ("hip", "gfx942", 64),
}


@dataclass
class Result:
    op: str
    kernel: str
    spec: str
    target: str
    ok: bool
    seconds: float
    detail: str      # binary kind and size, or the error


def specializations(kdef):
    """Representative specialisations: the kernel's first example in each
    float dtype, its other examples in bf16. Tensors named in
    ``example_dtypes`` (positions, indices) keep their own dtype."""
    examples = kdef.examples or ({a: 4096 for a in kdef.static},)
    tensors = [n for n, a in kdef.signature if hasattr(a, "axes")]
    out = []
    for i, sizes in enumerate(examples):
        for d in (dt.f32, dt.bf16, dt.f16) if i == 0 else (dt.bf16,):
            dtypes = {t: kdef.example_dtypes.get(t, d) for t in tensors}
            out.append((dtypes, dict(sizes)))
    return out


def launch_specialization(fn, signature: dict):
    """``(signature, constexprs, attrs)`` for ``ASTSource`` as Triton's launcher
    specialises contiguous tensors: each tensor's last stride the constant 1,
    pointers and outer strides divisible by 16. Without this no load is known
    to be contiguous, and the compile is not the one a GPU runs."""
    import re
    sig, constexprs, attrs, last = dict(signature), {}, {}, {}
    strides = {n: re.fullmatch(r"(\w+)_stride(\d+)", n) for n in sig}
    for m in filter(None, strides.values()):
        last[m.group(1)] = max(last.get(m.group(1), -1), int(m.group(2)))
    for i, name in enumerate(fn.arg_names):
        m = strides.get(name)
        if m and int(m.group(2)) == last[m.group(1)]:
            sig[name], constexprs[name] = "constexpr", 1
        elif name.endswith("_ptr") or m:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def compile_one(kdef, dtypes, sizes, target: str, backend) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    floats = {d for n, d in dtypes.items() if d.is_float and n not in kdef.example_dtypes}
    spec = ", ".join(f"{d.name}" for d in sorted(floats, key=str)) + "".join(
        f" {a}={v}" for a, v in sizes.items())
    t0 = time.perf_counter()
    try:
        kernel = kdef.specialize(dtypes, sizes)
        mod = backend.load(kernel, interpret=False)
        fn = getattr(mod, f"{kernel.name}_kernel")
        if hasattr(mod, "_F32_DOT"):    # chosen at import from the GPU present: none here
            import triton.language as tl
            mod._F32_DOT = tl.constexpr("tf32x3" if TARGETS[target][0] == "cuda" else "ieee")
        sig, constexprs, attrs = launch_specialization(fn, mod.SIGNATURE)
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget(*TARGETS[target]),
                                  options={"num_warps": mod.NUM_WARPS})
        kind = "cubin" if "cubin" in compiled.asm else "hsaco" if "hsaco" in compiled.asm else \
            "/".join(compiled.asm)
        blob = compiled.asm.get(kind, b"")
        detail = f"{kind} {len(blob)} B"
        ok = bool(blob)
    except Exception as e:  # reported per cell; the command exits non-zero
        ok, detail = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return Result("", kdef.name, spec, target, ok, time.perf_counter() - t0, detail)


def check(targets=tuple(TARGETS), ops=None) -> list[Result]:
    from .backends import registry
    from .ops import KERNELS
    backend = registry.backends()["triton"]
    results = []
    for op, kdefs in KERNELS.items():
        if ops and op not in ops:
            continue
        for kdef in kdefs:
            for dtypes, sizes in specializations(kdef):
                for t in targets:
                    r = compile_one(kdef, dtypes, sizes, t, backend)
                    r.op = op if len(kdefs) == 1 else f"{op}:{kdef.name}"
                    results.append(r)
    return results
