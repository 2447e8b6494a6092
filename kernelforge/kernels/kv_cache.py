"""Writing new keys and values into a paged KV cache, written once in the IR.

The cache is ``[num_blocks, block_size, kv_heads, head_size]``; token t goes
to slot ``slot_mapping[t]``, i.e. block ``slot // block_size``, row
``slot % block_size``. A slot of -1 marks padding: nothing is written.
"""
import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.dispatch import launch
from kernelforge.spec import INDEX, Backend, Bad, Bool, Call, OpSpec, Tensor, bench


@kl.kernel(static=("BS", "H", "D"),
           examples=({"BS": 16, "H": 8, "D": 128}, {"BS": 32, "H": 8, "D": 64}),
           example_dtypes={"slot_mapping": kl.i64})
def reshape_and_cache_kernel(key: kl.In("T", "H", "D"), value: kl.In("T", "H", "D"),
                             slot_mapping: kl.In("T"),
                             key_cache: kl.Out("NB", "BS", "H", "D"),
                             value_cache: kl.Out("NB", "BS", "H", "D")):
    t, h, d = kl.parallel("T"), kl.tile("H"), kl.tile("D")
    slot = kl.load(slot_mapping[t])
    block_size = kl.size("BS").to(slot_mapping.dtype)
    block, row = slot // block_size, slot % block_size
    kl.store(key_cache[block, row, h, d], kl.load(key[t, h, d]), mask=slot >= 0)
    kl.store(value_cache[block, row, h, d], kl.load(value[t, h, d]), mask=slot >= 0)


