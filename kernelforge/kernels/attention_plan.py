"""Host planning for the attention ops (``attention.py``), apart from the
kernels (``attention_kernels.py``): each query row's sequence and key range,
the launch pieces of lowerings that collapse the key loop, the checked
offsets and block tables, the split count, and the per-step plan.

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

import functools
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
                 "_context", "lens_host", "_pieces")

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
        """An int32 tensor of ``n`` entries (a view of one kept buffer): the
        kernel reads only its length (an expanded stride-0 view would be
        copied by a lowering that wants a contiguous last dim, on every call)."""
        base = self._context
        if base is None or base.shape[0] < n or base.device != device:
            self._context = base = torch.empty(n, dtype=torch.int32, device=device)
        return base if base.shape[0] == n else base[:n]

    #: the split kernel's ``split`` argument: only its length (keys per split) is read
    split_length = context

    def key_ranges(self, num_tokens: int, num_keys: int, device):
        """(sequence, first key, end key) per query row, int32, computed once.
        Each range is clamped into the ``num_keys`` positions the block table
        holds: unchecked lengths (``check_tables=False``) cannot make a
        lowering walk past the table or loop over an absurd range."""
        if self.rows is None or self.rows[0] != (num_tokens, num_keys):
            seq, lo, hi = row_ranges(self.qsl, self.q_lens, self.lens, self.causal,
                                     self.window, device, num_tokens)
            lo, hi = clamp_ranges(lo, hi, num_keys)
            self.rows = ((num_tokens, num_keys), seq.to(torch.int32), lo.to(torch.int32),
                         hi.to(torch.int32))
        return self.rows[1:]

    def launch_pieces(self, num_tokens: int, block_size: int, max_blocks: int,
                      max_pairs: int, device):
        """Launches for a lowering that collapses the key loop, computed once:
        (row0, row1, chunks) per piece of at most ``max_pairs`` (row, key)
        pairs, each chunk (block tables, sequence, first key, end key, key
        positions) one launch's view of the keys. With the host's lengths
        (``check_tables``: already read there) a piece keeps only the
        block-table rows and columns its rows see; without them, row blocks
        over every position. A piece is one row where a row alone exceeds
        ``max_pairs``; its keys are then cut into chunks of at most
        ``max_pairs`` positions (whole blocks), merged like splits."""
        key = (num_tokens, block_size, max_blocks, max_pairs, device)
        if self._pieces is not None and self._pieces[0] == key:
            return self._pieces[1]
        n = max_blocks * block_size
        seq, lo, hi = self.key_ranges(num_tokens, n, device)
        B = self.tables.shape[0]
        if self.qsl_host is None:
            rows = max(1, max_pairs // max(n, 1))
            spans = [(r0, min(num_tokens, r0 + rows), 0, n, 0, B)
                     for r0 in range(0, num_tokens, rows)]
        else:
            if self.lens_host is None:
                self.lens_host = self.lens.tolist()
            ck = [0]
            for x in self.lens_host:
                ck.append(ck[-1] + x)
            spans = pieces(self.qsl_host, ck, self.causal, self.window, PIECE_ROWS, max_pairs,
                           local=True, block=block_size)
        out = []
        for r0, r1, k0, k1, b0, b1 in spans:
            c0, c1 = k0 // block_size, -(-k1 // block_size)
            # one row over more positions than the budget: chunks of whole blocks
            step = c1 - c0 if r1 - r0 > 1 else max(1, max_pairs // block_size)
            whole = (b0, b1) == (0, B)
            s = seq[r0:r1] if whole else seq[r0:r1] - b0
            chunks = []
            for a in range(c0, max(c1, c0 + 1), step):
                e = min(c1, a + step)
                width = (e - a) * block_size
                l, h = lo[r0:r1], hi[r0:r1]
                if whole and (a, e) == (0, max_blocks):
                    chunks.append((self.tables, s, l, h, width))
                    continue
                tables = self.tables[b0:b1, a:e].contiguous()
                # ranges cut to the chunk (a row's empty range may lie outside it)
                l, h = clamp_ranges(l - a * block_size, h - a * block_size, width)
                chunks.append((tables, s, l, h, width))
            out.append((r0, r1, chunks))
        self._pieces = (key, out)
        return out


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


def lengths(op, name, cu, q, total=None, total_name="", host_check=True):
    """Per-sequence offsets from a cumulative [B+1] int tensor, and their host
    copy; ``host_check=False`` checks only dtype, shape and device (no
    device-to-host copy: the caller vouches for the values) and returns None."""
    checks.tensor(op, name, cu)
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.shape[0] < 1:
        checks.fail(op, name, "a 1-D int32 tensor [batch + 1] (at least one entry)",
                    f"{cu.dtype} of shape {list(cu.shape)}")
    checks.same_device(op, name, cu, "q", q)
    if not host_check:
        return cu.to(torch.int64), None
    host = cu.tolist()
    if host[0] != 0:
        checks.fail(op, name, "to start at 0", f"{host[0]}")
    bad = next((i for i in range(1, len(host)) if host[i] < host[i - 1]), None)
    if bad is not None:
        checks.fail(op, name, "non-decreasing offsets", f"{host[bad - 1]} then {host[bad]} "
                    f"at index {bad}")
    if total is not None and host[-1] != total:
        checks.fail(op, name, f"to end at {total} (the tokens in `{total_name}`)",
                    f"{host[-1]}")
    return cu.to(torch.int64), host


def row_ranges(q_start, q_lens, k_lens, causal, window, device, T):
    """Per query token: its sequence and the range [lo, hi) of key positions
    (within its sequence) it attends to. Causal is aligned to the end of the
    keys: the last query sees every key (vLLM's and FlashAttention's rule)."""
    B = q_lens.shape[0]
    rows = torch.arange(T, device=device)
    # the sequence of each row by search, not repeat_interleave: no host sync,
    # and unchecked offsets that do not sum to T cannot write out of bounds
    seq = torch.searchsorted(q_start[1:], rows, right=True).clamp_(max=max(B - 1, 0))
    i = rows - q_start[seq]
    k_len = k_lens[seq]
    pos = k_len - q_lens[seq] + i                     # the query's own key position
    hi = torch.minimum(pos + 1, k_len) if causal else k_len
    lo = torch.zeros_like(hi) if window is None else (pos - window).clamp(min=0)
    hi = torch.maximum(hi.clamp(min=0), lo)
    return seq, lo, hi


def clamp_ranges(lo, hi, n):
    """Key ranges [lo, hi) cut to [0, n), hi >= lo (on the device, no sync)."""
    lo = lo.clamp(0, n)
    return lo, torch.maximum(hi.clamp(max=n), lo)


#: query rows per launch when the lowering collapses the key loop: more rows
#: share a launch's cost, too many make each row walk keys it does not see
#: (docs/benchmarks.md, "Query tiles for small calls")
PIECE_ROWS = 128
#: bytes of temporaries one launch may build on a lowering that collapses the
#: key loop (``Backend.collapses_loops``): it holds every (query row, key)
#: pair of the launch at once, so launches are cut to stay within this
PIECE_BYTES = 1 << 30


def packed_pair_bytes(hq: int) -> int:
    """Temporaries per (query row, key) of the packed kernel's torch lowering:
    fp32 scores, weights and their masked copies per query head."""
    return 24 * hq + 8


def paged_pair_bytes(hq: int, hkv: int, d: int, elem: int) -> int:
    """Temporaries per (query row, key position) of the paged kernels' torch
    lowering: the fp32 q * k and p * v products before their sums (Hq x D
    each, one of them twice, masked), the gathered keys and values in the
    cache's type (``elem`` bytes) and in fp32, and the scores per query head."""
    return 4 * d * (3 * hq + 2 * hkv) + 2 * hkv * d * elem + 32 * hq + 8


