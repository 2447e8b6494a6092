"""tools/gpu_bench.py's attention cases (bf16, on Triton): causal prefill of
one sequence against SDPA's flash backend in TFLOP/s, and paged decode
against gather + SDPA as a share of the copy bandwidth, each with p rounded
(``round_p``, Triton's default) and kept, then the launch-variant grid of
tools/gpu_variants.py. Each case is checked against float64 first.
"""
from __future__ import annotations

# tools/ is on sys.path when gpu_bench.py runs as a script
from gpu_variants import DECODE_VARIANTS, PREFILL_VARIANTS, VARIANTS, variant_cases

# attention (bf16): causal prefill of one sequence; paged decode, one token per sequence
ATTN_PREFILL_S, ATTN_PREFILL_H, ATTN_HEAD = 4096, 32, 128
ATTN_DECODE_B, ATTN_DECODE_CTX, ATTN_DECODE_HQ, ATTN_DECODE_HKV = 32, (1024, 4096), 32, 8
ATTN_BLOCK = 16
GOAL_ATTN_PREFILL_VS_SDPA = 1.0        # prefill on Triton at least as fast as SDPA (flash)
GOAL_PAGED_DECODE_FRACTION = 0.80      # paged decode on Triton >= 80% of copy bandwidth


def attention_cases(kernelforge, run_case, rows, dev, gen, log=print):
    """Attention on Triton (bf16): causal prefill against SDPA (flash backend)
    in TFLOP/s, and paged decode against gather + SDPA as a share of the copy
    bandwidth. ``run_case`` and ``rows`` are gpu_bench.py's; ``log`` prints a
    progress line. Returns (group names, goal lines for the table)."""
    import torch
    from kernelforge.tolerance import assert_close, tolerance
    from peers import gather_sdpa, sdpa_prefill

    ops, D, dtype = kernelforge.ops, ATTN_HEAD, torch.bfloat16
    tol = tolerance(dtype)

    def ref_one(q, k, v, causal=True):
        """One sequence in float64: softmax(Q K^T / sqrt(D) + mask) V, kv heads
        repeated to the query heads, causal aligned bottom-right; also the
        magnitude P |V| the peers' bf16 rounding of P is measured against.
        Heads in chunks, so the [heads, Sq, Sk] float64 scores stay small."""
        Sq, Hq, _ = q.shape
        Sk, Hkv, _ = k.shape
        out = torch.empty(Sq, Hq, D, dtype=torch.float64, device=q.device)
        mag = torch.empty_like(out)
        step = max(1, min(Hq, (1 << 27) // max(1, Sq * Sk)))
        for h0 in range(0, Hq, step):
            hs = range(h0, min(Hq, h0 + step))
            kv = torch.tensor([h // (Hq // Hkv) for h in hs], device=q.device)
            qh = q[:, h0:hs.stop].double().transpose(0, 1)
            kh = k.double().transpose(0, 1)[kv]
            vh = v.double().transpose(0, 1)[kv]
            s = qh @ kh.transpose(1, 2) * D ** -0.5
            if causal:
                i = torch.arange(Sq, device=q.device)[:, None]
                j = torch.arange(Sk, device=q.device)[None, :]
                s.masked_fill_(j > i + (Sk - Sq), float("-inf"))
            p = torch.softmax(s, -1).nan_to_num_(0.0)
            out[:, h0:hs.stop] = (p @ vh).transpose(0, 1)
            mag[:, h0:hs.stop] = (p @ vh.abs()).transpose(0, 1)
            del s, p
        return out, mag

    def peer_check(mags):
        """SDPA (and the gather peer) round P to bf16 before P V: held to
        atol + 2 x rtol x (P |V|), the bound of bench/test_rotary_bench.py's HF check."""
        def check(i, a, ref, what):
            err = (a.double() - ref).abs()
            bad = err > tol.atol + 2 * tol.rtol * mags[i]
            if bool(bad.any()) or not bool(torch.isfinite(a).all()):
                raise AssertionError(f"{what}: {int(bad.sum())} elements beyond 2 x rtol x "
                                     f"P|V|; max error {err.max().item():.3e}")
        return check

    def rounded_check(mags):
        """kf with p rounded to bf16 (``round_p``, Triton's default for 16-bit
        inputs): the policy plus its documented allowance, rtol x (P |V|)
        (kernelforge.tolerance.assert_close(extra=), as tests/test_attention.py)."""
        def check(i, a, ref, what):
            assert_close(a, ref, dtype, what, extra=tol.rtol * mags[i])
        return check

    groups, goals = [], []
    by_name = lambda name: next((r for r in rows if r["case"] == name), None)  # noqa: E731

    # causal prefill, one sequence
    S, H = ATTN_PREFILL_S, ATTN_PREFILL_H
    q, k, v = (torch.randn(S, H, D, device=dev, generator=gen).to(dtype) for _ in range(3))
    cu = torch.tensor([0, S], dtype=torch.int32, device=dev)
    ref, mag = ref_one(q, k, v)
    refs = (ref,)
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    flops = 4 * D * H * S * (S + 1) // 2               # unmasked (query, key) pairs only
    nbytes = 4 * q.numel() * q.element_size()           # q, k, v, out
    grp = f"attention prefill S={S} bf16"
    groups.append(grp)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        flash_ctx, flash_name = (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)), "SDPA flash"
        with flash_ctx():
            sdpa_prefill(qt[:, :, :16], kt[:, :, :16], vt[:, :, :16])
    except Exception as e:  # noqa: BLE001  no flash kernel for this card / build
        import contextlib
        log(f"SDPA flash backend unavailable ({type(e).__name__}: {str(e)[:120]}); "
            "timing SDPA's default backend")
        flash_ctx, flash_name = contextlib.nullcontext, "SDPA default"

    def sdpa_flash():
        with flash_ctx():
            return sdpa_prefill(qt, kt, vt)[0].transpose(0, 1)

    run_case(f"{grp} | kf triton", lambda: ops.attention(q, k, v, cu, cu, backend="triton"),
             refs, dtype, nbytes, check=rounded_check((mag,)))
    run_case(f"{grp} | kf triton no check",
             lambda: ops.attention(q, k, v, cu, cu, check_seqlens=False, backend="triton"),
             refs, dtype, nbytes, check=rounded_check((mag,)), graph=True)
    run_case(f"{grp} | kf triton exact p",
             lambda: ops.attention(q, k, v, cu, cu, round_p=False, backend="triton"),
             refs, dtype, nbytes)
    run_case(f"{grp} | {flash_name}", sdpa_flash, refs, dtype, nbytes, check=peer_check((mag,)))
    for name in ("kf triton", "kf triton no check", "kf triton exact p", flash_name):
        row = by_name(f"{grp} | {name}")
        if row and row["ms"] == row["ms"]:
            row["note"] = (f"{flops / (row['ms'] * 1e-3) / 1e12:.1f} TFLOP/s "
                           + row.get("note", "")).strip()
    peer = by_name(f"{grp} | {flash_name}")
    for name in ("kf triton", "kf triton no check"):      # (no check: no host sync)
        kf = by_name(f"{grp} | {name}")
        if kf and peer and kf["ms"] == kf["ms"] and peer["ms"] == peer["ms"]:
            ratio = peer["ms"] / kf["ms"]
            goals.append(f"{grp}: {name} vs {flash_name}: {ratio:.2f}x (goal >= "
                         f"{GOAL_ATTN_PREFILL_VS_SDPA:g}x: "
                         f"{'met' if ratio >= GOAL_ATTN_PREFILL_VS_SDPA else 'MISSED'})")
    if VARIANTS:
        goals.extend(variant_cases(
            kernelforge, run_case, rows, f"{grp} | kf variant",
            lambda: ops.attention(q, k, v, cu, cu, backend="triton"), refs, dtype, nbytes,
            PREFILL_VARIANTS, by_name(f"{grp} | {flash_name}"), "TFLOP/s", flops,
            check=rounded_check((mag,))))
    del q, k, v, qt, kt, vt, ref, mag, refs
    torch.cuda.empty_cache()

    # paged decode: B sequences, one new token each, blocks in a random permutation
    B, Hq, Hkv, bs = ATTN_DECODE_B, ATTN_DECODE_HQ, ATTN_DECODE_HKV, ATTN_BLOCK
    for ctx in ATTN_DECODE_CTX:
        nblk = (ctx + bs - 1) // bs
        kc = torch.randn(B * nblk, bs, Hkv, D, device=dev, generator=gen).to(dtype)
        vc = torch.randn(B * nblk, bs, Hkv, D, device=dev, generator=gen).to(dtype)
        tables = torch.randperm(B * nblk, device=dev, generator=gen).to(torch.int32).view(B, nblk)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        qsl = torch.arange(B + 1, dtype=torch.int32, device=dev)
        q = torch.randn(B, Hq, D, device=dev, generator=gen).to(dtype)
        ref = torch.empty(B, Hq, D, dtype=torch.float64, device=dev)
        mag = torch.empty_like(ref)
        for b in range(B):                  # each sequence's K/V through its block table
            blocks = tables[b].long()
            kb = kc[blocks].reshape(-1, Hkv, D)[:ctx]
            vb = vc[blocks].reshape(-1, Hkv, D)[:ctx]
            ref[b:b + 1], mag[b:b + 1] = ref_one(q[b:b + 1], kb, vb)
        el = q.element_size()
        nbytes = 2 * q.numel() * el + 2 * B * nblk * bs * Hkv * D * el
        grp = f"paged decode B={B} ctx={ctx} bf16"
        groups.append(grp)
        run_case(f"{grp} | kf triton",
                 lambda: ops.paged_attention(q, kc, vc, tables, lens, qsl, backend="triton"),
                 (ref,), dtype, nbytes, goal=GOAL_PAGED_DECODE_FRACTION,
                 check=rounded_check((mag,)))
        run_case(f"{grp} | kf triton no check",
                 lambda: ops.paged_attention(q, kc, vc, tables, lens, qsl, check_tables=False,
                                             backend="triton"),
                 (ref,), dtype, nbytes, goal=GOAL_PAGED_DECODE_FRACTION, graph=True,
                 check=rounded_check((mag,)))
        run_case(f"{grp} | kf triton no check exact p",
                 lambda: ops.paged_attention(q, kc, vc, tables, lens, qsl, check_tables=False,
                                             round_p=False, backend="triton"),
                 (ref,), dtype, nbytes, goal=GOAL_PAGED_DECODE_FRACTION, graph=True)
        run_case(f"{grp} | gather + SDPA gqa",
                 lambda: gather_sdpa(q, kc, vc, tables, lens), (ref,), dtype, nbytes,
                 check=peer_check((mag,)))
        if VARIANTS and ctx == max(ATTN_DECODE_CTX):
            goals.extend(variant_cases(
                kernelforge, run_case, rows, f"{grp} | kf variant",
                lambda: ops.paged_attention(q, kc, vc, tables, lens, qsl, check_tables=False,
                                            backend="triton"),
                (ref,), dtype, nbytes, DECODE_VARIANTS,
                by_name(f"{grp} | gather + SDPA gqa"), "GB/s", None,
                check=rounded_check((mag,))))
        del kc, vc, tables, q, ref, mag
        torch.cuda.empty_cache()
    goals.append(f"attention: prefill one causal sequence, {H} query and kv heads, head size "
                 f"{D}, TFLOP/s over the S (S + 1) / 2 unmasked pairs per head; paged decode "
                 f"{Hq} query heads, {Hkv} kv heads, head size {D}, block size {bs}, blocks "
                 "in a random permutation, GB/s over q + used K/V blocks + out; 'kf triton' "
                 "checks the block tables on the host first, 'no check' passes "
                 "check_tables=False; the gather peer reads seq_lens on the host")
    return groups, goals
