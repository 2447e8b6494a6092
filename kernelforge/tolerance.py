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
                 what: str = "", extra: torch.Tensor | None = None) -> None:
    """Check ``actual`` against a float64 ``reference`` under the policy for
    ``dtype``; NaN and inf must appear in the same places with the same sign.

    ``extra``: an allowance per element added to the bound, for a rounding
    the op itself specifies, computed from the data by the caller's reference
    (attention with ``round_p``: ``rtol * sum_j p_j |v_j|``, docs/tolerance.md).
    """
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
    bound = tol.atol + tol.rtol * r.abs()
    if extra is not None:
        bound = bound + extra.detach().double().cpu().expand_as(bound)
    bound = bound[finite]
    if err.numel() and bool((err > bound).any()):
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{what}: |actual - reference| = {err[i].item():.3e} exceeds "
            f"{bound[i].item():.3e} (atol {tol.atol}, rtol {tol.rtol} for {dtype}"
            f"{', plus the op-specified allowance' if extra is not None else ''}) at flat "
            f"index {i}; actual {a[finite][i].item()!r}, reference {r[finite][i].item()!r}; "
            f"{int((err > bound).sum())} of {err.numel()} elements out of tolerance")


def assert_close_rows(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                      what: str = "") -> None:
    """Whole-model outputs (rows of logits) under the policy for ``dtype``, the
    bound scaled by each row's largest magnitude instead of each element's:

        |actual - reference| <= atol + rtol * max_j |reference[row, j]|

    Why: a logit ends a chain of dot products, and two correct computations
    that sum in different orders (another batch size, so another GEMM kernel;
    another library) differ by rounding errors the size of the *terms*, which a
    logit near zero does not shrink: correct forwards differ there by more than
    the elementwise rule allows, yet by a small fraction of the row's scale,
    while a real bug (a padding row leaking into another, a wrong key) moves a
    logit by O(1) (numbers: docs/tolerance.md, "Whole-model outputs").
    """
    a, r = actual.detach().double().cpu(), reference.detach().double().cpu()
    if a.shape != r.shape or a.dim() != 2:
        raise AssertionError(f"{what}: shape {list(a.shape)} vs reference {list(r.shape)}; "
                             "rows of equal shape expected")
    if not bool(torch.isfinite(r).all()) or not bool(torch.isfinite(a).all()):
        raise AssertionError(f"{what}: non-finite values (rows of logits are finite)")
    tol = tolerance(dtype)
    err = (a - r).abs()
    bound = tol.atol + tol.rtol * r.abs().amax(dim=-1, keepdim=True)
    bad = err > bound
    if bool(bad.any()):
        row, col = divmod(int(torch.argmax((err - bound).flatten())), a.shape[1])
        raise AssertionError(
            f"{what}: |actual - reference| = {err[row, col].item():.3e} exceeds "
            f"{bound[row, 0].item():.3e} (atol {tol.atol} + rtol {tol.rtol} x the row's "
            f"largest |value| {r[row].abs().max().item():.4g}, for {dtype}) at row {row}, "
            f"column {col}; {int(bad.sum())} of {err.numel()} elements out of tolerance")
