"""Attention beyond its specs' generated tests (tests/test_ops.py, each op
against its float64 reference): paged equals packed, decode equals prefill,
long sequences, splits, round_p, the KV-cache write, launch pieces. One
tolerance policy (kernelforge/tolerance.py)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernelforge
from kernelforge import testing
from kernelforge.backends import registry
from kernelforge.kernels import attention as attention_kernels
from kernelforge.tolerance import assert_close, tolerance
from conftest import BACKENDS, DEVICE
import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU_INTERP = DEVICE.type == "cpu"
# Inductor compiles per specialisation (tens of seconds cold): fixed shapes
#   (Hkv, group, D, dtype, softcap)
INDUCTOR_CASES = [(2, 2, 64, torch.float32, None), (1, 4, 128, torch.bfloat16, 30.0)]


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.int64).cumsum(0)),
                        dtype=torch.int32, device=DEVICE)


def randn(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


@st.composite
def problems(draw, backend):
    if backend in ("inductor", "cpp"):     # both compile per specialisation
        hkv, group, D, dtype, softcap = draw(st.sampled_from(INDUCTOR_CASES))
    else:
        hkv, group = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 3, 4]))
        D = draw(st.sampled_from([64, 80, 96, 128, 256]))
        dtype = draw(st.sampled_from(DTYPES))
        softcap = draw(st.one_of(st.none(), st.sampled_from([5.0, 30.0])))
    small = backend == "triton" and CPU_INTERP
    length = st.one_of(st.sampled_from([0, 1, 17]), st.integers(0, 40 if small else 70))
    B = draw(st.integers(1, 3))
    q_lens, k_lens = [], []
    for _ in range(B):
        k_len = draw(length)
        q_lens.append(draw(st.integers(0, k_len)) if draw(st.booleans()) else k_len)
        k_lens.append(k_len)
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(0, 20)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    round_p = draw(st.sampled_from([None, False, True]))
    return hkv, group, D, dtype, softcap, q_lens, k_lens, causal, window, seed, round_p


def rounded(round_p, dtype, backend) -> bool:
    """Whether the call rounded p to the inputs' type (its documented rule)."""
    return attention_kernels.rounds_p(round_p, dtype, registry.backends()[backend])


def check(out, ref, dtype, what, mag=None, p_rounded=False, copies=1):
    """``out`` against the float64 reference under the policy; when p was
    rounded (``round_p``), plus one ulp of ``dtype`` times ``softmax |V|``
    (``mag``) for each of ``copies`` results that rounded it."""
    assert out.dtype == dtype
    extra = copies * tolerance(dtype).rtol * mag if p_rounded else None
    assert_close(out, ref, dtype, what, extra=extra)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_long_sequences(backend):
    """At least 1000 tokens per sequence, causal, GQA."""
    g = torch.Generator().manual_seed(7)
    hkv, group, D, dtype, softcap = INDUCTOR_CASES[0]
    lens = [1000, 1100]
    q = randn((sum(lens), hkv * group, D), dtype, g)
    k, v = (randn((sum(lens), hkv, D), dtype, g) for _ in range(2))
    out = kernelforge.ops.attention(q, k, v, cu(lens), cu(lens), backend=backend)
    ref = reference.attention(q, k, v, cu(lens), cu(lens), D ** -0.5)
    check(out, ref, dtype, f"long sequences[{backend}]")


