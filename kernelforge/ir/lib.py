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


def online_softmax_step(m_i, l_i, s, axis: str):
    """One chunk of a streaming softmax: fold scores ``s`` (which vary along
    ``axis``) into the running max ``m_i`` and running sum ``l_i``.

    Returns:
        ``(m_new, l_new, p, alpha)`` where ``p = exp(s - m_new)`` are the
        chunk's unnormalised weights and ``alpha = exp(m_i - m_new)`` rescales
        anything accumulated so far (flash attention's accumulator).

    A row whose scores so far are all -inf (masked: no key visible yet) keeps
    ``m = -inf``, ``l = 0`` and gets ``p = alpha = 0`` instead of NaN.
    """
    m_new = kl.maximum(m_i, kl.max(s, axis))
    m_safe = kl.where(m_new == float("-inf"), 0.0, m_new)
    p = kl.exp(s - m_safe)
    alpha = kl.exp(m_i - m_safe)
    return m_new, l_i * alpha + kl.sum(p, axis), p, alpha


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


def uniform_from_u32(r):
    """A u32 random word to a float32 in [0, 1) using its top 24 bits."""
    return (r >> 8).to(kl.i32).to(kl.f32) * (1.0 / 16777216.0)
