"""``run`` for row-wise ops (RMSNorm, activations, LayerNorm...): rows of the
inputs' last dim map to rows of the outputs. Kernel files import it from
``kernelforge.spec`` with the rest of an op's vocabulary."""
from __future__ import annotations

from typing import Callable

import torch

from . import checks


def rowwise(launch_rows: Callable, inputs: tuple = ("x",), inplace_of: dict | None = None):
    """``run`` for ops that map rows of their inputs' last dim to rows of
    their outputs. ``launch_rows(a, *input_rows, *output_rows)`` launches on
    [rows, last dim] views (the outputs may be ``NewTensor``s, returned in
    order). Handles zero rows and empty rows (no launch), leading dims, rows
    that cannot be viewed (computed in a copy, written back), ``out=`` and the
    in-place form (``inplace_of``: output name -> the input it overwrites).
    A tensor given twice (in place: input and output) is passed as the very
    same object both times, so torch.compile sees the aliasing."""
    from .dispatch import NewTensor

    def fresh(a, xs):
        """No ``out=``, not in place: every output is new."""
        x0 = xs[0]
        in_rows = [x if x.dim() == 2 else checks.rows(x)[0] for x in xs]
        m = in_rows[0].shape[0]
        lasts = [tuple(o.shape(a))[-1] for o in a._outputs]
        if m == 0 or 0 in lasts or any(r.shape[-1] == 0 for r in in_rows):
            return None
        made = launch_rows(a, *in_rows, *[NewTensor((m, n), o.dtype_of(a), x0.device)
                                          for o, n in zip(a._outputs, lasts)])
        lead = x0.shape[:-1]
        if len(made) == 1:
            return made[0].view(*lead, lasts[0])
        return tuple(t.view(*lead, n) for t, n in zip(made, lasts))

    def run(a):
        if getattr(a, "out", None) is None and not (inplace_of and getattr(a, "inplace", False)):
            res = fresh(a, [getattr(a, n) for n in inputs])
            if res is not None:
                return res
        views: dict[int, tuple] = {}

        def rows(t):
            hit = views.get(id(t))
            if hit is None:
                hit = views[id(t)] = checks.rows(t)
            return hit

        xs = [getattr(a, n) for n in inputs]
        lead = tuple(xs[0].shape[:-1])
        in_rows = [rows(x)[0] for x in xs]
        m = in_rows[0].shape[0]
        inplace = bool(inplace_of) and bool(getattr(a, "inplace", False))
        outs, given = [], []
        for i, o in enumerate(a._outputs):
            g = getattr(a, inplace_of[o.name]) if inplace else \
                (getattr(a, "out", None) if i == 0 else None)
            given.append(g)
            outs.append(rows(g)[0] if g is not None else
                        NewTensor((m, tuple(o.shape(a))[-1]), o.dtype_of(a), xs[0].device))
        empty = m == 0 or any(r.shape[-1] == 0 for r in in_rows) or \
            any(o.shape[-1] == 0 for o in outs)
        if empty:
            made = iter([torch.empty(o.shape, dtype=o.dtype, device=o.device)
                         for o in outs if isinstance(o, NewTensor)])
        else:
            made = iter(launch_rows(a, *in_rows, *outs))
        final = []
        for o, g in zip(a._outputs, given):
            final.append(g if g is not None else next(made).view(*lead, tuple(o.shape(a))[-1]))
        for g in given:
            if g is not None and rows(g)[1]:
                g.copy_(rows(g)[0].view(g.shape))     # rows that could not be viewed
        return final[0] if len(final) == 1 else tuple(final)
    return run
