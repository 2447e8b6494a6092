"""Bad input: a clear error naming the argument, what was expected and what
was given (issue: point 7)."""
import pytest
import torch

import kernelforge
from kernelforge.checks import OpArgError

X = torch.randn(4, 64)
W = torch.randn(64)


def _err(fn, *words):
    with pytest.raises((OpArgError, ValueError, TypeError)) as e:
        fn()
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_dtype(dtype):
    _err(lambda: kernelforge.ops.rms_norm(X.to(dtype), W), "`x`", "float32, bfloat16 or float16",
         str(dtype))
    _err(lambda: kernelforge.ops.rms_norm(X, W.to(dtype)), "`weight`", str(dtype))
    _err(lambda: kernelforge.ops.fused_add_rms_norm(X, X.to(dtype), W), "`residual`", str(dtype))


def test_weight_of_wrong_size():
    _err(lambda: kernelforge.ops.rms_norm(X, torch.randn(63)), "`weight`", "[64]", "[63]")
    _err(lambda: kernelforge.ops.rms_norm(X, torch.randn(1, 64)), "`weight`", "[1, 64]")
    _err(lambda: kernelforge.ops.fused_add_rms_norm(X, X, torch.randn(65)), "`weight`", "[65]")


def test_residual_shape_and_dtype():
    _err(lambda: kernelforge.ops.fused_add_rms_norm(X, torch.randn(3, 64), W), "`residual`",
         "[4, 64]", "[3, 64]")
    _err(lambda: kernelforge.ops.fused_add_rms_norm(X, X.half(), W), "`residual`",
         "torch.float32", "torch.float16")


def test_tensors_on_different_devices():
    meta = torch.empty(64, device="meta")
    _err(lambda: kernelforge.ops.rms_norm(X, meta), "`weight`", "cpu", "meta")
    _err(lambda: kernelforge.ops.fused_add_rms_norm(X, X.to("meta"), W), "`residual`", "meta")
    _err(lambda: kernelforge.ops.rms_norm(X, W, out=torch.empty(4, 64, device="meta")),
         "`out`", "meta")


def test_non_contiguous_last_dimension():
    xt = torch.randn(64, 4).t()       # [4, 64] with stride (1, 4)
    _err(lambda: kernelforge.ops.rms_norm(xt, W), "`x`", "contiguous last dimension", "stride 4")
    _err(lambda: kernelforge.ops.rms_norm(X, torch.randn(64, 2)[:, 0]), "`weight`", "stride 2")
    _err(lambda: kernelforge.ops.fused_add_rms_norm(X, xt, W), "`residual`", "stride 4")


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), "1e-6", None])
def test_eps_must_be_positive(eps):
    _err(lambda: kernelforge.ops.rms_norm(X, W, eps), "`eps`", "> 0", repr(eps))


def test_unknown_backend():
    msg = _err(lambda: kernelforge.ops.rms_norm(X, W, backend="cuda-fast"), "backend",
               "'cuda-fast'")
    for name in ("eager", "inductor", "triton"):
        assert name in msg
    # even when there is no row to compute
    _err(lambda: kernelforge.ops.rms_norm(X[:0], W, backend="nope"), "backend", "'nope'")


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("KERNELFORGE_BACKEND", "tpu-magic")
    _err(lambda: kernelforge.ops.rms_norm(X, W), "KERNELFORGE_BACKEND", "'tpu-magic'")


def test_out_of_wrong_shape_or_dtype():
    _err(lambda: kernelforge.ops.rms_norm(X, W, out=torch.empty(4, 63)), "`out`", "[4, 63]")
    _err(lambda: kernelforge.ops.rms_norm(X, W, out=torch.empty(4, 64, dtype=torch.half)),
         "`out`", "torch.float16")


def test_not_a_tensor_and_zero_dim():
    _err(lambda: kernelforge.ops.rms_norm([1.0, 2.0], W), "`x`", "torch.Tensor", "list")
    _err(lambda: kernelforge.ops.rms_norm(torch.tensor(1.0), torch.ones(1)), "`x`", "0-d")


