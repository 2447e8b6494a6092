"""Composite ops written in the kernel language itself; they add no IR node
kinds (the way Triton's standard.py builds softmax from reductions).

Example:
    >>> from kernelforge.ir import lib
    >>> m_i, l_i = lib.online_softmax_step(m_i, l_i, scores, "N")
"""
from __future__ import annotations

from .. import lang as kl

# Philox 4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3")
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def softmax(x, axis: str):
    """softmax along ``axis`` in the dtype of ``x`` (cast to f32 first)."""
    e = kl.exp(x - kl.max(x, axis))
    return e / kl.sum(e, axis)


def online_softmax_step(m_i, l_i, s, axis: str, log2_scale=None):
    """One chunk of a streaming softmax: fold scores ``s`` (which vary along
    ``axis``) into the running max ``m_i`` and running sum ``l_i``.

    Args:
        m_i, l_i: the running max and sum so far (-inf and 0 at the start).
        s: the chunk's scores.
        axis: the axis ``s`` varies along.
        log2_scale: None: the softmax of ``s``, with ``exp``. A number ``c``:
            the softmax of ``s * c * ln 2`` (pass ``scale * log2(e)`` for the
            softmax of ``s * scale``), computed as ``exp2(s * c - m * c)``:
            one fused multiply-add and one base-2 exponential per score, the
            form GPUs evaluate natively (``exp(x)`` is ``exp2(x * log2 e)``
            there). The running max is then of the unscaled ``s``; ``c`` must
            be > 0.

    Returns:
        ``(m_new, l_new, p, alpha)`` where ``p`` are the chunk's unnormalised
        weights (``exp(s - m_new)``, or ``exp2((s - m_new) * c)``) and
        ``alpha`` rescales anything accumulated so far (flash attention's
        accumulator).

    A row whose scores so far are all -inf (masked: no key visible yet) keeps
    ``m = -inf``, ``l = 0`` and gets ``p = alpha = 0`` instead of NaN.

    Example:
        >>> m, l, p, alpha = lib.online_softmax_step(m, l, qk, "N", log2_scale=scale * LOG2E)
    """
    m_new = kl.maximum(m_i, kl.max(s, axis))
    m_safe = kl.where(m_new == float("-inf"), 0.0, m_new)
    if log2_scale is None:
        p = kl.exp(s - m_safe)
        alpha = kl.exp(m_i - m_safe)
    else:
        p = kl.exp2(s * log2_scale - m_safe * log2_scale)
        alpha = kl.exp2((m_i - m_safe) * log2_scale)
    return m_new, l_i * alpha + kl.sum(p, axis), p, alpha


#: log2(e): exp(x) = exp2(x * LOG2E)
LOG2E = 1.4426950408889634


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox 4x32 counter-based generator on u32 values: four counters and a
    two-word key in, four random words out. Every backend lowers the same
    integer ops, so the stream is bit-identical everywhere."""
    for _ in range(rounds):
        hi0, lo0 = kl.mulhi(c0, _PHILOX_M[0]), c0 * _PHILOX_M[0]
        hi1, lo1 = kl.mulhi(c2, _PHILOX_M[1]), c2 * _PHILOX_M[1]
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = k0 + _PHILOX_W[0], k1 + _PHILOX_W[1]
    return c0, c1, c2, c3

