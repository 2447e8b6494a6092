"""Per-request generation settings, checked on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from kernelforge.kernels.sampling import SAMPLING_EPS

_FP32_MAX = 3.4028234663852886e38
_FP32_TINY = 1.401298464324817e-45      # the smallest float32 > 0


class SamplingParamsError(ValueError):
    """A bad SamplingParams field; ``field`` names it (a server reports it as the bad parameter)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass
class SamplingParams:
    """How one request generates.

    temperature below SAMPLING_EPS (1e-5, vLLM's) is greedy (argmax), as in
    ``kernelforge.ops.sample``. top_k <= 0 and top_p == 1 and min_p == 0
    keep every token. max_tokens counts generated tokens; stop strings end the
    text before the match; ignore_eos keeps going past end-of-sequence tokens.
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    max_tokens: int = 16
    stop: list = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logprobs: Optional[int] = None

    def __post_init__(self):
        def bad(name, want):
            raise SamplingParamsError(
                name, f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

        def num(name):
            v = getattr(self, name)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(name):
            v = getattr(self, name)
            return isinstance(v, int) and not isinstance(v, bool)

        if not num("temperature") or self.temperature < 0:
            bad("temperature", "a finite number >= 0")
        if not integer("top_k"):
            bad("top_k", "an int (<= 0 keeps every token)")
        if not num("top_p") or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not num("min_p") or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        if self.seed is not None and not integer("seed"):
            bad("seed", "None or an int")
        if not integer("max_tokens") or self.max_tokens < 1:
            bad("max_tokens", "an int >= 1")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a non-empty string or a list of them")
        for name in ("presence_penalty", "frequency_penalty"):
            if not num(name) or not -2 <= getattr(self, name) <= 2:
                bad(name, "a number in [-2, 2]")
        # the penalty is applied in float32: it must stay a finite number > 0 there
        if not num("repetition_penalty") or not _FP32_TINY <= self.repetition_penalty <= _FP32_MAX:
            bad("repetition_penalty", f"a number in [{_FP32_TINY:.3g}, {_FP32_MAX:.3g}] "
                "(> 0 and finite in float32)")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "a bool")
        if self.logprobs is not None and (not integer("logprobs") or self.logprobs < 0):
            bad("logprobs", "None or an int >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS
