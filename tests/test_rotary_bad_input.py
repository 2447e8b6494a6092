"""rotary_embedding: bad input gets an error naming the argument, the
expectation and what was given; out-of-range positions never read outside
the cache."""
import pytest
import torch

import kernelforge
from kernelforge.checks import OpArgError
from conftest import BACKENDS

D = 64


def args(T=3, hq=2, hk=1, R=D, max_position=16, dtype=torch.float32):
    positions = torch.arange(T) % max_position
    q = torch.randn(T, hq * D, dtype=dtype)
    k = torch.randn(T, hk * D, dtype=dtype)
    cache = kernelforge.rope.cos_sin_cache(R, max_position)
    return positions, q, k, cache


def call(positions, q, k, cache, head_size=D, **kw):
    return kernelforge.ops.rotary_embedding(positions, q, k, head_size, cache, **kw)


@pytest.mark.parametrize("bad", [-1, 16, 10 ** 9])
def test_position_out_of_range(bad):
    positions, q, k, cache = args()
    positions[1] = bad
    with pytest.raises(OpArgError, match=rf"`positions` expected values in \[0, 16\).*got "
                                         rf"position {bad}"):
        call(positions, q, k, cache)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_positions_are_clamped_not_read_out_of_bounds(backend):
    """check_positions=False is for callers that guarantee the range; if they
    are wrong, the kernel clamps into the cache (documented) instead of reading
    past it: the rows equal those of the clamped positions."""
    positions, q, k, cache = args(T=4)
    bad = torch.tensor([-5, 0, 15, 99])
    got_q, got_k = call(bad, q, k, cache, check_positions=False, backend=backend)
    want_q, want_k = call(bad.clamp(0, 15), q, k, cache, backend="eager")
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)


def test_rotary_dim_odd_or_larger_than_head():
    positions, q, k, _ = args()
    for R in (D + 2, 33):        # 66 > head size; 33 is odd
        cache = torch.randn(16, R)
        with pytest.raises(OpArgError, match=rf"`cos_sin_cache` expected an even rotary_dim.*"
                                             rf"got rotary_dim {R}"):
            call(positions, q, k, cache)


def test_last_dim_not_heads_times_head_size():
    positions, q, k, cache = args()
    with pytest.raises(OpArgError, match=r"`query` expected a last dim that is heads x "
                                         r"head_size=64, got 100"):
        call(positions, q[:, :100], k, cache)
    with pytest.raises(OpArgError, match=r"`key` expected last dim head_size=64"):
        call(positions, q, k.view(3, 2, 32), cache)


def test_token_counts_must_match_positions():
    positions, q, k, cache = args(T=3)
    with pytest.raises(OpArgError, match=r"`query` expected 3 rows .* got 2 rows"):
        call(positions, q[:2], k, cache)
    with pytest.raises(OpArgError, match=r"`key` expected 3 rows .* got 4 rows"):
        call(positions, q, torch.randn(4, D), cache)


def test_mismatched_dtypes_and_devices():
    positions, q, k, cache = args()
    with pytest.raises(OpArgError, match=r"`key` expected dtype torch.float32 .* got "
                                         r"torch.bfloat16"):
        call(positions, q, k.bfloat16(), cache)
    with pytest.raises(OpArgError, match=r"`query` expected dtype float32, bfloat16 or "
                                         r"float16, got torch.int32"):
        call(positions, q.int(), None, cache)
    with pytest.raises(OpArgError, match=r"`positions` expected a 1-D int64 or int32 tensor"):
        call(positions.float(), q, k, cache)
    with pytest.raises(OpArgError, match=r"`cos_sin_cache` expected a tensor on cpu .* "
                                         r"got one on meta"):
        call(positions, q, k, cache.to("meta"))
    with pytest.raises(OpArgError, match=r"`key` expected a tensor on cpu .* got one on meta"):
        call(positions, q, k.to("meta"), cache)


def test_bad_shapes_and_arguments():
    positions, q, k, cache = args()
    with pytest.raises(OpArgError, match=r"`positions` expected a 1-D"):
        call(positions[None], q, k, cache)
    with pytest.raises(OpArgError, match=r"`query` expected \[tokens, heads \* head_size\]"):
        call(positions, q.view(3, 2, D)[None], k, cache)
    with pytest.raises(OpArgError, match=r"`head_size` expected an int >= 2, got 64.0"):
        call(positions, q, k, cache, head_size=64.0)
    with pytest.raises(OpArgError, match=r"`cos_sin_cache` expected \[max_position > 0, "
                                         r"rotary_dim\]"):
        call(positions, q, k, cache[:0])
    with pytest.raises(OpArgError, match=r"`is_neox` expected a bool"):
        kernelforge.ops.rotary_embedding(positions, q, k, D, cache, "yes")
    with pytest.raises(OpArgError, match=r"`query` expected a contiguous last dimension"):
        call(positions, torch.randn(3, 4 * D)[:, ::2], k, cache)   # stride 2
    with pytest.raises(ValueError, match=r"backend: expected one of .* got .nope."):
        call(positions, q, k, cache, backend="nope")


def test_odd_head_size_with_interleaved_pairs():
    positions = torch.arange(2)
    q = torch.randn(2, 2 * 65)
    cache = torch.randn(4, 64)
    with pytest.raises(OpArgError, match=r"`head_size` expected an even head size for "
                                         r"interleaved \(GPT-J\) pairs, got 65"):
        kernelforge.ops.rotary_embedding(positions, q, None, 65, cache, False)
    out, _ = kernelforge.ops.rotary_embedding(positions, q, None, 65, cache, True,
                                              backend="eager")   # NeoX halves of 64 are fine
    assert torch.equal(out.view(2, 2, 65)[..., 64], q.view(2, 2, 65)[..., 64])


def test_zero_tokens():
    positions, q, k, cache = args(T=0)
    for inplace in (False, True):
        qo, ko = call(positions, q, k, cache, inplace=inplace)
        assert qo.shape == (0, 2 * D) and ko.shape == (0, D)
