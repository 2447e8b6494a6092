"""The runtime's fast defaults: which precision a model runs in when the user
does not say (``LLM(dtype=None, quantization="auto")``).

As llama.cpp does, a model runs in the precision it is stored in:

* **Weights.** On a CPU, the layer matrices of a Q4_0 or Q4_1 GGUF stay 4-bit
  (``int4``: their blocks taken exactly), those of a Q8_0 GGUF 8-bit
  (``int8``, per-row); the lm_head is int8 with either. Other files (F16,
  BF16, F32, other GGUF types, Hugging Face safetensors) run dense.
* **Activations.** bfloat16 with quantized layers (their kernels compute in
  it). Dense models: bfloat16 where the device computes it natively (CPUs
  with AVX512-BF16 or AMX, ARM with BF16; CUDA devices that support it), else
  float32: on an AVX2-only CPU torch's bf16 matmuls are emulated and slower
  than fp32 ones (docs/runtime.md, "Fast defaults").
* **Batch size.** The weight-only kernels are fastest for few rows; an engine
  that batches (``max_num_seqs > 1``) also keeps a dense copy of the quantized
  matrices, in the dense dtype above, for inputs of ``DENSE_FROM_ROWS`` rows
  or more (``quant.RowSplitLinear``).

Exact float32 is one flag away: an explicit ``dtype`` turns the automatic
quantization off (``dtype="float32"`` runs the dequantized weights in fp32).
"""
from __future__ import annotations

import functools
import platform
from typing import Optional

import torch

#: GGUF layer types that run quantized by default, and as what
QUANTIZED_TYPES = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}
#: inputs of at least this many rows take the dense copy (measured crossover,
#: docs/runtime.md, "Fast defaults")
DENSE_FROM_ROWS = 16


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86: AVX512-BF16 or AMX-BF16;
    ARM: the BF16 extension), from the flags Linux reports; False elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return bf16_in_cpuinfo(f.read(), platform.machine())
    except OSError:
        return False


def bf16_in_cpuinfo(text: str, machine: str) -> bool:
    """Whether /proc/cpuinfo's ``text`` (of a ``machine`` as platform.machine()
    names it) lists bf16 arithmetic."""
    arm = machine.lower() in ("aarch64", "arm64")
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == ("Features" if arm else "flags"):
            flags = set(value.split())
            return "bf16" in flags if arm else bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def activation_dtype(device: torch.device, quantized: bool = False) -> torch.dtype:
    """The default dtype of activations, KV cache and dense weights on ``device``:
    bfloat16 with quantized layers (the dtype their kernels compute in: no
    casts around each matmul), else ``dense_dtype``."""
    if quantized:
        return torch.bfloat16
    return dense_dtype(device)


def dense_dtype(device: torch.device) -> torch.dtype:
    """The dtype dense matmuls run fastest in on ``device``."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_for(weight_type: Optional[str], device: torch.device) -> Optional[str]:
    """The weight-only mode a file stored as ``weight_type`` runs in on ``device``
    (the kernels are torch's CPU ones: None on other devices)."""
    if device.type != "cpu":
        return None
    return QUANTIZED_TYPES.get(weight_type)


def dense_from_rows(max_num_seqs: int) -> Optional[int]:
    """Rows from which quantized matrices use a dense copy: ``DENSE_FROM_ROWS``
    for an engine that batches, None (no copy, less memory) for one sequence."""
    return DENSE_FROM_ROWS if max_num_seqs > 1 else None
