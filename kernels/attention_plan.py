"""The per-step half of paged attention: what depends only on the batch layout.

A model calls ``paged_attention`` once per layer with the same block tables,
lengths and query offsets. Everything derived from those (each row's
sequence and key range, the checked tables) is the same in
every layer, so an engine builds it once per step (FlashInfer's plan/run
split; vLLM's attention metadata) and passes it as ``plan=``:

    >>> plan = kernelforge.ops.paged_attention_plan(tables, lens, qsl)
    >>> for layer in layers:
    ...     o = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, qsl, plan=plan)

Without ``plan=`` the op builds one per call; the results are the same.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernelforge import checks


class PagedAttentionPlan:
    """Built by ``paged_attention_plan``; read by ``paged_attention``. Holds
    the tensors it was built from (a call must pass the same ones) and, from
    the first call on, the per-row key ranges and the cache shapes its tables
    were checked against."""

    __slots__ = ("block_tables", "seq_lens", "query_start_loc", "causal", "window",
                 "check_tables", "qsl", "qsl_host", "lens", "q_lens", "tables", "rows", "checked",
                 "_context")

    def matches(self, op, block_tables, seq_lens, query_start_loc, causal, window,
                check_tables) -> None:
        """Raise naming ``plan`` unless this call describes the batch it was built for."""
        for name, mine, given in (("block_tables", self.block_tables, block_tables),
                                  ("seq_lens", self.seq_lens, seq_lens),
                                  ("query_start_loc", self.query_start_loc, query_start_loc)):
            if mine is not given:
                checks.fail(op, "plan", f"a plan built from this call's `{name}` (the same "
                            "tensor object)", "a plan built from another tensor")
        for name, mine, given in (("causal", self.causal, causal), ("window", self.window, window),
                                  ("check_tables", self.check_tables, check_tables)):
            if mine != given:
                checks.fail(op, "plan", f"a plan built with {name}={given!r}",
                            f"one built with {name}={mine!r}")

    def context(self, n: int, device) -> torch.Tensor:
        """An int32 tensor of ``n`` entries, kept: the kernel reads only its
        length (an expanded stride-0 view would be copied by a lowering that
        wants a contiguous last dim, on every call)."""
        key = (n, device)
        if key not in self._context:
            if len(self._context) > 8:        # (a few lengths per step: context, split)
                self._context.clear()
            self._context[key] = torch.empty(n, dtype=torch.int32, device=device)
        return self._context[key]

    #: the split kernel's ``split`` argument: only its length (keys per split) is read
    split_length = context

    def key_ranges(self, num_tokens: int, num_keys: int, device):
        """(sequence, first key, end key) per query row, int32, computed once.
        Each range is clamped into the ``num_keys`` positions the block table
        holds: unchecked lengths (``check_tables=False``) cannot make a
        lowering walk past the table or loop over an absurd range."""
        if self.rows is None or self.rows[0] != (num_tokens, num_keys):
            from .attention import _rows, _clamp_ranges
            seq, lo, hi = _rows(self.qsl, self.q_lens, self.lens, self.causal, self.window,
                                device, num_tokens)
            lo, hi = _clamp_ranges(lo, hi, num_keys)
            self.rows = ((num_tokens, num_keys), seq.to(torch.int32), lo.to(torch.int32),
                         hi.to(torch.int32))
        return self.rows[1:]


def paged_attention_plan(block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         query_start_loc: torch.Tensor, *, causal: bool = True,
                         window: Optional[int] = None,
                         check_tables: bool = True) -> PagedAttentionPlan:
    """Derive, once per step, what every layer's ``paged_attention`` call shares.

    Args:
        block_tables, seq_lens, query_start_loc: as in ``paged_attention``;
            the calls that use the plan must pass these same tensor objects
            (and not change their values in between).
        causal, window, check_tables: as in ``paged_attention``; the calls
            must agree. With ``check_tables`` the offsets are checked here
            and the tables against each cache shape on its first use.
    Returns:
        a ``PagedAttentionPlan`` for ``paged_attention(..., plan=)``.

    Example:
        >>> plan = kernelforge.ops.paged_attention_plan(tables, lens, qsl)
    """
    op = "paged_attention_plan"
    if not isinstance(check_tables, bool):
        checks.fail(op, "check_tables", "a bool", repr(check_tables))
    check_mask_args(op, causal, window)
    return build(block_tables, seq_lens, query_start_loc, causal, window, check_tables, op)


def check_mask_args(op: str, causal, window) -> None:
    """``causal`` a bool and ``window`` None or an int >= 0 (every attention op)."""
    if not isinstance(causal, bool):
        checks.fail(op, "causal", "a bool", repr(causal))
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or window < 0):
        checks.fail(op, "window", "None or an int >= 0 (keys at most `window` positions "
                    "to the left)", repr(window))


def build(block_tables, seq_lens, query_start_loc, causal, window, check_tables,
          op: str) -> PagedAttentionPlan:
    """``paged_attention_plan`` with ``causal``, ``window`` and ``check_tables``
    already checked; errors named after ``op``."""
    from .attention import _lengths
    qsl, host = _lengths(op, "query_start_loc", query_start_loc, query_start_loc,
                         host_check=check_tables)
    B = qsl.shape[0] - 1
    for name, x, dims in (("block_tables", block_tables, 2), ("seq_lens", seq_lens, 1)):
        checks.tensor(op, name, x)
        checks.same_device(op, name, x, "query_start_loc", query_start_loc)
        if x.dtype not in (torch.int32, torch.int64) or x.dim() != dims or x.shape[0] != B:
            checks.fail(op, name, f"a {dims}-D int32 tensor with {B} rows (one per sequence "
                        "in `query_start_loc`)", f"{x.dim()}-D {x.dtype} {list(x.shape)}")
    p = PagedAttentionPlan()
    p.block_tables, p.seq_lens, p.query_start_loc = block_tables, seq_lens, query_start_loc
    p.causal, p.window, p.check_tables = causal, window, check_tables
    p.qsl, p.qsl_host, p.lens, p.q_lens = qsl, host, seq_lens.to(torch.int64), qsl.diff()
    p.tables = block_tables if block_tables.dtype == torch.int32 else \
        block_tables.to(torch.int32)
    p.rows, p.checked, p._context = None, set(), {}
    return p
