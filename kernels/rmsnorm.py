"""The RMSNorm family, written once in the kernel IR.

    y = x / sqrt(mean(x**2) + eps) * (weight + offset)

computed in fp32 and stored in the input dtype; ``offset=1.0`` is Gemma's
``(1 + weight)`` form. Each row walks the hidden axis twice (sum of squares,
then scale): Triton runs one chunk when the row fits a block and loops over
chunks when it does not; the torch lowerings see the whole row at once.

The fused residual variant rounds ``x + residual`` to the input dtype (the
value it returns and the next layer reads) and normalises that rounded sum,
as vLLM's CUDA kernel does. Its second pass recomputes the sum from the
inputs instead of re-reading the stored one, so writing the results over
``x`` and ``residual`` (in place) never reads a value it has overwritten.
"""
from typing import Optional

import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.backends import registry
from kernelforge.dispatch import NewTensor, launch


@kl.kernel(static=("N",), examples=({"N": 4096}, {"N": 16384}))
def rms_norm_fwd(x: kl.In("M", "N"), w: kl.In("N"), out: kl.Out("M", "N"),
             eps: kl.f32, offset: kl.f32):
    m = kl.parallel("M")

    def sum_squares(n, acc):
        xs = kl.load(x[m, n]).to(kl.f32)
        return acc + kl.sum(xs * xs, "N")

    ss = kl.seq_for("N", sum_squares, init=kl.zeros(kl.f32, "M"))
    inv_rms = kl.rsqrt(ss / kl.size("N").to(kl.f32) + eps)

    def scale(n):
        xs = kl.load(x[m, n]).to(kl.f32)
        wt = kl.load(w[n]).to(kl.f32) + offset
        kl.store(out[m, n], (xs * inv_rms * wt).to(out.dtype))

    kl.seq_for("N", scale)


@kl.kernel(static=("N",), examples=({"N": 4096}, {"N": 16384}))
def fused_add_rms_norm_fwd(x: kl.In("M", "N"), r: kl.In("M", "N"),
                       w: kl.In("N"), out: kl.Out("M", "N"), r_out: kl.Out("M", "N"),
                       eps: kl.f32, offset: kl.f32):
    m = kl.parallel("M")

    def residual_sum(n):
        # rounded to the storage dtype: the sum every later consumer sees
        s = kl.load(x[m, n]).to(kl.f32) + kl.load(r[m, n]).to(kl.f32)
        return s.to(r_out.dtype).to(kl.f32)

    def sum_squares(n, acc):
        s = residual_sum(n)
        return acc + kl.sum(s * s, "N")

    ss = kl.seq_for("N", sum_squares, init=kl.zeros(kl.f32, "M"))
    inv_rms = kl.rsqrt(ss / kl.size("N").to(kl.f32) + eps)

    def scale(n):
        s = residual_sum(n)
        wt = kl.load(w[n]).to(kl.f32) + offset
        kl.store(r_out[m, n], s.to(r_out.dtype))
        kl.store(out[m, n], (s * inv_rms * wt).to(out.dtype))

    kl.seq_for("N", scale)


# -- the public ops -------------------------------------------------------------

def _check(op: str, x, weight, eps, offset, backend):
    checks.tensor(op, "x", x)
    checks.tensor(op, "weight", weight)
    checks.at_least_1d(op, "x", x)
    checks.float_dtype(op, "x", x)
    checks.float_dtype(op, "weight", weight)
    checks.same_device(op, "weight", weight, "x", x)
    checks.shape(op, "weight", weight, (x.shape[-1],), " (the last dim of `x`)")
    checks.last_dim_contiguous(op, "x", x)
    checks.last_dim_contiguous(op, "weight", weight)
    checks.positive(op, "eps", eps)
    checks.number(op, "offset", offset)
    if not torch.compiler.is_compiling():    # (while tracing, the custom op checks it)
        registry.select(x.device, backend)     # an unknown backend fails even for 0 rows


