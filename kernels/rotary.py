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
from typing import Optional

import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.backends import registry
from kernelforge.dispatch import NewTensor, launch, kernel_factory

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


# -- the public op ------------------------------------------------------------------

def _heads(op: str, arg: str, x, T: int, head_size: int) -> torch.Tensor:
    """``x`` as [T, H, head_size] (a view: rows may keep their stride)."""
    checks.tensor(op, arg, x)
    checks.float_dtype(op, arg, x)
    if x.dim() not in (2, 3):
        checks.fail(op, arg, "[tokens, heads * head_size] or [tokens, heads, head_size]",
                    f"{x.dim()} dims {list(x.shape)}")
    if x.shape[0] != T:
        checks.fail(op, arg, f"{T} rows (one per entry of `positions`)", f"{x.shape[0]} rows")
    checks.last_dim_contiguous(op, arg, x)
    if x.dim() == 3:
        if x.shape[2] != head_size:
            checks.fail(op, arg, f"last dim head_size={head_size}", f"shape {list(x.shape)}")
        return x
    if x.shape[1] % head_size or not x.shape[1]:
        checks.fail(op, arg, f"a last dim that is heads x head_size={head_size}",
                    f"{x.shape[1]}")
    return x.view(T, x.shape[1] // head_size, head_size)


def _check(op, positions, query, key, head_size, cos_sin_cache, is_neox, check_positions,
           backend):
    checks.tensor(op, "positions", positions)
    if positions.dtype not in (torch.int64, torch.int32) or positions.dim() != 1:
        checks.fail(op, "positions", "a 1-D int64 or int32 tensor [tokens]",
                    f"{positions.dim()}-D {positions.dtype}")
    if not isinstance(head_size, int) or isinstance(head_size, bool) or head_size < 2:
        checks.fail(op, "head_size", "an int >= 2", repr(head_size))
    T = positions.shape[0]
    qh = _heads(op, "query", query, T, head_size)
    kh = None if key is None else _heads(op, "key", key, T, head_size)
    checks.same_device(op, "query", query, "positions", positions)
    if key is not None:
        checks.same_dtype(op, "key", key, "query", query)
        checks.same_device(op, "key", key, "query", query)
    checks.tensor(op, "cos_sin_cache", cos_sin_cache)
    checks.float_dtype(op, "cos_sin_cache", cos_sin_cache)
    checks.same_device(op, "cos_sin_cache", cos_sin_cache, "query", query)
    if cos_sin_cache.dim() != 2 or not cos_sin_cache.shape[0]:
        checks.fail(op, "cos_sin_cache", "[max_position > 0, rotary_dim]",
                    list(cos_sin_cache.shape))
    R = cos_sin_cache.shape[1]
    if R % 2 or not 2 <= R <= head_size:
        checks.fail(op, "cos_sin_cache", f"an even rotary_dim (last dim) in [2, head_size="
                    f"{head_size}]", f"rotary_dim {R}")
    if not isinstance(is_neox, bool):
        checks.fail(op, "is_neox", "a bool", repr(is_neox))
    if not is_neox and head_size % 2:
        checks.fail(op, "head_size", "an even head size for interleaved (GPT-J) pairs",
                    head_size)
    checks.no_host_check_inline(op, "check_positions", check_positions)
    if check_positions and T and not torch.compiler.is_compiling():
        _check_range(op, positions, cos_sin_cache.shape[0])
    if not torch.compiler.is_compiling():
        registry.select(query.device, backend)     # an unknown backend fails even for 0 rows
    return qh, kh


def _check_range(op: str, positions: torch.Tensor, max_position: int) -> None:
    """One fused min/max on the device and a single host sync."""
    lo, hi = torch.aminmax(positions)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= max_position:
        bad = lo if lo < 0 else hi
        checks.fail(op, "positions", f"values in [0, {max_position}) (the rows of "
                    "`cos_sin_cache`)", f"position {bad}")


def _launch(positions, cos_sin_cache, qh, kh, is_neox, inplace, backend):
    """Rotate [T, H, D] views; returns the rotated views (new tensors unless in place)."""
    style = "neox" if is_neox else "gptj"
    tail = not inplace and cos_sin_cache.shape[1] < qh.shape[2]
    kdef = rotary_kernel(style, kh is not None, tail)
    if style == "gptj":       # pairs as a trailing dim of 2
        qh = qh.unflatten(2, (-1, 2))
        kh = None if kh is None else kh.unflatten(2, (-1, 2))
    xs = (qh,) if kh is None else (qh, kh)
    outs = xs if inplace else tuple(NewTensor(x.shape, x.dtype, x.device) for x in xs)
    res = launch(kdef, positions, cos_sin_cache, *xs, *outs, backend=backend)
    return xs if inplace else res


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor,
                     key: Optional[torch.Tensor], head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True, *,
                     inplace: bool = False, check_positions: bool = True,
                     backend: Optional[str] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotary position embedding of query and key heads (vLLM's calling convention).

    Args:
        positions: int64 (or int32) [T], the position of each token, in any order.
        query: [T, Hq * head_size] or [T, Hq, head_size], fp32/bf16/fp16; rows may be
            strided (a slice of a fused qkv tensor), the last dim must be contiguous.
        key: the same layout with Hkv heads and query's dtype, or None.
        head_size: entries per head.
        cos_sin_cache: [max_position, rotary_dim], cos in the first half of each row
            and sin in the second (``kernelforge.rope.cos_sin_cache`` builds it); any
            float dtype, read as fp32. ``rotary_dim < head_size`` rotates only the
            first rotary_dim entries of each head (partial rotary).
        is_neox: True rotates halves (pairs ``(i, i + rotary_dim/2)``), False
            rotates interleaved pairs ``(2i, 2i+1)`` (GPT-J).
        inplace: write into query and key and return them.
        check_positions: verify ``0 <= positions < max_position`` first (one
            device-wide min/max and, on a GPU, one host sync). Callers that
            guarantee the range may pass False: out-of-range positions are then
            clamped into the cache, never read outside it, and give wrong values.
        backend: "eager", "inductor", "triton" or None (chosen per device).
    Returns:
        ``(query, key)`` rotated, in the input shapes and dtype (key is None
        when it was None).

    Example:
        >>> cache = kernelforge.rope.cos_sin_cache(64, 2048, base=10000.0)
        >>> q, k = kernelforge.ops.rotary_embedding(pos, q, k, 64, cache)
    """
    op = "rotary_embedding"
    qh, kh = _check(op, positions, query, key, head_size, cos_sin_cache, is_neox,
                    check_positions, backend)
    if checks.opaque():
        if inplace:
            torch.ops.kernelforge.rotary_embedding_(positions, query, key, head_size,
                                                    cos_sin_cache, is_neox, check_positions,
                                                    backend)
            return query, key
        outs = torch.ops.kernelforge.rotary_embedding(positions, query, key, head_size,
                                                      cos_sin_cache, is_neox, check_positions,
                                                      backend)
        return outs[0], (outs[1] if key is not None else None)
    return _impl(positions, query, key, qh, kh, cos_sin_cache, is_neox, inplace, backend)


def _impl(positions, query, key, qh, kh, cos_sin_cache, is_neox, inplace, backend):
    if not positions.shape[0]:
        if inplace:
            return query, key
        return query.clone(), (None if key is None else key.clone())
    outs = _launch(positions, cos_sin_cache, qh, kh, is_neox, inplace, backend)
    if inplace:
        return query, key
    q_out = outs[0].reshape(query.shape)
    return q_out, (None if key is None else outs[1].reshape(key.shape))


# -- torch.library custom ops: opaque, compile-safe entry points for engines ---------

@torch.library.custom_op("kernelforge::rotary_embedding", mutates_args=())
def _rotary_op(positions: torch.Tensor, query: torch.Tensor, key: Optional[torch.Tensor],
               head_size: int, cos_sin_cache: torch.Tensor, is_neox: bool,
               check_positions: bool, backend: Optional[str]) -> list[torch.Tensor]:
    """Out of place; returns [query] or [query, key]."""
    q, k = rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox,
                            check_positions=check_positions, backend=backend)
    return [q] if k is None else [q, k]


@_rotary_op.register_fake
def _(positions, query, key, head_size, cos_sin_cache, is_neox, check_positions, backend):
    outs = [torch.empty_like(query, memory_format=torch.contiguous_format)]
    if key is not None:
        outs.append(torch.empty_like(key, memory_format=torch.contiguous_format))
    return outs


@torch.library.custom_op("kernelforge::rotary_embedding_", mutates_args=("query", "key"))
def _rotary_inplace_op(positions: torch.Tensor, query: torch.Tensor,
                       key: Optional[torch.Tensor], head_size: int,
                       cos_sin_cache: torch.Tensor, is_neox: bool, check_positions: bool,
                       backend: Optional[str]) -> None:
    """In place on query and key."""
    rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, inplace=True,
                     check_positions=check_positions, backend=backend)


@_rotary_inplace_op.register_fake
def _(positions, query, key, head_size, cos_sin_cache, is_neox, check_positions, backend):
    return None