def test_long_sequence_triton():
    """Triton through the interpreter: one 1000-token sequence, one head."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (randn((1000, 1, 64), torch.float32, g) for _ in range(3))
    out = kernelforge.ops.attention(q, k, v, cu([1000]), cu([1000]), window=300,
                                    backend="triton")
    check(out, reference.attention(q, k, v, cu([1000]), cu([1000]), 0.125, True, 300),
          torch.float32, "1000 tokens[triton]")


def scatter_to_pages(k, v, k_lens, block_size, g, extra_blocks=3):
    """Each sequence's keys and values in randomly permuted cache blocks; the
    block table holds garbage past each sequence's blocks."""
    B = len(k_lens)
    need = [(n + block_size - 1) // block_size for n in k_lens]
    nb = sum(need) + extra_blocks
    max_blocks = max(need + [1]) + 1
    kc = randn((nb, block_size, *k.shape[1:]), k.dtype, g, 100.0)    # junk in free slots
    vc = randn((nb, block_size, *v.shape[1:]), v.dtype, g, 100.0)
    perm = torch.randperm(nb, generator=g).tolist()
    tables = torch.randint(-5, 10 ** 6, (B, max_blocks), generator=g, dtype=torch.int32)
    start, used = 0, 0
    for b, n in enumerate(k_lens):
        for j in range(need[b]):
            blk = perm[used]
            used += 1
            tables[b, j] = blk
            rows = slice(j * block_size, min(n, (j + 1) * block_size))
            m = rows.stop - rows.start
            kc[blk, :m] = k[start + rows.start:start + rows.stop]
            vc[blk, :m] = v[start + rows.start:start + rows.stop]
        start += n
    lens = torch.tensor(k_lens, dtype=torch.int32, device=DEVICE)
    return kc, vc, tables.to(DEVICE), lens


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(data=st.data(), block_size=st.sampled_from([16, 32]))
def test_paged_equals_packed(backend, data, block_size):
    """The same sequences scattered into permuted cache blocks give the
    rows attention() gives on the packed tensors (and the float64 reference)."""
    hkv, group, D, dtype, softcap, q_lens, k_lens, causal, window, seed, round_p = \
        data.draw(problems(backend))
    if backend == "inductor":
        block_size = 16        # one specialisation
    g = torch.Generator().manual_seed(seed)
    q = randn((sum(q_lens), hkv * group, D), dtype, g)
    k, v = (randn((sum(k_lens), hkv, D), dtype, g) for _ in range(2))
    kc, vc, tables, lens = scatter_to_pages(k, v, k_lens, block_size, g)
    paged = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, cu(q_lens), causal=causal,
                                            window=window, softcap=softcap, round_p=round_p,
                                            backend=backend)
    ref, mag = reference.attention(q, k, v, cu(q_lens), cu(k_lens), D ** -0.5, causal, window,
                                   softcap, abs_v=True)
    rp = rounded(round_p, dtype, backend)
    check(paged, ref, dtype, f"paged[{backend}] q_lens={q_lens} k_lens={k_lens}", mag, rp)
    packed = kernelforge.ops.attention(q, k, v, cu(q_lens), cu(k_lens), causal=causal,
                                       window=window, softcap=softcap, round_p=round_p,
                                       backend=backend)
    # both are within the policy of the reference; with fp32 math they agree
    # closely (each rounds p in its own chunks when it rounds p: two allowances)
    check(paged, packed.double(), dtype, f"paged vs packed[{backend}]", mag, rp, copies=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_equals_prefill(backend):
    """Writing a prompt's keys into the cache and decoding token by token
    reproduces the rows of one causal prefill over the whole prompt."""
    g = torch.Generator().manual_seed(11)
    hkv, group, D, dtype, _ = INDUCTOR_CASES[0]
    n, bs = 37 if backend != "triton" else 20, 16
    q = randn((n, hkv * group, D), dtype, g)
    k, v = (randn((n, hkv, D), dtype, g) for _ in range(2))
    prefill = kernelforge.ops.attention(q, k, v, cu([n]), cu([n]), backend=backend)
    nb = (n + bs - 1) // bs + 2
    kc = torch.zeros(nb, bs, hkv, D, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    table = torch.randperm(nb, generator=g)[None, :].to(torch.int32).to(DEVICE)
    rows = []
    for t in range(n):       # one step: write token t, attend with its one query
        slot = (table[0, t // bs] * bs + t % bs).view(1).long()
        kernelforge.ops.reshape_and_cache(k[t:t + 1], v[t:t + 1], kc, vc, slot, backend=backend)
        lens = torch.tensor([t + 1], dtype=torch.int32, device=DEVICE)
        rows.append(kernelforge.ops.paged_attention(q[t:t + 1], kc, vc, table, lens, cu([1]),
                                                    backend=backend))
    assert_close(torch.cat(rows), prefill.double(), dtype, f"decode vs prefill[{backend}]")


@pytest.mark.parametrize("backend,splits", [(b, n) for b in BACKENDS for n in (2, 3, 16)
                                            if b != "inductor" or n == 3])  # compiles per S
def test_split_keys_match_float64(backend, splits):
    """Flash-decoding (keys cut into splits, merged by a second kernel;
    kernelforge/kernels/attention_kernels.py) on a mixed batch, with splits longer than some
    rows (empty splits), a window and softcapping: against float64."""
    g = torch.Generator().manual_seed(20 + splits)
    hkv, group, D, dtype, softcap = INDUCTOR_CASES[1] if backend == "inductor" else \
        (2, 3, 64, torch.float16, 20.0)
    k_lens = [70, 1, 0, 45, 33]
    q_lens = [1, 1, 0, 3, 33]
    q = randn((sum(q_lens), hkv * group, D), dtype, g)
    k, v = (randn((sum(k_lens), hkv, D), dtype, g) for _ in range(2))
    kc, vc, tables, lens = scatter_to_pages(k, v, k_lens, 16, g)
    for window in (None, 9):
        out = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, cu(q_lens),
                                              softcap=softcap, window=window, splits=splits,
                                              backend=backend)
        ref, mag = reference.attention(q, k, v, cu(q_lens), cu(k_lens), D ** -0.5,
                                       softcap=softcap, window=window, abs_v=True)
        check(out, ref, dtype, f"splits={splits} window={window} [{backend}]", mag,
              rounded(None, dtype, backend))


@pytest.mark.parametrize("backend,splits", [(b, n) for b in BACKENDS for n in (1, 2, 3, 16)])
def test_splits_see_only_their_keys(backend, splits):
    """Each split of a row attends over its own keys only. Keys no row of
    their sequence sees (left of every window) get scores ~100 above the
    visible ones: a split that took its running max over them would
    underflow every visible weight. Contexts shorter than the splits, an
    empty sequence, 4-token blocks, causal, window 3."""
    g = torch.Generator().manual_seed(5)
    hkv, group, D, dtype, bs = (2, 2, 64, torch.float32, 16) if backend == "inductor" else \
        (1, 2, 64, torch.bfloat16, 4)
    k_lens, q_lens, window = [16, 13, 1, 0, 40], [2, 2, 1, 0, 5], 3
    q = randn((sum(q_lens), hkv * group, D), dtype, g)
    k, v = (randn((sum(k_lens), hkv, D), dtype, g) for _ in range(2))
    start = 0
    for ql, kn in zip(q_lens, k_lens):
        k[start:start + max(0, kn - ql - window)] *= 100
        start += kn
    kc, vc, tables, lens = scatter_to_pages(k, v, k_lens, bs, g)
    ref = reference.attention(q, k, v, cu(q_lens), cu(k_lens), D ** -0.5, window=window)
    out = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, cu(q_lens), window=window,
                                          splits=splits, round_p=False, backend=backend)
    check(out, ref, dtype, f"splits={splits} hidden keys scored high [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_decode_and_chunked_prefill_batch(backend):
    """One call serves decode rows and chunked-prefill rows that attend to
    earlier context in the cache and to themselves."""
    g = torch.Generator().manual_seed(12)
    hkv, group, D, dtype, _ = INDUCTOR_CASES[0]
    k_lens = [30, 1, 45, 17]            # context lengths, new tokens included
    q_lens = [1, 1, 13, 17]             # decode, decode (first token), chunk, whole prompt
    q = randn((sum(q_lens), hkv * group, D), dtype, g)
    k, v = (randn((sum(k_lens), hkv, D), dtype, g) for _ in range(2))
    kc, vc, tables, lens = scatter_to_pages(k, v, k_lens, 16, g)
    out = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, cu(q_lens), backend=backend)
    ref = reference.attention(q, k, v, cu(q_lens), cu(k_lens), D ** -0.5)
    check(out, ref, dtype, f"mixed batch[{backend}]")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "inductor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_p_is_honoured(backend, dtype):
    """With p kept in fp32 (round_p=False) outputs meet the plain policy;
    rounding p (round_p=True) moves the outputs that cancel to near zero (of
    8192, random values) by more than the plain policy allows there, and
    less than its allowance: the flag reaches the kernel, in both ops, and
    the allowance is needed. Inductor prints the same torch code as eager and
    honours explicit casts (test_ir_capabilities)."""
    g = torch.Generator().manual_seed(31)
    n, hkv, group, D = 64, 1, 2, 64
    q = randn((n, hkv * group, D), dtype, g)
    k, v = (randn((n, hkv, D), dtype, g) for _ in range(2))
    ref, mag = reference.attention(q, k, v, cu([n]), cu([n]), D ** -0.5, abs_v=True)
    kc, vc, tables, lens = scatter_to_pages(k, v, [n], 16, g)
    outs = {}
    for rp in (False, True):
        outs["packed", rp] = kernelforge.ops.attention(q, k, v, cu([n]), cu([n]), round_p=rp,
                                                       backend=backend)
        outs["paged", rp] = kernelforge.ops.paged_attention(q, kc, vc, tables, lens, cu([n]),
                                                            round_p=rp, backend=backend)
    for kind in ("packed", "paged"):
        check(outs[kind, False], ref, dtype, f"{kind} round_p=False [{backend}]")
        check(outs[kind, True], ref, dtype, f"{kind} round_p=True [{backend}]", mag, True)
        with pytest.raises(AssertionError, match="exceeds"):
            check(outs[kind, True], ref, dtype, f"{kind} round_p=True, plain policy")


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_reshape_and_cache_writes_exactly_the_slots(backend, data):
    T = data.draw(st.integers(0, 12))
    bs = data.draw(st.sampled_from([16, 32]))
    nb = data.draw(st.integers(1, 4))
    dtype = data.draw(st.sampled_from(DTYPES))
    layout = data.draw(st.sampled_from(["3d", "flat"]))
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    hkv, D = 2, 64
    free = torch.randperm(nb * bs, generator=g)[:T]
    pad = torch.rand(T, generator=g) < 0.3
    slots = torch.where(pad, torch.full_like(free, -1), free).to(DEVICE)
    k, v = (randn((T, hkv, D), dtype, g) for _ in range(2))
    kc, vc = (randn((nb, bs, hkv, D), dtype, g) for _ in range(2))
    want_k, want_v = kc.clone().view(-1, hkv, D), vc.clone().view(-1, hkv, D)
    for t in range(T):
        if slots[t] >= 0:
            want_k[slots[t]], want_v[slots[t]] = k[t], v[t]
    args = (k, v) if layout == "3d" else (k.view(T, hkv * D), v.view(T, hkv * D))
    kernelforge.ops.reshape_and_cache(*args, kc, vc, slots, backend=backend)
    assert torch.equal(kc.view(-1, hkv, D), want_k) and torch.equal(vc.view(-1, hkv, D), want_v)


@given(lens=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1,
                     max_size=6),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(0, 50)),
       max_rows=st.sampled_from([1, 16, 128]),
       max_pairs=st.one_of(st.none(), st.sampled_from([1, 100, 5000])), local=st.booleans(),
       block=st.sampled_from([1, 16]))
