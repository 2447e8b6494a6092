"""Weight-only quantized linear layers for CPU decode (``LLM(quantization="int4")``).

Batch-1 decode reads every weight once per token, so its speed is the weight
bytes over memory bandwidth. These layers keep the weights small and run
torch's CPU weight-only kernels on bf16 activations:

* ``Int4Linear``: ``torch.ops.aten._weight_int4pack_mm_for_cpu``, 4-bit weights
  in groups of 32 along K with a bf16 scale and zero per group. Built from a
  ``Q4_1Weight``: the GGUF's own Q4_1 blocks (taken exactly) or a float weight
  quantized here with Q4_1's scheme (``quantize_q4_1``).
* ``Int8Linear``: ``torch.ops.aten._weight_int8pack_mm``, int8 weights with one
  bf16 scale per output row (symmetric absmax): the lm_head, and the layers of
  a Q8_0 GGUF.
* ``RowSplitLinear``: one of those for inputs of few rows and a dense copy of
  the same weight for many (a batch, a prefill chunk).

Both kernels compute on bf16 activations (fp32 ones into the kernel itself
run far slower: docs/runtime.md, "Weight-only int4"); a float32 model's
activations are rounded to bf16 going in and widened coming out.
Each output row depends only on its own input row (checked for M = 1..70 in
tests/test_runtime_quant.py), so batching does not change a request's result.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

#: weights per Q4_1 block (and per int4pack group)
GROUP = 32
#: _convert_weight_to_int4pack_for_cpu packs 16 output rows at a time
_N_MULTIPLE = 16


@dataclass
class Q4_1Weight:
    """A [N, K] weight in GGUF Q4_1 form: ``w = d * q + m`` per block of 32
    weights along K (the input dimension).

    Row permutations and row concatenations keep the blocks intact (they run
    along K), so the loader's q/k un-permutation and the model's fused q/k/v
    and gate/up matrices apply to q, d and m alike (``map_rows``, ``cat``).

    Attributes:
        q: uint8 [N, K], values 0..15.
        d: float32 [N, K // 32], the block scales (fp16 in the file).
        m: float32 [N, K // 32], the block minimums (fp16 in the file).
    """
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @property
    def shape(self) -> tuple:
        return tuple(self.q.shape)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Q4_1Weight":
        """``fn`` (a row permutation) applied to q, d and m.

        Args:
            fn: maps a [N, ...] tensor to one with its rows reordered.
        Returns:
            A new Q4_1Weight.
        """
        return Q4_1Weight(fn(self.q), fn(self.d), fn(self.m))

    @staticmethod
    def cat(parts: Sequence["Q4_1Weight"]) -> "Q4_1Weight":
        """The row concatenation of ``parts`` (all with the same K).

        Args:
            parts: Q4_1 weights [N_i, K].
        Returns:
            A Q4_1Weight [sum N_i, K].
        """
        return Q4_1Weight(*(torch.cat([getattr(p, f) for p in parts]) for f in "qdm"))

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: ``d * q + m`` in float32, as gguf.quants.dequantize does
        (the product is exact; one rounding in the sum), so the two agree bit for bit.

        Returns:
            The dequantized weight.
        """
        N, K = self.shape
        q = self.q.reshape(N, K // GROUP, GROUP).float()
        return (self.d[..., None] * q + self.m[..., None]).reshape(N, K)


def _check_k(K: int, what: str) -> None:
    if K % GROUP:
        raise ValueError(f"{what}: int4 quantization needs in_features (K) divisible by "
                         f"{GROUP}, got K={K}")


#: GGUF types whose blocks become a Q4_1Weight exactly (Q4_0: w = d * (q - 8), so m = -8d)
Q4_TYPES = ("Q4_0", "Q4_1")


def _bytes(blocks) -> torch.Tensor:
    """A uint8 tensor over ``blocks`` (numpy bytes, often a read-only view of a
    memory-mapped file) without a copy; only read: every result is a new tensor."""
    a = np.ascontiguousarray(blocks, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def unpack_q4(blocks, shape: tuple, kind: str = "Q4_1") -> Q4_1Weight:
    """A Q4_1Weight from the raw bytes of a GGUF Q4_1 or Q4_0 tensor.

    A Q4_1 block is 20 bytes: fp16 d, fp16 m, then 16 bytes of nibbles; byte j
    holds weight j in its low nibble and weight j + 16 in its high nibble
    (ggml's block_q4_1 layout, as gguf.quants.Q4_1 reads it). A Q4_0 block is
    18 bytes, fp16 d and the same nibbles, meaning ``d * (q - 8)``: m = -8d,
    exact in float32 (d has 11 significant bits), as is every ``d * q + m``.

    Args:
        blocks: uint8 numpy array of the tensor's bytes (any shape).
        shape: (N, K), the Hugging Face shape of the weight.
        kind: "Q4_1" or "Q4_0".
    Returns:
        The tensor's q, d and m, without any rounding.
    """
    if kind not in Q4_TYPES:
        raise ValueError(f"kind must be one of {Q4_TYPES}, got {kind!r}")
    N, K = shape
    _check_k(K, f"{kind} tensor of shape {shape}")
    size = 20 if kind == "Q4_1" else 18
    # torch, not numpy: its elementwise ops use every core (a cold start's bulk)
    b = _bytes(blocks).reshape(N, K // GROUP, size)
    d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    if kind == "Q4_1":
        m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    else:
        m = -8 * d
    qs = b[..., size - 16:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(N, K)
    return Q4_1Weight(q, d, m)


def dequantize_q8_0(blocks, shape: tuple) -> torch.Tensor:
    """float32 [*shape] from a GGUF Q8_0 tensor's bytes: 34-byte blocks of
    fp16 d and 32 int8 q, ``w = d * q`` (exact in float32, as gguf computes it)."""
    b = _bytes(blocks).reshape(-1, 34)
    d = b[:, 0:2].contiguous().view(torch.float16).float()
    return (d * b[:, 2:].contiguous().view(torch.int8)).reshape(shape)


def quantize_q4_1(w: torch.Tensor) -> Q4_1Weight:
    """Quantize a float [N, K] weight with Q4_1's scheme: per group of 32 along
    K, asymmetric min/max, ``d = (max - min) / 15``, ``q = round((w - m) / d)``
    in 0..15.

    The kernel receives its scale d and zero m + 8d as bf16, so both are
    rounded to bf16 here, as ``Int4Linear`` rounds a GGUF's fp16 d and m + 8d,
    and q is chosen against the rounded values: the Int4Linear built from the
    result computes ``d * q + m`` with no further rounding. min, max, d and the
    zero are computed in float64, where they are exact for weights on a Q4_1
    grid (dequantized GGUF blocks), so requantizing those gives back the very
    int4 layer the blocks give (tests/test_runtime_quant.py).

    Args:
        w: float tensor [N, K], K divisible by 32.
    Returns:
        Its Q4_1Weight.
    """
    N, K = w.shape
    _check_k(K, f"weight of shape {tuple(w.shape)}")
    g = w.double().reshape(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d_exact = (hi - lo) / 15
    d = d_exact.float().bfloat16().double()
    # the zero centred on q = 8 (m + 8d from the unrounded d, as for GGUF blocks):
    # rounding d then moves a weight by at most |q - 8| steps of its error, not q
    zero = (lo + 8 * d_exact).float().bfloat16().double()
    m = zero - 8 * d
    safe = torch.where(d > 0, d, torch.ones_like(d))   # a constant group: q = 0, w = m
    q = ((g - m[..., None]) / safe[..., None]).round().clamp(0, 15)
    return Q4_1Weight(q.to(torch.uint8).reshape(N, K), d.float(), m.float())


def as_q4_1(w) -> Q4_1Weight:
    """``w`` itself if it is a Q4_1Weight (the GGUF's blocks, kept exactly),
    else ``quantize_q4_1(w)``."""
    return w if isinstance(w, Q4_1Weight) else quantize_q4_1(w)


def tensor_bytes(tensors) -> int:
    """Bytes ``tensors`` hold, a tensor found twice (a tied head) counted once.
    Each counts its own elements, not its storage's: the model's weights and
    its KV caches are views into one shared buffer each (hugepages.py)."""
    return sum({(t.data_ptr(), t.shape, t.dtype): t.numel() * t.element_size()
                for t in tensors}.values())


class Int4Linear:
    """``y = x @ w.T + bias`` with w stored as int4 (torch's CPU int4pack layout).

    Args:
        weight: the Q4_1Weight [N, K] (K divisible by 32, N by 16).
        bias: optional [N] tensor, kept in its dtype (bf16 in the model).
    """

    def __init__(self, weight: Q4_1Weight, bias: Optional[torch.Tensor] = None):
        N, K = weight.shape
        _check_k(K, f"Int4Linear weight of shape {weight.shape}")
        if N % _N_MULTIPLE:
            raise ValueError(f"Int4Linear weight of shape {weight.shape}: torch's int4pack "
                             f"needs out_features (N) divisible by {_N_MULTIPLE}, got N={N}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"Int4Linear bias must have shape ({N},), got "
                             f"{tuple(bias.shape)}")
        self.in_features, self.out_features = K, N
        # the kernel dequantizes (q - 8) * scale + zero; with scale = d and
        # zero = m + 8d that is d * q + m, Q4_1's formula, with q taken as is.
        # scale and zero are rounded once to bf16 (the kernel's type): d is fp16
        # in a GGUF (11-bit significand), so it moves by at most 2^-9 relative,
        # a weight by at most |q - 8| * d * 2^-9 <= d/64 (1/32 of Q4_1's own
        # rounding, d/2) plus 2^-9 |m + 8d| from the zero. The zero centred on
        # q = 8 (not m at q = 0) is the kernel's convention and halves the first term
        zero = weight.m + 8 * weight.d
        self.scales_and_zeros = (torch.stack([weight.d, zero], dim=-1)   # [N, K/32, 2]
                                 .transpose(0, 1).contiguous().to(torch.bfloat16))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            weight.q.to(torch.int32).contiguous(), 1)       # 1 = inner K tiles, CPU layout
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] bfloat16 or float32 -> [..., N] in x's dtype: fp32
        accumulation, one rounding to bf16 (plus one when a bias is added); a
        float32 x is rounded to bf16 going in (the kernel's input type)."""
        x2 = _kernel_input(x, "Int4Linear", self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP,
                                                       self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def tensors(self) -> list:
        """The tensors this layer holds (for byte counts)."""
        return [t for t in (self.packed, self.scales_and_zeros, self.bias) if t is not None]

    def nbytes(self) -> int:
        """Bytes of the packed weight, the scales and zeros and the bias."""
        return tensor_bytes(self.tensors())


class Int8Linear:
    """``y = x @ w.T + bias`` with w stored as int8, one bf16 scale per output row.

    Per-row symmetric absmax requantization of a (dequantized) weight,
    ``scale = max|w_row| / 127``: the lm_head of the int4 mode, and the layer
    matrices of a Q8_0 GGUF (``quantization="int8"``).

    Args:
        weight: float tensor [N, K].
        bias: optional [N] tensor, kept in its dtype (bf16 in the model).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        w = weight.float()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"Int8Linear bias must have shape ({self.out_features},), got "
                             f"{tuple(bias.shape)}")
        # quantize against the bf16 scale the kernel uses, so it computes q * scale exactly
        lo, hi = torch.aminmax(w, dim=1)
        scale = (torch.maximum(-lo, hi) / 127).bfloat16()
        s = scale.float()
        s = torch.where(s > 0, s, torch.ones_like(s))      # an all-zero row: q = 0
        # the rounded scale may sit below max|w| / 127: clamp (in place, one pass less)
        self.q = (w / s[:, None]).round_().clamp_(-127, 127).to(torch.int8).contiguous()
        self.scales = scale.contiguous()
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] bfloat16 or float32 -> [..., N] in x's dtype (fp32
        accumulation, one rounding to bf16; a float32 x is rounded to bf16 going in)."""
        x2 = _kernel_input(x, "Int8Linear", self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def tensors(self) -> list:
        """The tensors this layer holds (for byte counts)."""
        return [t for t in (self.q, self.scales, self.bias) if t is not None]

    def nbytes(self) -> int:
        """Bytes of the int8 weight, the scales and the bias."""
        return tensor_bytes(self.tensors())


def _kernel_input(x: torch.Tensor, what: str, K: int) -> torch.Tensor:
    """x as the weight-only kernels take it: bf16, contiguous [M, K]."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"{what} input must be bfloat16 or float32, got {x.dtype}")
    return x.reshape(-1, K).to(torch.bfloat16).contiguous()


class RowSplitLinear:
    """A quantized layer for inputs of few rows, a dense copy for many.

    torch's weight-only CPU kernels run one matrix-vector product per input
    row: fastest for batch-1 decode, which reads every weight once per token,
    but slower than a dense matmul once a batch or a prefill chunk has enough
    rows (docs/runtime.md, "Fast defaults"). Both compute the same weights.

    Args:
        quantized: an Int4Linear or Int8Linear (holding the bias, if any).
        dense: the same weight, dequantized, [N, K], in the dtype dense
            matmuls are fastest in on this CPU (``defaults.dense_dtype``);
            inputs are cast to it and the result back.
        dense_from_rows: inputs of at least this many rows take the dense matmul.
    """

    def __init__(self, quantized, dense: torch.Tensor, dense_from_rows: int):
        self.quantized, self.dense, self.dense_from_rows = quantized, dense, dense_from_rows
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.bias = None if quantized.bias is None else quantized.bias.to(dense.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N] in x's dtype."""
        if x.shape[0] >= self.dense_from_rows:
            y = torch.nn.functional.linear(x.to(self.dense.dtype), self.dense, self.bias)
            return y.to(x.dtype)
        return self.quantized(x)

    def tensors(self) -> list:
        """The tensors this layer holds (for byte counts)."""
        return self.quantized.tensors() + [t for t in (self.dense, self.bias) if t is not None]

    def nbytes(self) -> int:
        """Bytes of both copies."""
        return tensor_bytes(self.tensors())
