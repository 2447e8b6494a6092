"""The tolerance policy: one rule per dtype, used by every test, the demo
and the benchmarks' sanity checks (docs/tolerance.md explains it).

A result passes when, element by element,

    |actual - reference| <= atol + rtol * |reference|

where ``reference`` is computed in float64 by a formula written
independently of the IR. Every kernel computes in fp32 and rounds once to
the storage dtype, so the error is half a unit in the last place (ulp) of
the storage dtype plus fp32 arithmetic error. ``rtol`` is one ulp at the
bottom of a binade (2x the rounding bound); ``atol`` covers results that
round to zero or to subnormals.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


POLICY = {
    # 24-bit significand; rtol leaves room for fp32 sums over 16K-element rows
    torch.float32: Tol(atol=1e-5, rtol=2e-5),
    # 8-bit significand: one ulp = 2**-7
    torch.bfloat16: Tol(atol=1e-5, rtol=2 ** -7),
    # 11-bit significand: one ulp = 2**-10
    torch.float16: Tol(atol=1e-5, rtol=2 ** -10),
}


def tolerance(dtype: torch.dtype) -> Tol:
    return POLICY[dtype]


def assert_close(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                 what: str = "") -> None:
    """Check ``actual`` against a float64 ``reference`` under the policy for
    ``dtype``; NaN and inf must appear in the same places with the same sign."""
    tol = tolerance(dtype)
    a, r = actual.detach().double().cpu(), reference.detach().double().cpu()
    if a.shape != r.shape:
        raise AssertionError(f"{what}: shape {list(a.shape)} != reference {list(r.shape)}")
    nan_a, nan_r = a.isnan(), r.isnan()
    if not torch.equal(nan_a, nan_r):
        raise AssertionError(f"{what}: NaN in {int(nan_a.sum())} places, reference has "
                             f"{int(nan_r.sum())}")
    inf_r = r.isinf()
    if not torch.equal(a.isinf(), inf_r) or not torch.equal(a[inf_r], r[inf_r]):
        raise AssertionError(f"{what}: infinities differ from the reference")
    finite = ~(nan_r | inf_r)
    err = (a - r).abs()[finite]
    bound = (tol.atol + tol.rtol * r.abs())[finite]
    if err.numel() and bool((err > bound).any()):
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{what}: |actual - reference| = {err[i].item():.3e} exceeds "
            f"{bound[i].item():.3e} (atol {tol.atol}, rtol {tol.rtol} for {dtype}) at flat "
            f"index {i}; actual {a[finite][i].item()!r}, reference {r[finite][i].item()!r}; "
            f"{int((err > bound).sum())} of {err.numel()} elements out of tolerance")
