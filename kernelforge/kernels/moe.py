"""Mixture-of-experts routing, written once in the kernel IR.

``topk_softmax``: per token, the softmax of its gating logits over the E
experts (fp32), then the k largest probabilities and their experts, as
vLLM's ``topk_softmax`` computes them for Mixtral, Qwen-MoE and DeepSeek
routers. Equal probabilities go to the lower expert index first (argmax's
rule, every backend). ``renormalize`` divides the k weights by their sum.
One program per token; the experts are one tile (E is static and small),
and the k picks are k passes of max/argmax over it.
"""
import torch

import kernelforge.lang as kl
from kernelforge import checks
from kernelforge.dispatch import NewTensor, kernel_factory, launch
from kernelforge.spec import (Backend, Bad, Bool, Call, Int, OpSpec, Output, Tensor, bench,
                              resize_rows)


@kernel_factory
def topk_softmax_kernel(k: int, renormalize: bool) -> kl.KernelDef:
    """Softmax over E, then the top ``k``; ``renormalize`` rescales them to sum 1."""

    def topk_softmax_rows(logits: kl.In("T", "E"), weights: kl.Out("T", "K"),
                          ids: kl.Out("T", "K")):
        t, e = kl.parallel("T"), kl.tile("E")
        x = kl.load(logits[t, e]).to(kl.f32)
        p = kl.exp(x - kl.max(x, "E"))
        p = p / kl.sum(p, "E")
        picked = []
        for _ in range(k):
            best, at = kl.max(p, "E"), kl.argmax(p, "E")
            picked.append((best, at))
            p = kl.where(e == at, -1.0, p)          # taken: below every probability
        total = picked[0][0]
        for best, _ in picked[1:]:
            total = total + best
        for j, (best, at) in enumerate(picked):
            kl.store(weights[t, j], best / total if renormalize else best)
            kl.store(ids[t, j], at)

    fn = topk_softmax_rows
    fn.__name__ = fn.__qualname__ = f"topk_softmax_k{k}" + ("_renorm" if renormalize else "")
    return kl.kernel(fn, static=("E", "K"), examples=({"E": 8, "K": k}, {"E": 64, "K": k}),
                     example_dtypes={"weights": kl.f32, "ids": kl.i32})


def reference(logits, k, renormalize):
    """float64 softmax, then a stable descending sort (ties: lower index first)."""
    p = torch.softmax(logits.double(), -1)
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :k]
    w = torch.gather(p, -1, order)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, order.to(torch.int32)


def _run(a):
    T, E = a.gating_logits.shape
    if not T or not a.k:
        return (torch.empty(T, a.k, dtype=torch.float32, device=a.gating_logits.device),
                torch.empty(T, a.k, dtype=torch.int32, device=a.gating_logits.device))
    dev = a.gating_logits.device
    return launch(topk_softmax_kernel(a.k, a.renormalize), a.gating_logits,
                  NewTensor((T, a.k), torch.float32, dev), NewTensor((T, a.k), torch.int32, dev),
                  backend=a.backend)


def _k_fits(op, a):
    E = a.gating_logits.shape[-1]
    if a.k > E:
        checks.fail(op, "k", f"at most the {E} experts (the last dim of `gating_logits`)",
                    a.k)


def _samples(st, budget):
    @st.composite
    def draw(draw):
        E = draw(budget.sizes([8, 64], st.integers(1, 160)))
        k = draw(st.integers(1, min(E, 8)))
        dtype = draw(st.sampled_from(budget.dtypes))
        T = budget.force_rows if budget.force_rows is not None else \
            draw(st.integers(0, budget.rows))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        # quarters in a small range: exact in every dtype, many exact ties,
        # distinct values far apart against rounding
        x = (torch.randint(-12, 12, (T, E), generator=g) / 4).to(dtype).to(budget.device)
        return Call(dict(gating_logits=x, k=k, renormalize=draw(st.booleans())),
                    f"[{T}, {E}] k={k} {dtype}")
    return draw()


def _peer(a):
    """What a model file does without a fused op (Mixtral's router)."""
    w, ids = torch.topk(torch.softmax(a.gating_logits, -1, dtype=torch.float32), a.k, -1)
    return (w / w.sum(-1, keepdim=True) if a.renormalize else w), ids.to(torch.int32)


TOPK_SOFTMAX = OpSpec(
    "topk_softmax",
    "MoE routing: the softmax of each token's gating logits (fp32), then its k\n"
    "largest probabilities and their experts (ties: the lower expert first).",
    args=(Tensor("gating_logits", dims=2, layout="[tokens, experts]",
                 doc="[T, E] float32, bfloat16 or float16"),
          Int("k", low=1, doc="experts per token, 1 <= k <= E"),
          Bool("renormalize", default=False, kw_only=True,
               doc="divide the k weights by their sum"),
          Backend()),
    outputs=(Output("weights", lambda a: (a.gating_logits.shape[0], a.k),
                    lambda a: torch.float32, "[T, k] float32, largest first"),
             Output("ids", lambda a: (a.gating_logits.shape[0], a.k),
                    lambda a: torch.int32, "[T, k] int32 expert indices")),
    run=_run, check=_k_fits,
    # k is the caller's: aot-check compiles two representative routers (Mixtral's 2
    # renormalised, DeepSeek's 8 plain)
    kernels=lambda: (topk_softmax_kernel(2, True), topk_softmax_kernel(8, False)),
    example=">>> w, ids = kernelforge.ops.topk_softmax(router_logits, 2, renormalize=True)",
    reference=lambda a: reference(a.gating_logits, a.k, a.renormalize),
    samples=_samples,
    bad=(Bad("k larger than the experts", lambda c: c.with_(
        k=c.kwargs["gating_logits"].shape[-1] + 1), ("`k`", "experts")),),
    bench=bench(lambda device, dtype, T, E, k: dict(
        gating_logits=torch.randn(T, E, device=device).to(dtype), k=k, renormalize=True),
        (1, 8, 2), (256, 64, 6), (4096, 128, 8)),
    resize=resize_rows("gating_logits"), peer=_peer,
    cost=lambda a: (a.gating_logits.numel() * a.gating_logits.element_size(),
                    (4 + 2 * a.k) * a.gating_logits.numel()),
    vllm="topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, "
         "renormalize)",
)

topk_softmax = TOPK_SOFTMAX.op
SPECS = (TOPK_SOFTMAX,)
