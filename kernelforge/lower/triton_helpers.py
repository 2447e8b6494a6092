"""Source snippets the Triton printer pastes into generated modules: the
combine functions of reductions and scans, and small helpers whose behaviour
depends on where the module runs (the interpreter, a GPU, aot-check). Each is
defined in the generated module itself, so @triton.jit reads the interpreter
switch when that module runs."""

# Reductions and scans go through tl.reduce / tl.associative_scan with these
# combine functions, defined in the generated module itself: @triton.jit reads
# the interpreter switch when the module runs, so the same module serves the
# Triton interpreter on CPU and real GPU compiles.
COMBINE = {
    "sum": '''@triton.jit
def _sum_combine(a, b):
    return a + b''',
    "max": '''@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)''',
    "min": '''@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)''',
    # as torch.argmax/argmin: NaN wins (the first NaN), ties go to the lower index
    "argmax": '''@triton.jit
def _argmax_combine(v1, i1, v2, i2):
    nan1 = v1 != v1
    tie = (v1 == v2) | (nan1 & (v2 != v2))
    take1 = (v1 > v2) | (nan1 & (v2 == v2)) | (tie & (i1 < i2))
    return tl.where(take1, v1, v2), tl.where(take1, i1, i2)''',
    "argmin": '''@triton.jit
def _argmin_combine(v1, i1, v2, i2):
    nan1 = v1 != v1
    tie = (v1 == v2) | (nan1 & (v2 != v2))
    take1 = (v1 < v2) | (nan1 & (v2 == v2)) | (tie & (i1 < i2))
    return tl.where(take1, v1, v2), tl.where(take1, i1, i2)''',
}

# max/min over an axis: on GPUs tl.reduce with the NaN-propagating combine
# above; the interpreter would call that combine once per element (most of a
# paged decode call's time: docs/design.md, "Known limitations"), so there it
# takes numpy's own max (which skips NaN) and puts any NaN back with a sum.
MINMAX_REDUCE = {
    kind: f'''@triton.jit
def _{kind}_reduce(x, axis: tl.constexpr):
    if _INTERPRET:
        nan = tl.reduce(tl.where(x != x, x, 0), axis, tl.standard._sum_combine)
        return tl.reduce(x, axis, tl.standard._elementwise_{kind}) + nan
    else:
        return tl.reduce(x, axis, _{kind}_combine)''' for kind in ("max", "min")}

INTERPRET_FLAG = '''# True while this module runs under the Triton interpreter (read at import).
_INTERPRET = tl.constexpr(triton.knobs.runtime.interpret)'''

DOT_OPERAND = '''@triton.jit
def _dot_operand(x):
    # bf16/f16 dots run on tensor cores with fp32 accumulation (products are
    # exact in fp32); the interpreter gets bf16 dots wrong, so it multiplies
    # the same values in fp32
    if _INTERPRET:
        return x.to(tl.float32)
    else:
        return x'''

F32_DOT = '''def _f32_dot_precision():
    # fp32 dots: three TF32 tensor-core products (about fp32 accuracy, much
    # faster than fp32 FMAs: docs/gpu-results.md, "Run 1") on NVIDIA GPUs,
    # fp32 FMAs elsewhere (the interpreter, AMD, no GPU: aot-check).
    if triton.knobs.runtime.interpret:
        return "ieee"
    try:
        backend = triton.runtime.driver.active.get_current_target().backend
    except Exception:  # no GPU driver on this machine
        return "ieee"
    return "tf32x3" if backend == "cuda" else "ieee"


_F32_DOT = tl.constexpr(_f32_dot_precision())'''

TO_BF16 = '''@triton.jit
def _to_bf16(x):
    # GPUs round f32 -> bf16 to nearest even (cvt.rn); the Triton interpreter
    # truncates, so it gets the same rounding spelled out in integer ops.
    if _INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), y)
    else:
        return x.to(tl.bfloat16)'''
