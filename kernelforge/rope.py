"""The rotary-embedding cos/sin cache read by ``kernelforge.ops.rotary_embedding``.

Row p of the cache holds ``cos(p * inv_freq) * a`` in its first ``rotary_dim/2``
entries and ``sin(p * inv_freq) * a`` in the rest (vLLM's layout), where ``a``
is the attention factor (1 except for yarn and longrope). ``scaling`` takes a
Hugging Face ``rope_scaling`` / ``rope_parameters`` dict and reproduces
transformers' rope initialisation functions, float32 operation for float32
operation, so a model loaded here rotates exactly as it does in transformers.

A static cache cannot re-derive its frequencies per sequence as transformers
does for ``dynamic`` and ``longrope``, so ``max_position`` plays the part of the
model's ``config.max_position_embeddings`` and ``seq_len`` (default:
``max_position``) the part of the sequence length transformers sees:

- dynamic: the base is the one transformers uses for a sequence of ``seq_len``
  tokens; ``original_max_position_embeddings`` (default ``max_position``) is
  transformers' ``config.max_position_embeddings``. Up to that length the cache
  equals the unscaled one. vLLM's cache of ``orig * factor`` positions is
  ``max_position=orig * factor`` with ``original_max_position_embeddings=orig``.
- longrope: ``long_factor`` when ``seq_len > original_max_position_embeddings``,
  else ``short_factor``; the default attention factor comes from ``factor`` or,
  as in transformers, from ``max_position / original_max_position_embeddings``.
  Pass ``seq_len=original`` for the short cache of a long-context model.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import torch

from kernelforge.checks import fail

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# float32 holds every integer position exactly only up to 2**24
MAX_POSITIONS = 2 ** 24


def _show(v):
    return f"a {type(v).__name__} of length {len(v)}" if isinstance(v, (list, tuple)) else repr(v)


def _is_num(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(who, scaling, key, *, required=False, default=None, low=0.0, strict=True, what=None):
    """scaling[key] as a finite number above ``low`` (or at least it when not
    strict); None counts as absent, as transformers treats it."""
    v = scaling.get(key)
    if v is None and not required:
        return default
    if not _is_num(v) or (v <= low if strict else v < low):
        what = what or f"a number {'>' if strict else '>='} {low:g}"
        fail(who, f"scaling[{key!r}]", what, _show(v))
    return v


def _orig(who, scaling, *, required=True, default=None, low=1):
    v = scaling.get("original_max_position_embeddings")
    if v is None and not required:
        return default
    if not _is_int(v) or v < low:
        fail(who, "scaling['original_max_position_embeddings']", f"an integer >= {low}", _show(v))
    return v


def _factors(who, scaling, key, half):
    v = scaling.get(key)
    if not isinstance(v, (list, tuple)) or len(v) != half or not all(_is_num(x) and x > 0 for x in v):
        fail(who, f"scaling[{key!r}]", f"a list of {half} numbers > 0 (rotary_dim / 2)", _show(v))
    return torch.tensor([float(x) for x in v], dtype=torch.float32)


def _inv_freq(who, rotary_dim, base, scaling, max_position, seq_len):
    if not _is_int(rotary_dim) or rotary_dim <= 0 or rotary_dim % 2:
        fail(who, "rotary_dim", "an even integer > 0", _show(rotary_dim))
    if not _is_int(max_position) or not 0 < max_position <= MAX_POSITIONS:
        fail(who, "max_position", "an integer in [1, 2**24]", _show(max_position))
    if seq_len is None:
        seq_len = max_position
    elif not _is_int(seq_len) or seq_len <= 0:
        fail(who, "seq_len", "an integer > 0 or None", _show(seq_len))
    # base <= 1 makes frequencies grow with the index and breaks yarn's log(base)
    if not _is_num(base) or base <= 1:
        fail(who, "base", "a number > 1", _show(base))
    if scaling is None:
        scaling = {}
    if not isinstance(scaling, Mapping):
        fail(who, "scaling", "a dict (Hugging Face rope_scaling) or None", type(scaling).__name__)
    # transformers 5 keeps rope_theta inside rope_parameters: accept that dict
    # as it is, but never let it silently disagree with `base`
    theta = scaling.get("rope_theta")
    if theta is not None and (not _is_num(theta) or float(theta) != float(base)):
        fail(who, "scaling['rope_theta']", f"None or equal to `base` ({base!r})", _show(theta))
    key = "rope_type" if "rope_type" in scaling else "type"
    rope_type = scaling.get(key, "default")
    if rope_type not in ROPE_TYPES:
        fail(who, f"scaling[{key!r}]", f"one of {', '.join(ROPE_TYPES)}", _show(rope_type))

    dim = rotary_dim
    # exponents 2i/dim built as transformers builds them (int64 arange, then float32)
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    attention = 1.0

    if rope_type == "default":
        return 1.0 / (base ** exps), attention
    if rope_type == "linear":
        # dividing inv_freq is dividing every position by factor
        return 1.0 / (base ** exps) / _num(who, scaling, "factor", required=True), attention
    if rope_type == "dynamic":
        factor = _num(who, scaling, "factor", required=True)
        orig = _orig(who, scaling, required=False, default=max_position)
        if dim < 4:  # the NTK exponent dim / (dim - 2) is undefined at dim 2
            fail(who, "rotary_dim", "an even integer >= 4 for dynamic scaling", dim)
        length = max(seq_len, orig)  # at or below the original length: no scaling
        base = base * ((factor * length / orig) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exps), attention
    if rope_type == "llama3":
        factor = _num(who, scaling, "factor", required=True)
        lo = _num(who, scaling, "low_freq_factor", required=True)
        hi = _num(who, scaling, "high_freq_factor", required=True, low=lo,
                  what=f"a number > scaling['low_freq_factor'] ({lo!r})")
        orig = _orig(who, scaling)
        inv = 1.0 / (base ** exps)
        wavelen = 2 * math.pi / inv
        # long wavelengths are interpolated (divided by factor), short ones kept,
        # and the band between orig/hi and orig/lo blends the two smoothly
        scaled = torch.where(wavelen > orig / lo, inv / factor, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelen >= orig / hi) & (wavelen <= orig / lo)
        return torch.where(middle, blended, scaled), attention
    if rope_type == "longrope":
        orig = _orig(who, scaling, low=2)  # the default attention factor divides by log(orig)
        short = _factors(who, scaling, "short_factor", dim // 2)
        long = _factors(who, scaling, "long_factor", dim // 2)
        factor = _num(who, scaling, "factor", default=max_position / orig)
        attention = _num(who, scaling, "attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = long if seq_len > orig else short
        return 1.0 / (ext * base ** exps), attention

    # yarn
    factor = _num(who, scaling, "factor", required=True)
    orig = _orig(who, scaling)
    attention = _num(who, scaling, "attention_factor")
    mscale = _num(who, scaling, "mscale", low=0.0, strict=False)
    mscale_all = _num(who, scaling, "mscale_all_dim", low=0.0, strict=False)
    beta_fast = _num(who, scaling, "beta_fast", default=32)
    beta_slow = _num(who, scaling, "beta_slow", default=1)
    truncate = scaling.get("truncate", True)
    if not isinstance(truncate, bool):
        fail(who, "scaling['truncate']", "True or False", _show(truncate))

    def log_scale(m):  # the paper's sqrt(1/t) = 0.1 * ln(s) + 1, weighted by m
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if attention is None:
        # DeepSeek style: mscale / mscale_all_dim cancel in q.k when equal; zero means unset
        attention = float(log_scale(mscale) / log_scale(mscale_all)) if mscale and mscale_all \
            else log_scale(1)

    def dim_of(rotations):  # the index whose wavelength fits `rotations` times in orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: keep the ramp's slope finite
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency: 1 below `low`
    wavelen_base = base ** exps
    inv = (1.0 / (factor * wavelen_base)) * (1 - keep) + (1.0 / wavelen_base) * keep
    return inv, attention


def inv_freq_and_attention_factor(rotary_dim: int, base: float, scaling: dict | None,
                                  max_position: int, *, seq_len: int | None = None
                                  ) -> tuple[torch.Tensor, float]:
    """The inverse frequencies and attention factor of a rope variant.

    Args:
        rotary_dim: rotated entries per head (even; partial rotary already applied).
        base: rope_theta.
        scaling: a Hugging Face ``rope_scaling`` dict (``rope_type`` or legacy
            ``type``) or None for plain RoPE.
        max_position: positions the cache covers; stands for transformers'
            ``config.max_position_embeddings`` (see the module docstring).
        seq_len: the sequence length dynamic and longrope scale for
            (default ``max_position``).

    Returns:
        (inv_freq, attention_factor): float32 CPU tensor [rotary_dim / 2], float.

    Raises:
        ValueError: an argument or scaling key is missing or invalid.

    Example:
        >>> inv, a = inv_freq_and_attention_factor(
        ...     128, 10000.0, {"rope_type": "yarn", "factor": 4.0,
        ...                    "original_max_position_embeddings": 4096}, 16384)
        >>> inv.shape, round(a, 4)
        (torch.Size([64]), 1.1386)
    """
    inv, attention = _inv_freq("inv_freq_and_attention_factor", rotary_dim, base, scaling,
                               max_position, seq_len)
    return inv, float(attention)


def cos_sin_cache(rotary_dim: int, max_position: int, base: float = 10000.0,
                  scaling: dict | None = None, dtype: torch.dtype = torch.float32,
                  device=None, *, seq_len: int | None = None) -> torch.Tensor:
    """The cos/sin cache for ``kernelforge.ops.rotary_embedding``.

    Args:
        rotary_dim, base, scaling, seq_len: as for ``inv_freq_and_attention_factor``.
        max_position: rows of the cache (positions 0 .. max_position - 1).
        dtype: a floating dtype; the cache is built in float32, then cast once.
        device: where the cache goes (default CPU).

    Returns:
        Tensor [max_position, rotary_dim]: ``cos(p * inv_freq) * a`` then
        ``sin(p * inv_freq) * a`` for each position p.

    Raises:
        ValueError: an argument or scaling key is missing or invalid.

    Example:
        >>> cache = cos_sin_cache(128, 8192, 500000.0, {"rope_type": "llama3",
        ...     "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        ...     "original_max_position_embeddings": 8192}, dtype=torch.bfloat16)
        >>> cache.shape, cache.dtype
        (torch.Size([8192, 128]), torch.bfloat16)
    """
    who = "cos_sin_cache"
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        fail(who, "dtype", "a floating torch.dtype", _show(dtype))
    inv, attention = _inv_freq(who, rotary_dim, base, scaling, max_position, seq_len)
    # built on the CPU, so the cache is bit-identical whatever device it goes to;
    # positions as float32 times float32 inv_freq, as transformers' forward does
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv)
    cache = torch.cat((freqs.cos() * attention, freqs.sin() * attention), dim=-1)
    return cache.to(device=device, dtype=dtype)