def test_launch_pieces_cover_each_row_and_its_keys(lens, causal, window, max_rows, max_pairs,
                                                   local, block):
    """The host plan for lowerings that collapse the key loop: every query
    row in exactly one piece, in order; each piece's key span holds the keys
    each of its rows sees (from row_ranges, computed independently per row;
    ``local``: positions within the row's sequence; whole blocks) and its
    sequence span the rows' sequences; no piece of more than one row
    computes more than ``max_pairs`` (row, key) pairs."""
    from kernelforge.kernels.attention_plan import pieces, row_ranges
    q_lens = [min(a, b) if causal else a for a, b in lens]
    k_lens = [b for _, b in lens]
    cq = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    ck = [0] + torch.tensor(k_lens).cumsum(0).tolist()
    planned = pieces(cq, ck, causal, window, max_rows, max_pairs, local, block)
    assert not local or all(p[2] % block == 0 and p[3] % block == 0 for p in planned)
    assert [r for p in planned for r in range(p[0], p[1])] == list(range(cq[-1]))
    assert all(p[1] - p[0] <= max_rows for p in planned)
    if max_pairs is not None:
        assert all(p[1] - p[0] == 1 or (p[1] - p[0]) * (p[3] - p[2]) <= max_pairs
                   for p in planned)
    if not cq[-1]:
        return
    seq, lo, hi = row_ranges(torch.tensor(cq), torch.tensor(q_lens), torch.tensor(k_lens),
                             causal, window, torch.device("cpu"), cq[-1])
    for r0, r1, k0, k1, b0, b1 in planned:
        for r in range(r0, r1):
            b = int(seq[r])
            off = 0 if local else ck[b]
            a, e = off + int(lo[r]), off + int(hi[r])
            assert a == e or k0 <= a <= e <= k1, (r, a, e, k0, k1)
            assert b0 <= b < b1, (r, b, b0, b1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_key_is_copied_into_the_cache_and_the_check_still_sees_a_wrong_slot(backend):
    """NaN is data to reshape_and_cache: the spec's bit-for-bit check must take a
    copied NaN as equal, and still reject a cache with a slot written wrong."""
    from kernelforge import hostile
    spec = kernelforge.ops.SPECS["reshape_and_cache"]
    call = hostile.base_call(spec, backend)
    key = call.kwargs["key"].clone()
    key.view(-1)[0] = float("nan")
    assert hostile.classify(spec, call.with_(key=key), backend) == ("ok", "")
    a = testing.bound(spec, call.with_(key=key), backend)
    outs = testing.run(spec, call.with_(key=key), backend)
    ref = spec.reference(a)
    a.key_cache.view(-1)[int(a.key_cache.isnan().view(-1).nonzero()[0])] = 0.0
    with pytest.raises(AssertionError, match="key_cache"):
        spec.compare(a, outs, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,round_p", [(None, None), (30.0, True)])
def test_one_query_row_per_sequence_matches_float64(backend, softcap, round_p):
    """Decode-shaped packed calls (at most one query row per sequence: the
    lowerings that keep the key loop take a kernel without query tiles),
    including an empty sequence and a row that sees no key, against float64;
    the same offsets again, and again after an in-place change of their
    values (the reused key ranges must follow it)."""
    g = torch.Generator().manual_seed(5)
    hkv, group, D, dtype, _ = INDUCTOR_CASES[1] if softcap else INDUCTOR_CASES[0]
    for q_lens, k_lens in (([1], [40]), ([1, 1, 0, 1], [3, 70, 5, 0]), ([1, 1], [129, 1])):
        q = randn((sum(q_lens), hkv * group, D), dtype, g)
        k, v = (randn((sum(k_lens), hkv, D), dtype, g) for _ in range(2))
        cq, ck = cu(q_lens), cu(k_lens)

        def compare(what):
            out = kernelforge.ops.attention(q, k, v, cq, ck, softcap=softcap, round_p=round_p,
                                            check_seqlens=False, backend=backend)
            ref, mag = reference.attention(q, k, v, cq, ck, D ** -0.5, softcap=softcap,
                                           abs_v=True)
            check(out, ref, dtype, f"{what}[{backend}]", mag, rounded(round_p, dtype, backend))
        for _ in range(2):
            compare(f"decode rows {q_lens}/{k_lens}")
        if len(k_lens) > 1:       # the same offset tensor, its values changed in place
            ck[1] -= 1
            compare("offsets changed in place")