def pieces(cq, ck, causal, window, max_rows, max_pairs=None, local=False, block=1):
    """Host plan of launches (row0, row1, key0, key1, seq0, seq1): blocks of
    at most ``max_rows`` query rows of one sequence with the keys those rows
    see, fewer rows where the block would compute more than ``max_pairs``
    (row, key) pairs (down to one row); consecutive pieces merge while the
    merged launch computes at most twice their pairs plus one full block (a
    launch costs about as much as that) and at most ``max_pairs``. Keys are
    positions in k (``local``: within each row's own sequence, as a block
    table reads them), spans rounded out to multiples of ``block`` within
    the sequence (a launch reads whole table blocks); seq0, seq1: the
    sequences of the piece's rows.
    Every query row is in exactly one piece, in order."""
    out = []
    for b in range(len(cq) - 1):
        q0, qn = cq[b], cq[b + 1] - cq[b]
        k0, kn = (0 if local else ck[b]), ck[b + 1] - ck[b]

        def span(i0, i1):
            first, last = kn - qn + i0, kn - qn + i1 - 1     # the rows' own key positions
            hi = max(0, min(last + 1, kn)) if causal else kn
            lo = min(hi, 0 if window is None else max(0, first - window))
            return lo // block * block, -(-hi // block) * block

        i0 = 0
        while i0 < qn:
            i1 = min(qn, i0 + max_rows)
            lo, hi = span(i0, i1)
            while max_pairs is not None and i1 - i0 > 1 and (i1 - i0) * (hi - lo) > max_pairs:
                i1 = i0 + (i1 - i0) // 2
                lo, hi = span(i0, i1)
            piece = [q0 + i0, q0 + i1, k0 + lo, k0 + hi, (i1 - i0) * (hi - lo), b, b + 1]
            i0 = i1
            if out:
                p = out[-1]
                rows, k_lo, k_hi = piece[1] - p[0], min(p[2], piece[2]), max(p[3], piece[3])
                pairs = rows * (k_hi - k_lo)
                if rows <= max_rows and pairs <= 2 * (p[4] + piece[4]) + max_rows * max_rows \
                        and (max_pairs is None or pairs <= max_pairs):
                    out[-1] = [p[0], piece[1], k_lo, k_hi, p[4] + piece[4], p[5], b + 1]
                    continue
            out.append(piece)
    return [(p[0], p[1], p[2], p[3], p[5], p[6]) for p in out]


