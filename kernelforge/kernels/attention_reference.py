"""The attention ops' references and sample inputs, written from the
definitions in float64, sharing nothing with the kernels or their planning:
a per-sequence softmax(Q K^T) V with explicit masks, paged caches read by a
Python loop over block tables, and the KV-cache write slot by slot."""
from __future__ import annotations

import torch

HEAD_SIZES = (64, 80, 96, 128, 256)


def attention(q, k, v, cu_q, cu_k, scale, causal=True, window=None, softcap=None,
              abs_v=False):
    """softmax(Q K^T * scale + mask) V per sequence, in float64. Query i of a
    sequence sits at key position k_len - q_len + i (bottom-right aligned);
    causal hides keys after it, a window hides keys more than `window` to its
    left; a row with no visible key is 0. ``abs_v``: return softmax(...) |V|
    as well (the scale of the error a rounding of the weights makes)."""
    cu_q, cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
    out = torch.zeros(q.shape, dtype=torch.float64)
    mag = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // max(k.shape[1], 1)
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if qe == qs:
            continue
        Q = q[qs:qe].double().cpu()
        K = k[ks:ke].double().cpu().repeat_interleave(group, 1)
        V = v[ks:ke].double().cpu().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", Q, K) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        q_len, k_len = qe - qs, ke - ks
        pos = k_len - q_len + torch.arange(q_len)[:, None]
        j = torch.arange(k_len)[None, :]
        visible = torch.ones(q_len, k_len, dtype=torch.bool)
        if causal:
            visible &= j <= pos
        if window is not None:
            visible &= j >= pos - window
        s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)        # all hidden: 0
        out[qs:qe] = torch.einsum("hqk,khd->qhd", p, V)
        mag[qs:qe] = torch.einsum("hqk,khd->qhd", p, V.abs())
    return (out, mag) if abs_v else out


def gather_pages(key_cache, value_cache, block_tables, seq_lens):
    """Each sequence's keys and values read out of the paged cache through
    its block table, packed one sequence after another; and cu_seqlens_k."""
    bs = key_cache.shape[1]
    ks, vs, cu = [], [], [0]
    for b, n in enumerate(int(x) for x in seq_lens):
        rows = [(int(block_tables[b, p // bs]), p % bs) for p in range(n)]
        ks += [key_cache[blk, r] for blk, r in rows]
        vs += [value_cache[blk, r] for blk, r in rows]
        cu.append(cu[-1] + n)
    shape = (0, *key_cache.shape[2:])
    k = torch.stack(ks) if ks else key_cache.new_zeros(shape)
    v = torch.stack(vs) if vs else value_cache.new_zeros(shape)
    return k, v, torch.tensor(cu)


def paged(a, abs_v=False):
    """paged_attention by the same definition: the new tokens are the last
    ``q_len`` positions of each sequence's context."""
    k, v, cu_k = gather_pages(a.key_cache.cpu(), a.value_cache.cpu(), a.block_tables.cpu(),
                              a.seq_lens.cpu())
    D = a.q.shape[-1]
    return attention(a.q, k, v, a.query_start_loc.cpu(), cu_k,
                     D ** -0.5 if a.scale is None else a.scale, a.causal, a.window, a.softcap,
                     abs_v)


def cache_write(a):
    """reshape_and_cache: the caches with every slot >= 0 written, in float64."""
    kc, vc = a.key_cache.double().cpu().clone(), a.value_cache.double().cpu().clone()
    bs, hk, d = kc.shape[1:]
    key = a.key.reshape(-1, hk, d).double().cpu()
    value = a.value.reshape(-1, hk, d).double().cpu()
    for t, slot in enumerate(int(s) for s in a.slot_mapping):
        if slot >= 0:
            kc[slot // bs, slot % bs] = key[t]
            vc[slot // bs, slot % bs] = value[t]
    return kc, vc


# -- sample inputs --------------------------------------------------------------------

#: specialisations for backends that compile each one: (Hkv, group, D, dtype, softcap)
COMPILED_CASES = [(2, 2, 64, torch.float32, None), (1, 4, 128, torch.bfloat16, 30.0),
                  (2, 3, 80, torch.float16, None)]


def cu_of(lengths, device) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def draw_batch(st, draw, budget):
    """Head layout, dtype, softcap and per-sequence (query, key) lengths:
    empty and one-token sequences, decode rows and chunked prefill."""
    if budget.free_sizes:
        hkv, group = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 3, 4]))
        D = draw(st.sampled_from(HEAD_SIZES))
        dtype = draw(st.sampled_from(budget.dtypes))
        softcap = draw(st.one_of(st.none(), st.sampled_from([5.0, 30.0])))
    else:
        hkv, group, D, dtype, softcap = draw(budget.sizes(COMPILED_CASES))
    longest = 8 * budget.rows
    length = st.one_of(st.sampled_from([0, 1, 17]), st.integers(0, longest))
    q_lens, k_lens = [], []
    B = budget.force_rows if budget.force_rows is not None else draw(st.integers(1, 3))
    for _ in range(B):
        k_len = draw(length)
        q_lens.append(draw(st.integers(0, k_len)) if draw(st.booleans()) else k_len)
        k_lens.append(k_len)
    return hkv, group, D, dtype, softcap, q_lens, k_lens


def scatter_to_pages(k, v, k_lens, block_size, g, device, extra_blocks=3):
    """Each sequence's keys and values in randomly permuted cache blocks; free
    slots hold large values and the block table holds garbage past each
    sequence's blocks, so a read of either shows."""
    need = [(n + block_size - 1) // block_size for n in k_lens]
    nb = sum(need) + extra_blocks
    max_blocks = max(need + [1]) + 1
    kc = (torch.randn((nb, block_size, *k.shape[1:]), generator=g) * 100).to(k.dtype)
    vc = (torch.randn((nb, block_size, *v.shape[1:]), generator=g) * 100).to(v.dtype)
    perm = torch.randperm(nb, generator=g).tolist()
    tables = torch.randint(-5, 10 ** 6, (len(k_lens), max_blocks), generator=g,
                           dtype=torch.int32)
    start, used = 0, 0
    k, v = k.cpu(), v.cpu()
    for b, n in enumerate(k_lens):
        for j in range(need[b]):
            blk = perm[used]
            used += 1
            tables[b, j] = blk
            lo, hi = j * block_size, min(n, (j + 1) * block_size)
            kc[blk, :hi - lo] = k[start + lo:start + hi]
            vc[blk, :hi - lo] = v[start + lo:start + hi]
        start += n
    lens = torch.tensor(k_lens, dtype=torch.int32)
    return kc.to(device), vc.to(device), tables.to(device), lens.to(device)
