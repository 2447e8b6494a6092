"""A repeat call with the key of a call whose checks passed skips them
(OpSpec.checks_by_key); every call that differs in what the checks read is
still checked in full, with the same errors."""
import math

import pytest
import torch

import kernelforge
from kernelforge import cache
from kernelforge.checks import OpArgError


def test_a_repeat_skips_the_checks_and_gives_the_same_result():
    x, w = torch.randn(3, 64), torch.randn(64)
    cache.checked.clear()
    first = kernelforge.ops.rms_norm(x, w, 1e-6)
    assert len(cache.checked) == 1
    again = kernelforge.ops.rms_norm(x, w, 1e-6)
    assert len(cache.checked) == 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)


@pytest.mark.parametrize("bad,words", [
    (lambda x, w: dict(x=x, weight=w[:-1], eps=1e-6), "`weight`"),
    (lambda x, w: dict(x=x, weight=w, eps=math.nan), "`eps`"),
    (lambda x, w: dict(x=x, weight=w, eps=-1.0), "`eps`"),
    (lambda x, w: dict(x=x.double(), weight=w, eps=1e-6), "`x`"),
    (lambda x, w: dict(x=x.t(), weight=w[:3], eps=1e-6), "`x`"),
    (lambda x, w: dict(x=x, weight=w, eps=1e-6, out=x), "`out`"),
    (lambda x, w: dict(x=x, weight=w, eps=1e-6, backend="nope"), "`backend`"),
])
def test_bad_calls_after_good_ones_still_raise(bad, words):
    x, w = torch.randn(3, 64), torch.randn(64)
    for _ in range(2):
        kernelforge.ops.rms_norm(x, w, 1e-6)
    for _ in range(2):      # a failed call is never remembered as checked
        with pytest.raises((OpArgError, ValueError), match=words.replace("`", ".")):
            kernelforge.ops.rms_norm(**bad(x, w))


def test_out_and_in_place_calls_are_always_checked():
    x = torch.randn(2, 3, 8)
    cache.checked.clear()
    kernelforge.ops.silu_and_mul(x, out=torch.empty(2, 3, 4))
    assert not cache.checked
    pos = torch.arange(4)
    q, k = torch.randn(4, 2, 8), torch.randn(4, 1, 8)
    rope = torch.randn(8, 8)
    kernelforge.ops.rotary_embedding(pos, q, k, 8, rope, inplace=True)
    kernelforge.ops.rotary_embedding(pos, q, k, 8, rope)     # check_positions reads values
    assert not cache.checked
    kernelforge.ops.rotary_embedding(pos, q, k, 8, rope, check_positions=False)
    assert len(cache.checked) == 1
    with pytest.raises(OpArgError, match="overlaps"):      # the same tensors, in place
        kernelforge.ops.rotary_embedding(pos, q, q, 8, rope, inplace=True)
    with pytest.raises(OpArgError, match=".positions. expected values in"):
        kernelforge.ops.rotary_embedding(pos + 8, q, k, 8, rope)