def check_block_tables(op, block_tables, lens, q_lens, nb, bs, mb):
    """The blocks each sequence uses exist, and its length fits them."""
    lo_len, hi_len = (int(x) for x in torch.aminmax(lens))
    if lo_len < 0 or hi_len > mb * bs:
        bad = lo_len if lo_len < 0 else hi_len
        checks.fail(op, "seq_lens", f"lengths in [0, {mb * bs}] (the {mb} blocks of "
                    f"{bs} tokens `block_tables` gives each sequence)", f"length {bad}")
    short = (q_lens > lens).nonzero()
    if short.numel():
        i = int(short[0])
        checks.fail(op, "seq_lens", f"at least the {int(q_lens[i])} new tokens of sequence "
                    f"{i} (from `query_start_loc`)", f"{int(lens[i])}")
    used = torch.arange(mb, device=lens.device)[None, :] < ((lens + bs - 1) // bs)[:, None]
    if bool(used.any()):
        vals = block_tables[used]
        lo, hi = (int(x) for x in torch.aminmax(vals))
        if lo < 0 or hi >= nb:
            bad = lo if lo < 0 else hi
            checks.fail(op, "block_tables", f"block numbers in [0, {nb}) (the blocks of the "
                        "cache) for every block a sequence uses", f"block {bad}")


#: key positions per split at least (shorter splits cost more in the combine than they gain)
MIN_SPLIT_LEN = 256
#: split counts the op uses (each a specialisation of the combine kernel)
SPLIT_COUNTS = (4, 16)


def choose_splits(rows: int, max_len: int, device: torch.device) -> int:
    """Splits per row for a GPU batch of ``rows`` (token, kv head) programs:
    enough programs to cover the card a few times over, each split at least
    MIN_SPLIT_LEN keys; 1 (no split) on other devices, where the torch
    lowerings walk the keys in one pass anyway."""
    if device.type != "cuda" or max_len < 2 * MIN_SPLIT_LEN:
        return 1
    sms = _multiprocessors(device.index)
    if rows >= 4 * sms:
        return 1
    for n in reversed(SPLIT_COUNTS):
        if max_len >= n * MIN_SPLIT_LEN:
            return n
    return 1


@functools.lru_cache(maxsize=None)
def _multiprocessors(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count



def build(block_tables, seq_lens, query_start_loc, causal, window, check_tables,
          op: str) -> PagedAttentionPlan:
    """``paged_attention_plan`` with ``causal``, ``window`` and ``check_tables``
    already checked; errors named after ``op``."""
    qsl, host = lengths(op, "query_start_loc", query_start_loc, query_start_loc,
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
    p.rows, p.checked, p._context, p.lens_host, p._pieces = None, set(), None, None, None
    return p