def distinct_caches(op: str, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Keys and values in memory of their own: one tensor (or overlapping
    views) cannot hold both; disjoint views of one buffer are fine."""
    if checks.overlaps(key_cache, value_cache):
        checks.fail(op, "value_cache", "memory apart from `key_cache` (keys and values are "
                    "different rows)", "the same tensor as `key_cache`" if
                    value_cache is key_cache else "a tensor that overlaps `key_cache`")


def _rows(op: str, name: str, x: torch.Tensor, key_cache, T: int) -> torch.Tensor:
    """``x`` as [T, kv_heads, head_size] (a view of a [T, kv_heads * head_size] tensor)."""
    hk, d = key_cache.shape[2:]
    if x.dim() == 2 and x.shape[-1] == hk * d:
        x = x.view(x.shape[0], hk, d) if x.stride(-1) == 1 else x
    if x.dim() != 3 or tuple(x.shape[1:]) != (hk, d) or x.shape[0] != T:
        checks.fail(op, name, f"[{T}, {hk}, {d}] (tokens as in `slot_mapping`, heads and "
                    "head size as in the cache)", list(x.shape))
    return x


def _check(op, a):
    kc = a.key_cache
    checks.shape(op, "value_cache", a.value_cache, tuple(kc.shape), " (the shape of `key_cache`)")
    if a.slot_mapping.dtype not in INDEX or a.slot_mapping.dim() != 1:
        checks.fail(op, "slot_mapping", "a 1-D int64 or int32 tensor [tokens]",
                    f"{a.slot_mapping.dim()}-D {a.slot_mapping.dtype}")
    T = a.slot_mapping.shape[0]
    for name in ("key", "value"):
        checks.same_dtype(op, name, getattr(a, name), "key_cache", kc)
        _rows(op, name, getattr(a, name), kc, T)
    distinct_caches(op, kc, a.value_cache)
    checks.no_host_check_inline(op, "check_slots", a.check_slots)
    nb, bs = kc.shape[:2]
    if a.check_slots and T and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(a.slot_mapping))
        if lo < -1 or hi >= nb * bs:
            checks.fail(op, "slot_mapping", f"-1 or a slot in [0, {nb * bs}) (num_blocks x "
                        "block_size)", f"slot {lo if lo < -1 else hi}")


def _run(a):
    T = a.slot_mapping.shape[0]
    if T:
        # the caches are passed as the very objects the caller holds: written in place
        launch(reshape_and_cache_kernel, _rows("reshape_and_cache", "key", a.key, a.key_cache, T),
               _rows("reshape_and_cache", "value", a.value, a.key_cache, T), a.slot_mapping,
               a.key_cache, a.value_cache, backend=a.backend)


def reference(a):
    """The caches after the write, in float64, slot by slot."""
    from .attention_reference import cache_write
    return cache_write(a)


def _samples(st, budget):
    @st.composite
    def draw(draw):
        bs, hk, d = draw(budget.sizes([(16, 2, 64), (1, 1, 128), (32, 8, 80)]))
        dtype = draw(st.sampled_from(budget.dtypes))
        T = budget.force_rows if budget.force_rows is not None else \
            draw(st.integers(0, 4 * budget.rows))
        nb = max(draw(st.integers(1, 6)), -(-T // bs))      # room for T distinct slots
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        dev = budget.device
        slots = torch.randperm(nb * bs, generator=g)[:T]          # distinct: no write order
        if T:
            slots[torch.rand(T, generator=g) < 0.2] = -1           # padding tokens
        slots = slots.to(draw(st.sampled_from(INDEX)))
        flat = draw(st.booleans())
        key, value = (torch.randn(T, hk * d if flat else hk, *(() if flat else (d,)),
                                  generator=g).to(dtype).to(dev) for _ in range(2))
        kc, vc = (torch.randn(nb, bs, hk, d, generator=g).to(dtype).to(dev) for _ in range(2))
        return Call(dict(key=key, value=value, key_cache=kc, value_cache=vc,
                         slot_mapping=slots.to(dev)), f"T={T} [{nb}, {bs}, {hk}, {d}] {dtype}")
    return draw()


def _resize(call, rows):
    kw = call.kwargs
    nb, bs = kw["key_cache"].shape[:2]
    slots = (torch.arange(rows) % (nb * bs)).to(kw["slot_mapping"].dtype)
    shape = kw["key"].shape[1:]
    dev = kw["key"].device
    return call.with_(slot_mapping=slots.to(kw["slot_mapping"].device),
                      key=torch.randn(rows, *shape).to(kw["key"].dtype).to(dev),
                      value=torch.randn(rows, *shape).to(kw["key"].dtype).to(dev))


def _cache(name: str, doc: str) -> Tensor:
    return Tensor(name, dims=4, layout="[num_blocks, block_size, kv_heads, head_size]",
                  device_of="key_cache", doc=doc)


RESHAPE_AND_CACHE = OpSpec(
    "reshape_and_cache",
    "Write ``key`` and ``value`` rows into a paged cache (vLLM's convention), in place.",
    args=(Tensor("key", dtypes=None, device_of="key_cache", doc=(
              "[T, kv_heads, head_size] (or [T, kv_heads * head_size]), the cache's dtype; "
              "the last dim contiguous")),
          Tensor("value", dtypes=None, device_of="key_cache", doc="key's shape"),
          _cache("key_cache", "[num_blocks, block_size, kv_heads, head_size] float"),
          Tensor("value_cache", dims=4, layout="[num_blocks, block_size, kv_heads, head_size]",
                 dtype_of="key_cache", device_of="key_cache",
                 doc="key_cache's shape and dtype, in memory of its own"),
          Tensor("slot_mapping", dtypes=None, last_contiguous=False, device_of="key_cache",
                 doc=("int64 (or int32) [T]; the flat slot of each token, ``block * "
                      "block_size + row``, or -1 to skip the token (padding)")),
          Bool("check_slots", default=True, kw_only=True, doc=(
              "verify every slot is -1 or inside the cache first (one device-wide min/max); "
              "unchecked out-of-range slots are never written (Triton masks them; the torch "
              "lowerings clamp, so pass False only for slots known to be valid)")),
          Backend()),
    outputs=(), run=_run, check=_check, mutates=("key_cache", "value_cache"),
    kernels=lambda: (reshape_and_cache_kernel,),
    example=">>> kernelforge.ops.reshape_and_cache(k, v, k_cache, v_cache, slots)",
    reference=reference, samples=_samples, resize=_resize,
    bench=bench(lambda device, dtype, T, nb, bs, hk, d: dict(
        key=torch.randn(T, hk, d, device=device).to(dtype),
        value=torch.randn(T, hk, d, device=device).to(dtype),
        key_cache=torch.zeros(nb, bs, hk, d, device=device).to(dtype),
        value_cache=torch.zeros(nb, bs, hk, d, device=device).to(dtype),
        slot_mapping=torch.randperm(nb * bs, device=device)[:T]),
        (32, 512, 16, 8, 128), (4096, 512, 16, 8, 128)),
    cost=lambda a: (4 * a.key.numel() * a.key.element_size() + a.slot_mapping.numel() * 8, None),
    compare=lambda a, outs, ref: _compare(a, ref),
    bad=(Bad("a slot past the cache", lambda c: c.with_(
        slot_mapping=c.kwargs["slot_mapping"].clone().fill_(c.kwargs["key_cache"].shape[0] *
                                                             c.kwargs["key_cache"].shape[1])),
        ("`slot_mapping`", "-1 or a slot in")),
         Bad("value_cache is key_cache", lambda c: c.with_(value_cache=c.kwargs["key_cache"]),
             ("`value_cache`", "key_cache"))),
    vllm="reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, ...)",
)


def _compare(a, ref):
    """The caches hold exactly the written rows and the untouched rest (a copy: bit for
    bit, a NaN copied is a NaN)."""
    for name, want in zip(("key_cache", "value_cache"), ref):
        got = getattr(a, name).double().cpu()
        same = (got == want) | (got.isnan() & want.isnan())
        if not bool(same.all()):
            bad = int((~same).sum())
            raise AssertionError(f"`{name}` differs from the reference in {bad} places")


reshape_and_cache = RESHAPE_AND_CACHE.op
SPECS = (RESHAPE_AND_CACHE,)
