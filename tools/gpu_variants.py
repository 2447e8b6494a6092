"""Launch-parameter exploration for tools/gpu_bench.py: the attention
kernels timed with other launch parameters, by patching the generated Triton
source, to choose the printer's defaults from measurements."""
import os

# -- launch-parameter exploration ------------------------------------------------------
# The same attention kernels with other launch parameters, to choose the
# printer's defaults from measurements: query rows per program (bq, a kernel
# parameter), warps (w), key-loop chunk (kb) and the precision of the fp32
# p.v dot (ieee, or tf32x3: three TF32 tensor-core products, about fp32
# accuracy). Set KF_GPU_VARIANTS=0 to skip.
VARIANTS = os.environ.get("KF_GPU_VARIANTS", "1") != "0"
# (the defaults: bq=128, w=8, kb=64 for prefill; kb=64, w=4 and the op's split
# choice for paged decode; p rounded to 16 bits before p.v, Triton's default
# for 16-bit inputs, ``round_p``: the gpu_bench rows "exact p" time p kept in
# fp32 as two 16-bit products, hi + lo)
PREFILL_VARIANTS = (
    dict(kb=128), dict(kb=128, stages=2), dict(stages=4), dict(stages=2), dict(w=4),
    dict(bq=64, w=4), dict(kb=32), dict(bq=64, w=4, kb=128),
)
# decode: splits = flash-decoding split count (choose_splits in kernelforge/kernels/attention_plan.py;
# None = the op's choice), 1 = the single-pass kernel
# (warps per decode program: fewer than the default 4 spill registers with
# round_p; docs/gpu-results.md, the "p rounded once" section)
DECODE_VARIANTS = (dict(splits=1), dict(splits=1, kb=32), dict(splits=1, kb=128),
                   dict(splits=1, stages=4), dict(splits=1, w=8), dict(splits=1, w=2),
                   dict(w=2), dict(w=8), dict(splits=4), dict(splits=8),
                   dict(splits=16), dict(splits=4, kb=128))


def variant_cases(kernelforge, run_case, rows, prefix, fn, refs, dtype, nbytes, variants,
                  peer, unit, flops, check=None):
    """Time ``fn`` (an attention op on Triton) under each variant by patching
    the generated source, its results held to ``check`` (run_case's);
    returns summary lines (speed against ``peer``)."""
    import re
    from kernelforge.backends import triton as tb
    import kernelforge.kernels.attention as A

    cls, orig_source, orig_key = tb.TritonBackend, tb.TritonBackend.source, \
        tb.TritonBackend.schedule_key
    orig_block = A._query_block
    import kernelforge.kernels.attention_plan as AS
    orig_choose = AS.choose_splits
    state: dict = {}

    def source(self, kernel):
        s = orig_source(self, kernel)
        v = state.get("v")
        if not v or "attention" not in kernel.name:
            return s
        if "w" in v:
            s = re.sub(r"NUM_WARPS = \d+", f"NUM_WARPS = {v['w']}", s)
        if "kb" in v:    # the key loop's chunk, in the loop headers and their chunk arithmetic
            m = re.search(r"offs_(\w+) = start_\1 \+ tl\.arange\(0, (\d+)\)", s)
            if m:
                axis, old = m.group(1), m.group(2)
                keys = ("start_", "s0_", "s1_", "n_head_", "n_edge_")
                s = "\n".join(re.sub(rf"\b{old}\b", str(v["kb"]), line)
                              if f"_{axis}" in line and any(k in line for k in keys) else line
                              for line in s.splitlines())
        if "prec" in v:
            s = s.replace("input_precision=_F32_DOT", f'input_precision="{v["prec"]}"')
        if "stages" in v:
            s = s.replace("num_warps=NUM_WARPS,", f"num_warps=NUM_WARPS, num_stages={v['stages']},")
        return s

    def schedule_key(self):
        return orig_key(self) + (repr(state.get("v")),)

    lines = []
    cls.source, cls.schedule_key = source, schedule_key
    try:
        for v in variants:
            state["v"] = v
            if "splits" in v:
                AS.choose_splits = lambda *a, n=v["splits"]: n
            else:
                AS.choose_splits = orig_choose
            if "bq" in v:
                A._query_block = lambda q, backend=None, bq=v["bq"]: bq
            name = f"{prefix} " + " ".join(f"{k}={x}" for k, x in v.items())
            run_case(name, fn, refs, dtype, nbytes, check=check)
            row = next((r for r in rows if r["case"] == name), None)
            if not row or row["ms"] != row["ms"]:
                lines.append(f"{name}: failed")
                continue
            rate = (f"{flops / (row['ms'] * 1e-3) / 1e12:.1f} TFLOP/s" if unit == "TFLOP/s"
                    else f"{row['gbps']:.0f} GB/s")
            vs = (f", {peer['ms'] / row['ms']:.2f}x {peer['case'].split(' | ')[1]}"
                  if peer and peer["ms"] == peer["ms"] else "")
            lines.append(f"{name}: {row['ms'] * 1e3:.0f} us, {rate}{vs}")
            row["note"] = rate
    finally:
        cls.source, cls.schedule_key = orig_source, orig_key
        A._query_block = orig_block
        AS.choose_splits = orig_choose
        state.clear()
    return lines