def test_written_tensors_must_not_overlap_themselves():
    """An expanded (stride-0) out= or in-place tensor made copy_ raise a bare
    RuntimeError, or a kernel write one location from several rows."""
    _err(lambda: kernelforge.ops.rms_norm(X, W, out=torch.empty(1, 64).expand(4, 64)),
         "`out`", "do not share memory")
    r = torch.randn(1, 64).expand(4, 64)
    _err(lambda: kernelforge.ops.fused_add_rms_norm(X.clone(), r, W, inplace=True),
         "`residual`", "do not share memory")


def test_per_row_numbers_beyond_any_range_are_named():
    logits = torch.randn(2, 10)
    _err(lambda: kernelforge.ops.sample(logits, temperature=-2 ** 63 - 1), "`temperature`")
    _err(lambda: kernelforge.ops.sample(logits, temperature=10 ** 400), "`temperature`")
    ids = torch.full((2, 1), -1)
    for name in ("frequency_penalty", "presence_penalty"):
        # finite in float64 but inf in the fp32 math: inf * 0 counts made NaN logits
        _err(lambda: kernelforge.ops.apply_penalties(logits, ids, ids, **{name: 1e300}),
             f"`{name}`", "float32")
    _err(lambda: kernelforge.ops.apply_penalties(logits, ids, ids, repetition_penalty=1e-50),
         "`repetition_penalty`", "> 0")


def test_numbers_a_kernel_reads_as_fp32_are_named():
    """eps=10**400 raised a bare OverflowError; offset=inf was accepted."""
    _err(lambda: kernelforge.ops.rms_norm(X, W, 10 ** 400), "`eps`", "float32")
    _err(lambda: kernelforge.ops.rms_norm(X, W, offset=float("inf")), "`offset`", "inf")
    _err(lambda: kernelforge.ops.rms_norm(X, W, 1e-50), "`eps`", "float32")


def test_aliased_outputs_that_cannot_be_right_are_refused():
    x = torch.randn(4, 64)
    _err(lambda: kernelforge.ops.fused_add_rms_norm(x, x, W, inplace=True), "`x`",
         "overlaps `residual`")
    qk = torch.randn(3, 2 * 64)
    cache = kernelforge.rope.cos_sin_cache(64, 8)
    _err(lambda: kernelforge.ops.rotary_embedding(torch.arange(3), qk, qk, 64, cache,
                                                  inplace=True), "overlaps")
    # on inductor this was a NameError from generated code
    xx = torch.randn(4, 128)
    _err(lambda: kernelforge.ops.silu_and_mul(xx, out=xx[:, :64], backend="inductor"),
         "`out`", "overlaps `x`")


def test_overlap_is_exact_for_interleaved_views_of_one_buffer():
    """vLLM's CPU KV cache, [blocks, heads, block_size, 2 * D]: per block and
    head, block_size key rows then block_size value rows. Its key and value
    views share no element (exact answer, not the byte-range guess); a value
    view shifted by one row onto the keys does, and a brute-force count of
    shared addresses agrees in both cases."""
    from kernelforge import checks
    nb, h, bs, d = 4, 2, 8, 16
    kv = torch.zeros(nb, h, bs, 2 * d)
    k, v = kv.view(nb, h, 2 * bs, d).chunk(2, dim=2)
    k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    def addresses(t):
        return {t.storage_offset() + sum(i * s for i, s in zip(ix, t.stride()))
                for ix in torch.cartesian_prod(*[torch.arange(n) for n in t.shape]).tolist()}

    assert not addresses(k) & addresses(v)
    assert not checks.overlaps(k, v) and not checks.overlaps(v, k)
    shifted = torch.as_strided(kv, v.shape, v.stride(), v.storage_offset() - d)
    assert addresses(k) & addresses(shifted)
    assert checks.overlaps(k, shifted) and checks.overlaps(shifted, k)
