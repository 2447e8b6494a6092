"""Rotary position embeddings (RoPE), written once in the kernel IR.

For each token t at position p = positions[t], each head, and each pair i of
the first ``rotary_dim`` (R) entries of the head:

    cos, sin = cache[p, i], cache[p, i + R/2]
    out[first]  = x[first] * cos - x[second] * sin
    out[second] = x[second] * cos + x[first] * sin

where the pair is ``(i, i + R/2)`` in the NeoX style (rotate halves) and
``(2i, 2i + 1)`` in the GPT-J style (interleaved). Entries R..D of a head
(partial rotary) pass through unchanged. Math in fp32, stored in the input
dtype. One program per token rotates every query and key head, so the cos
and sin row is gathered once per token.

The kernels are built by ``rotary_kernel(style, with_key, tail)`` and cached:
``with_key`` adds the key tensor, ``tail`` copies the pass-through entries
(needed out of place; in place they are already where they belong).
"""
# (no `from __future__ import annotations`: kernel annotations below are built
# from closure variables and must be evaluated where they are written)
import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.dispatch import NewTensor, launch, kernel_factory
from kernelforge.spec import INDEX, Backend, Bad, Bool, Call, Int, OpSpec, Output, Tensor, bench

STYLES = ("neox", "gptj")


def _position(positions, cache, t):
    """The token's position, clamped into the cache: callers that skip the
    host-side range check still never read outside it."""
    p = kl.load(positions[t])
    last = (kl.size("P") - 1).to(positions.dtype)
    return kl.minimum(kl.maximum(p, 0), last)


def _rotate_neox(t, pos, cache, heads, tail: bool):
    """x as [T, H, D]: pairs (i, i + R/2)."""
    def pairs(i):
        half = kl.size("R2")
        cos = kl.load(cache[pos, i]).to(kl.f32)
        sin = kl.load(cache[pos, i + half]).to(kl.f32)
        for x, out, axis in heads:
            h = kl.tile(axis)
            x1 = kl.load(x[t, h, i]).to(kl.f32)
            x2 = kl.load(x[t, h, i + half]).to(kl.f32)
            kl.store(out[t, h, i], (x1 * cos - x2 * sin).to(out.dtype))
            kl.store(out[t, h, i + half], (x2 * cos + x1 * sin).to(out.dtype))

    kl.seq_for("R2", pairs)
    if tail:
        def copy(j):
            for x, out, axis in heads:
                h = kl.tile(axis)
                kl.store(out[t, h, j + kl.size("R")], kl.load(x[t, h, j + kl.size("R")]))
        kl.seq_for("PT", copy)


def _rotate_gptj(t, pos, cache, heads, tail: bool):
    """x viewed as [T, H, D/2, 2]: pair i is x[t, h, i, 0:2]."""
    def pairs(i):
        cos = kl.load(cache[pos, i]).to(kl.f32)
        sin = kl.load(cache[pos, i + kl.size("R2")]).to(kl.f32)
        for x, out, axis in heads:
            h = kl.tile(axis)
            x1 = kl.load(x[t, h, i, 0]).to(kl.f32)
            x2 = kl.load(x[t, h, i, 1]).to(kl.f32)
            kl.store(out[t, h, i, 0], (x1 * cos - x2 * sin).to(out.dtype))
            kl.store(out[t, h, i, 1], (x2 * cos + x1 * sin).to(out.dtype))

    kl.seq_for("R2", pairs)
    if tail:
        def copy(j):
            for x, out, axis in heads:
                h, two = kl.tile(axis), kl.tile("TWO")
                kl.store(out[t, h, j + kl.size("R2"), two], kl.load(x[t, h, j + kl.size("R2"), two]))
        kl.seq_for("PT", copy)


