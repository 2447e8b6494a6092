"""Scalar types of the kernel IR.

Every IR value has exactly one of these dtypes. Precision changes only
through an explicit ``cast`` (``value.to(f32)``); the verifier rejects a
binary op whose operands disagree, so no lowering can silently upcast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    name: str           # short name used when printing IR: f32, bf16, i32, ...
    torch: torch.dtype  # the torch dtype a tensor of this type has
    triton: str         # the triton.language spelling
    kind: str           # "float", "int", "uint" or "bool"
    bits: int

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_int(self) -> bool:
        return self.kind in ("int", "uint")

    def __repr__(self) -> str:
        return self.name


f64 = DType("f64", torch.float64, "tl.float64", "float", 64)
f32 = DType("f32", torch.float32, "tl.float32", "float", 32)
f16 = DType("f16", torch.float16, "tl.float16", "float", 16)
bf16 = DType("bf16", torch.bfloat16, "tl.bfloat16", "float", 16)
i64 = DType("i64", torch.int64, "tl.int64", "int", 64)
i32 = DType("i32", torch.int32, "tl.int32", "int", 32)
u32 = DType("u32", torch.uint32, "tl.uint32", "uint", 32)
bool_ = DType("bool", torch.bool, "tl.int1", "bool", 1)

ALL = (f64, f32, f16, bf16, i64, i32, u32, bool_)
_BY_TORCH = {d.torch: d for d in ALL}


def from_torch(dt: torch.dtype) -> DType:
    """The IR dtype of a torch dtype; ``TypeError`` for types the IR lacks."""
    try:
        return _BY_TORCH[dt]
    except KeyError:
        raise TypeError(f"kernelforge IR has no dtype for {dt}") from None