def _rms_norm_impl(x, weight, eps, offset, out, backend):
    x2, _ = checks.rows(x)
    if out is None:    # let the backend allocate it (Inductor writes fresh buffers faster)
        if not x2.shape[0]:
            return torch.empty(x.shape, dtype=x.dtype, device=x.device)
        (y,) = launch(rms_norm_fwd, x2, weight, NewTensor(x2.shape, x.dtype, x.device),
                      float(eps), float(offset), backend=backend)
        return y.view(x.shape)
    out2, copied = checks.rows(out)
    if x2.shape[0]:
        launch(rms_norm_fwd, x2, weight, out2, float(eps), float(offset), backend=backend)
    if copied:
        out.copy_(out2.view(out.shape))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x**2) + eps) * (weight + offset)``.

    Args:
        x: [..., N] float32, bfloat16 or float16; rows may be strided, the
            last dim must be contiguous.
        weight: [N], any float dtype (read as fp32).
        eps: added to the mean square; must be > 0.
        offset: added to the weight; 1.0 gives Gemma's ``(1 + weight)``.
        out: optional output, same shape and dtype as ``x``.
        backend: "eager", "inductor", "triton" or None (chosen per device).
    Returns:
        the normalised tensor, in ``x``'s dtype (``out`` when given).

    Example:
        >>> x = torch.randn(4, 576); w = torch.ones(576)
        >>> y = kernelforge.ops.rms_norm(x, w, 1e-6)
    """
    op = "rms_norm"
    _check(op, x, weight, eps, offset, backend)
    if out is not None:
        checks.tensor(op, "out", out)
        checks.shape(op, "out", out, tuple(x.shape), " (the shape of `x`)")
        checks.same_dtype(op, "out", out, "x", x)
        checks.same_device(op, "out", out, "x", x)
        checks.last_dim_contiguous(op, "out", out)
    if checks.opaque():
        y = torch.ops.kernelforge.rms_norm(x, weight, float(eps), float(offset), backend)
        return y if out is None else out.copy_(y)
    return _rms_norm_impl(x, weight, eps, offset, out, backend)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6, *, offset: float = 0.0, inplace: bool = False,
                       backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm, in one pass over memory.

    ``s = (x + residual)`` rounded to x's dtype; returns ``(rms_norm(s), s)``.

    Args:
        x, residual: [..., N], same shape and float dtype.
        weight, eps, offset, backend: as in ``rms_norm``.
        inplace: write the normalised rows into ``x`` and the sum into
            ``residual`` and return them (vLLM's calling convention).
    Returns:
        ``(normed, x + residual)``.

    Example:
        >>> h, res = kernelforge.ops.fused_add_rms_norm(h, res, w, 1e-6, inplace=True)
    """
    op = "fused_add_rms_norm"
    _check(op, x, weight, eps, offset, backend)
    checks.tensor(op, "residual", residual)
    checks.shape(op, "residual", residual, tuple(x.shape), " (the shape of `x`)")
    checks.same_dtype(op, "residual", residual, "x", x)
    checks.same_device(op, "residual", residual, "x", x)
    checks.last_dim_contiguous(op, "residual", residual)
    if checks.opaque():
        if inplace:
            torch.ops.kernelforge.fused_add_rms_norm_(x, residual, weight, float(eps),
                                                      float(offset), backend)
            return x, residual
        return torch.ops.kernelforge.fused_add_rms_norm(x, residual, weight, float(eps),
                                                        float(offset), backend)
    return _fused_impl(x, residual, weight, eps, offset, inplace, backend)


def _fused_impl(x, residual, weight, eps, offset, inplace, backend):
    (x2, x_copied), (r2, r_copied) = checks.rows(x), checks.rows(residual)
    if not inplace:    # let the backend allocate the outputs
        if not x2.shape[0]:
            return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
                    torch.empty(x.shape, dtype=x.dtype, device=x.device))
        new = NewTensor(x2.shape, x.dtype, x.device)
        out, res_out = launch(fused_add_rms_norm_fwd, x2, r2, weight, new, new, float(eps),
                              float(offset), backend=backend)
        return out.view(x.shape), res_out.view(x.shape)
    # In place: the outputs are the inputs. Pass the very same tensor objects
    # for aliased arguments, so torch.compile sees the aliasing (distinct views
    # of one buffer look independent and let Inductor reorder a write before a
    # read). Rows that cannot be viewed were copied: compute there, copy back.
    if x2.shape[0]:
        launch(fused_add_rms_norm_fwd, x2, r2, weight, x2, r2, float(eps), float(offset),
               backend=backend)
    if x_copied:
        x.copy_(x2.view(x.shape))
    if r_copied:
        residual.copy_(r2.view(residual.shape))
    return x, residual


# -- torch.library custom ops: opaque, compile-safe entry points for engines ---------

@torch.library.custom_op("kernelforge::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                 backend: Optional[str]) -> torch.Tensor:
    return _rms_norm_impl(x, weight, eps, offset, None, backend)


@_rms_norm_op.register_fake
def _(x, weight, eps, offset, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("kernelforge::fused_add_rms_norm", mutates_args=())
def _fused_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
              offset: float, backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_impl(x, residual, weight, eps, offset, False, backend)


@_fused_op.register_fake
def _(x, residual, weight, eps, offset, backend):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


@torch.library.custom_op("kernelforge::fused_add_rms_norm_", mutates_args=("x", "residual"))
def _fused_inplace_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float, offset: float, backend: Optional[str]) -> None:
    _fused_impl(x, residual, weight, eps, offset, True, backend)


@_fused_inplace_op.register_fake
def _(x, residual, weight, eps, offset, backend):
    return None