@kernel_factory
def rotary_kernel(style: str, with_key: bool, tail: bool) -> kl.KernelDef:
    """The rotary kernel for one calling variant.

    Args:
        style: "neox" (x as [T, H, D]) or "gptj" (x as [T, H, D/2, 2]).
        with_key: rotate a key tensor in the same launch.
        tail: copy the entries past rotary_dim (out of place with partial rotary).
    Returns:
        the KernelDef; static axes are the head counts, the head size and R.
    """
    if style not in STYLES:
        raise ValueError(f"rotary_kernel: `style` expected one of {STYLES}, got {style!r}")
    if style == "neox":
        qd, kd, rotate = ("T", "HQ", "D"), ("T", "HK", "D"), _rotate_neox
        static = ("HQ", "HK", "D", "R")
        derived = {"R2": lambda s: s["R"] // 2, "PT": lambda s: s["D"] - s["R"]}
    else:
        qd, kd, rotate = ("T", "HQ", "D2", "TWO"), ("T", "HK", "D2", "TWO"), _rotate_gptj
        static = ("HQ", "HK", "D2", "TWO", "R")
        derived = {"R2": lambda s: s["R"] // 2, "PT": lambda s: s["D2"] - s["R"] // 2}

    if with_key:
        def rotary_qk(positions: kl.In("T"), cache: kl.In("P", "R"),
                      q: kl.In(*qd), k: kl.In(*kd), q_out: kl.Out(*qd), k_out: kl.Out(*kd)):
            t = kl.parallel("T")
            pos = _position(positions, cache, t)
            rotate(t, pos, cache, ((q, q_out, "HQ"), (k, k_out, "HK")), tail)
        fn = rotary_qk
    else:
        static = tuple(s for s in static if s != "HK")

        def rotary_q(positions: kl.In("T"), cache: kl.In("P", "R"),
                     q: kl.In(*qd), q_out: kl.Out(*qd)):
            t = kl.parallel("T")
            pos = _position(positions, cache, t)
            rotate(t, pos, cache, ((q, q_out, "HQ"),), tail)
        fn = rotary_q
    fn.__name__ = fn.__qualname__ = f"{fn.__name__}_{style}" + ("_tail" if tail else "")
    examples = [_EXAMPLES[style, tail][i] for i in range(2)]
    if not with_key:
        examples = [{a: v for a, v in e.items() if a != "HK"} for e in examples]
    return kl.kernel(fn, static=static, derived=derived, examples=examples,
                     example_dtypes={"positions": kl.i64, "cache": kl.f32})


# Representative shapes (for `kernelforge show` and `aot-check`): full rotary
# as in Llama 3 8B and 70B; partial rotary as in Phi-2 (32 of 80) and GPT-J
# (64 of 256); GPT-J style views heads as [D/2, 2].
_EXAMPLES = {
    ("neox", False): ({"HQ": 32, "HK": 8, "D": 128, "R": 128},
                      {"HQ": 64, "HK": 8, "D": 128, "R": 128}),
    ("neox", True): ({"HQ": 32, "HK": 32, "D": 80, "R": 32},
                     {"HQ": 16, "HK": 16, "D": 256, "R": 64}),
    ("gptj", False): ({"HQ": 32, "HK": 8, "D2": 64, "TWO": 2, "R": 128},
                      {"HQ": 64, "HK": 8, "D2": 64, "TWO": 2, "R": 128}),
    ("gptj", True): ({"HQ": 16, "HK": 16, "D2": 128, "TWO": 2, "R": 64},
                     {"HQ": 32, "HK": 32, "D2": 40, "TWO": 2, "R": 32}),
}


def all_kernels() -> tuple:
    """Every variant, for `kernelforge ops`, `show` and `aot-check`."""
    return tuple(rotary_kernel(s, k, t) for s in STYLES for k in (True, False)
                 for t in (False, True))


# -- the spec ---------------------------------------------------------------------------

def _heads(op: str, arg: str, x, T: int, head_size: int) -> torch.Tensor:
    """``x`` as [T, H, head_size] (a view: rows may keep their stride)."""
    if x.shape[0] != T:
        checks.fail(op, arg, f"{T} rows (one per entry of `positions`)", f"{x.shape[0]} rows")
    if x.dim() == 3:
        if x.shape[2] != head_size:
            checks.fail(op, arg, f"last dim head_size={head_size}", f"shape {list(x.shape)}")
        return x
    if x.shape[1] % head_size or not x.shape[1]:
        checks.fail(op, arg, f"a last dim that is heads x head_size={head_size}",
                    f"{x.shape[1]}")
    return x.view(T, x.shape[1] // head_size, head_size)


def _positions(op, a):
    p = a.positions
    if p.dtype not in INDEX or p.dim() != 1:
        checks.fail(op, "positions", "a 1-D int64 or int32 tensor [tokens]",
                    f"{p.dim()}-D {p.dtype}")


def _check(op, a):
    T = a.positions.shape[0]
    _heads(op, "query", a.query, T, a.head_size)
    if a.key is not None:
        _heads(op, "key", a.key, T, a.head_size)
    c = a.cos_sin_cache
    if c.dim() != 2 or not c.shape[0]:
        checks.fail(op, "cos_sin_cache", "[max_position > 0, rotary_dim]", list(c.shape))
    R = c.shape[1]
    if R % 2 or not 2 <= R <= a.head_size:
        checks.fail(op, "cos_sin_cache", f"an even rotary_dim (last dim) in [2, head_size="
                    f"{a.head_size}]", f"rotary_dim {R}")
    if not a.is_neox and a.head_size % 2:
        checks.fail(op, "head_size", "an even head size for interleaved (GPT-J) pairs",
                    a.head_size)
    checks.no_host_check_inline(op, "check_positions", a.check_positions)
    if a.check_positions and T and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(a.positions))   # one host sync
        if lo < 0 or hi >= c.shape[0]:
            checks.fail(op, "positions", f"values in [0, {c.shape[0]}) (the rows of "
                        "`cos_sin_cache`)", f"position {lo if lo < 0 else hi}")


def _run(a):
    """Rotate [T, H, D] views; the rotated tensors (the inputs when in place)."""
    T = a.positions.shape[0]
    qh = _heads("rotary_embedding", "query", a.query, T, a.head_size)
    kh = None if a.key is None else _heads("rotary_embedding", "key", a.key, T, a.head_size)
    if not T:
        return (a.query, a.key) if a.inplace else \
            (a.query.clone(), None if a.key is None else a.key.clone())
    style = "neox" if a.is_neox else "gptj"
    tail = not a.inplace and a.cos_sin_cache.shape[1] < qh.shape[2]
    kdef = rotary_kernel(style, kh is not None, tail)
    if style == "gptj":       # pairs as a trailing dim of 2
        qh = qh.unflatten(2, (-1, 2))
        kh = None if kh is None else kh.unflatten(2, (-1, 2))
    xs = (qh,) if kh is None else (qh, kh)
    outs = xs if a.inplace else tuple(NewTensor(x.shape, x.dtype, x.device) for x in xs)
    res = launch(kdef, a.positions, a.cos_sin_cache, *xs, *outs, backend=a.backend)
    if a.inplace:
        return a.query, a.key
    return res[0].reshape(a.query.shape), (None if a.key is None else res[1].reshape(a.key.shape))


def reference(positions, x, cos_sin_cache, head_size: int, is_neox: bool) -> torch.Tensor:
    """RoPE as a complex rotation in float64: each pair (a, b) is the complex
    number a + ib multiplied by cos + i sin from the cache row of its token."""
    T = positions.shape[0]
    H = x.shape[1] if x.dim() == 3 else x.shape[1] // head_size
    x64 = x.to(torch.float64).reshape(T, H, head_size)
    c = cos_sin_cache.to(torch.float64)[positions.long()]
    R = c.shape[1]
    rot = torch.complex(c[:, : R // 2], c[:, R // 2:])[:, None, :]
    part = x64[..., :R]
    a, b = (part[..., : R // 2], part[..., R // 2:]) if is_neox else \
        (part[..., 0::2], part[..., 1::2])
    z = torch.complex(a, b) * rot
    out = x64.clone()
    if is_neox:
        out[..., : R // 2], out[..., R // 2:R] = z.real, z.imag
    else:
        out[..., 0:R:2], out[..., 1:R:2] = z.real, z.imag
    return out.reshape(x.shape)


def _reference(a):
    q = reference(a.positions, a.query, a.cos_sin_cache, a.head_size, a.is_neox)
    k = None if a.key is None else reference(a.positions, a.key, a.cos_sin_cache, a.head_size,
                                             a.is_neox)
    return q, k


#: a few specialisations that still cover both styles, partial rotary, GQA,
#: key None, strided rows and each dtype, for backends that compile each one
#:   (head_size, rotary_dim, is_neox, Hq, Hkv, with_key, layout, dtype)
COMPILED_CASES = [
    (128, 128, True, 4, 2, True, "2d", torch.bfloat16),
    (80, 32, False, 3, 1, True, "3d", torch.float32),
    (64, 64, True, 2, 2, True, "qkv", torch.float16),
    (96, 48, True, 3, 3, False, "2d", torch.float32),
]


def _samples(st, budget):
    @st.composite
    def draw(draw):
        if not budget.free_sizes:
            D, R, neox, hq, hk, with_key, layout, dtype = draw(budget.sizes(COMPILED_CASES))
            cache_dtype = torch.float32
        else:
            D = draw(st.sampled_from([64, 80, 96, 128, 256]))
            R = draw(st.one_of(st.just(D), st.integers(1, D // 2).map(lambda h: 2 * h)))
            neox, with_key = draw(st.booleans()), draw(st.booleans())
            hk = draw(st.sampled_from([1, 2, 4]))
            hq = hk * draw(st.sampled_from([1, 2, 3]))
            layout = draw(st.sampled_from(["2d", "3d", "qkv"]))
            dtype = draw(st.sampled_from(budget.dtypes))
            cache_dtype = draw(st.sampled_from([torch.float32, dtype]))
        T = budget.force_rows if budget.force_rows is not None else \
            draw(st.integers(0, 4 * budget.rows))
        P = draw(st.sampled_from([1, 7, 512, 4096]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        if layout == "qkv":      # strided views into one fused projection
            qkv = torch.randn(T, (hq + 2 * hk) * D, generator=g).to(dtype).to(budget.device)
            q, k = qkv[:, :hq * D], qkv[:, hq * D:(hq + hk) * D]
        else:
            q = torch.randn(T, hq * D, generator=g).to(dtype).to(budget.device)
            k = torch.randn(T, hk * D, generator=g).to(dtype).to(budget.device)
            if layout == "3d":
                q, k = q.view(T, hq, D), k.view(T, hk, D)
        angles = torch.rand(P, R // 2, generator=g, dtype=torch.float64) * 6.3
        scale = 0.5 + torch.rand(P, 1, generator=g, dtype=torch.float64)   # yarn's mscale
        cache = torch.cat([angles.cos() * scale, angles.sin() * scale], 1).to(cache_dtype)
        return Call(dict(positions=torch.randint(0, P, (T,), generator=g).to(budget.device),
                         query=q, key=k if with_key else None, head_size=D,
                         cos_sin_cache=cache.to(budget.device), is_neox=neox,
                         inplace=draw(st.booleans())),
                    f"T={T} D={D} R={R} {'neox' if neox else 'gptj'} {layout} {dtype}")
    return draw()


def _resize(call, rows):
    kw = call.kwargs
    idx = torch.arange(rows) % max(kw["positions"].shape[0], 1)
    new = {"positions": kw["positions"][idx] if kw["positions"].numel() else
           torch.zeros(rows, dtype=kw["positions"].dtype, device=kw["positions"].device)}
    for n in ("query", "key"):
        if kw[n] is not None:
            new[n] = kw[n][idx].contiguous() if kw[n].shape[0] else \
                torch.randn(rows, *kw[n].shape[1:]).to(kw[n].dtype).to(kw[n].device)
    return call.with_(**new)


def _bench_call(device, dtype, T, hq, hk, D):
    from kernelforge import rope
    qkv = torch.randn(T, (hq + 2 * hk) * D, device=device).to(dtype)
    return dict(positions=torch.arange(T, device=device) % 4096, query=qkv[:, :hq * D],
                key=qkv[:, hq * D:(hq + hk) * D], head_size=D,
                cos_sin_cache=rope.cos_sin_cache(D, 4096).to(device), inplace=True)


def _peer(a):
    """vLLM's native NeoX rotary (``forward_native``): gather cos/sin, rotate halves in
    the input dtype, write back."""
    cos, sin = a.cos_sin_cache[a.positions].chunk(2, dim=-1)
    outs = []
    for x in (a.query, a.key):
        xh = x.view(x.shape[0], -1, a.head_size)
        r = a.cos_sin_cache.shape[1]
        x1, x2 = xh[..., :r // 2], xh[..., r // 2:r]
        c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        xh[..., :r] = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        outs.append(x)
    return tuple(outs)


def _heads_tensor(name: str, **kw) -> Tensor:
    return Tensor(name, dims=(2, 3), layout="[tokens, heads * head_size] or [tokens, heads, "
                  "head_size]", **kw)


ROTARY_EMBEDDING = OpSpec(
    "rotary_embedding",
    "Rotary position embedding of query and key heads (vLLM's calling convention).\n\n"
    "Out-of-range positions with ``check_positions=False`` are clamped into the cache\n"
    "(never read outside it) and give wrong values.",
    args=(Tensor("positions", dtypes=None, check=_positions,
                 doc="int64 (or int32) [T], the position of each token, in any order"),
          _heads_tensor("query", doc="[T, Hq * head_size] or [T, Hq, head_size], fp32/bf16/"
                        "fp16; rows may be strided (a slice of a fused qkv tensor), the last "
                        "dim contiguous"),
          _heads_tensor("key", dtype_of="query", device_of="query", optional=True,
                        doc="the same layout with Hkv heads and query's dtype, or None"),
          Int("head_size", low=2, doc="entries per head"),
          Tensor("cos_sin_cache", doc="[max_position, rotary_dim]: cos in the first half of "
                 "each row, sin in the second (``kernelforge.rope.cos_sin_cache`` builds it); "
                 "any float dtype, read as fp32; rotary_dim < head_size rotates only the "
                 "first rotary_dim entries of each head"),
          Bool("is_neox", default=True, doc="True rotates halves (pairs ``(i, i + R/2)``), "
               "False interleaved pairs ``(2i, 2i+1)`` (GPT-J)"),
          Bool("inplace", default=False, kw_only=True, graph=False,
               doc="write into query and key and return them"),
          Bool("check_positions", default=True, kw_only=True,
               doc="verify ``0 <= positions < max_position`` first (one min/max and, on a "
                   "GPU, one host sync); False for callers that guarantee the range"),
          Backend()),
    outputs=(Output("query", lambda a: a.query.shape, "query", "rotated, in query's shape"),
             Output("key", lambda a: None if a.key is None else a.key.shape, "query",
                    "rotated, in key's shape (None when key is None)")),
    run=_run, check=_check, kernels=all_kernels, inplace="inplace", mutates=("query", "key"),
    list_outputs=True,
    returns=lambda a, res: (res[0], res[1] if a.key is not None else None),
    example=">>> cache = kernelforge.rope.cos_sin_cache(64, 2048, base=10000.0)\n"
            ">>> q, k = kernelforge.ops.rotary_embedding(pos, q, k, 64, cache)",
    reference=_reference, samples=_samples, resize=_resize, peer=_peer,
    bench=bench(_bench_call, (1, 32, 8, 128), (32, 32, 8, 128), (4096, 32, 8, 128)),
    bad=(Bad("a position past the cache", lambda c: c.with_(
        positions=c.kwargs["positions"] + c.kwargs["cos_sin_cache"].shape[0]),
        ("`positions`", "values in [0,")),
         Bad("key is query, in place", lambda c: c.with_(
             key=c.kwargs["query"], inplace=True), ("overlaps",))),
    vllm="rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox) "
         "(in place)",
    checks_by_key=("check_positions",),     # that check reads the positions
)

rotary_embedding = ROTARY_EMBEDDING.op
SPECS = (ROTARY_EMBEDDING,)
