"""What the Triton compiler makes of the attention kernels for a GPU target,
with no GPU present: registers, spills and shared memory (ptxas -v), and the
tensor-core instructions in the SASS (wgmma on sm_90, mma elsewhere).

    python3 tools/triton_static_stats.py [--target sm_90]

Arguments are specialised as Triton's launcher does for contiguous tensors
(the last stride a constant 1, pointers and other strides divisible by 16):
without that, no load is known to be contiguous. A static check, not a timing: it tells whether the products run on tensor
cores and whether a kernel spills, at the shapes of tools/gpu_bench.py
(paged decode: 32 query / 8 kv heads, D=128, block 16; prefill: 32 heads,
D=128, 128 query rows), in bf16.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def bf16_dtypes(kdef) -> dict:
    """The kernel's tensors in bf16, its indices and split partials as the ops
    pass them (int32, fp32)."""
    from kernelforge.ir import dtypes as dt
    fixed = {"block_tables": dt.i32, "seq_idx": dt.i32, "key_lo": dt.i32, "key_hi": dt.i32,
             "context": dt.i32, "m_out": dt.f32, "l_out": dt.f32, "acc_out": dt.f32}
    return {n: fixed.get(n, dt.bf16) for n, a in kdef.signature if hasattr(a, "axes")}


def stats(kdef, dtypes, sizes, target):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernelforge.aot import TARGETS, launch_specialization
    from kernelforge.backends import registry
    backend = registry.backends()["triton"]
    kernel = kdef.specialize(dtypes, sizes)
    mod = backend.load(kernel, interpret=False)
    fn = getattr(mod, f"{kernel.name}_kernel")
    if hasattr(mod, "_F32_DOT"):
        import triton.language as tl
        mod._F32_DOT = tl.constexpr("tf32x3")
    sig, constexprs, attrs = launch_specialization(fn, mod.SIGNATURE)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget(*TARGETS[target]),
                              options={"num_warps": mod.NUM_WARPS})
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    arch = "sm_90a" if target == "sm_90" else target
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        out = subprocess.run([str(bin_dir / "ptxas"), "-v", f"--gpu-name={arch}", str(ptx),
                              "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True)
        info = out.stderr
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {
        "warps": mod.NUM_WARPS,
        "regs": int(regs.group(1)) if regs else -1,
        "spill st/ld": f"{spill.group(1)}/{spill.group(2)}" if spill else "?",
        "shared": compiled.metadata.shared,
        "wgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "mma": len(re.findall(r"\bHMMA\b", sass)),
        "ffma": len(re.findall(r"\bFFMA\b", sass)),
        "fmul": len(re.findall(r"\bFMUL\b", sass)),
        "mufu.ex2": len(re.findall(r"\bMUFU\.EX2\b", sass)),
        "shfl": len(re.findall(r"\bSHFL\b", sass)),
        "sass lines": sass.count("\n"),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="sm_90", choices=("sm_80", "sm_90"))
    args = ap.parse_args()
    os.environ.pop("KERNELFORGE_TRITON_MAX_BLOCK", None)
    from kernelforge.kernels import attention_kernels as A

    cases = [
        ("prefill (128 query rows)", A.attention_kernel(False, 128), {"HK": 32, "G": 1, "D": 128}),
        ("prefill, round_p", A.attention_kernel(False, 128, True), {"HK": 32, "G": 1, "D": 128}),
        ("paged decode", A.paged_attention_kernel(False), {"HK": 8, "G": 4, "D": 128, "BS": 16}),
        ("paged decode, round_p", A.paged_attention_kernel(False, True),
         {"HK": 8, "G": 4, "D": 128, "BS": 16}),
        ("paged decode, split", A.paged_split_kernel(False),
         {"HK": 8, "G": 4, "D": 128, "BS": 16, "S": 16}),
    ]
    cols = ("warps", "regs", "spill st/ld", "shared", "wgmma", "mma", "ffma", "fmul", "mufu.ex2",
            "shfl", "sass lines")
    print(f"{'kernel (bf16, ' + args.target + ')':<28}" + "".join(f"{c:>12}" for c in cols))
    for name, kdef, sizes in cases:
        try:
            s = stats(kdef, bf16_dtypes(kdef), sizes, args.target)
            print(f"{name:<28}" + "".join(f"{str(s[c]):>12}" for c in cols))
        except Exception as e:  # noqa: BLE001
            print(f"{name:<28} failed: {type(e).__name__}: {str(e)[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
