"""Turning a step's logits into next tokens: penalties
(``kernelforge.ops.apply_penalties``, vLLM's rules) and the draw
(``kernelforge.ops.sample``: temperature, top-k, top-p, min-p, one seed per
request). A request's draw is keyed by its seed and the number of tokens it
has generated, so the draw does not depend on the batch or on a preemption;
the tokens are then the same alone or batched when the logits are, which
holds in float32 (in bfloat16 a row's logits change with the batch's matmul
shapes: docs/serving.md, "Batch invariance")."""
from __future__ import annotations

import random

from typing import TYPE_CHECKING

import torch

import kernelforge

if TYPE_CHECKING:
    from .sequence import Sequence


def request_seed(seed) -> int:
    """The seed a request draws with: its own, or a fresh random one (fixed
    for the request's lifetime, so its draws do not repeat across steps).
    Any int is accepted; it is folded into int64 (unchanged when it fits)."""
    if seed is None:
        return random.getrandbits(63)
    return (int(seed) + 2 ** 63) % 2 ** 64 - 2 ** 63


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device)


def sample(logits: torch.Tensor, seqs: "list[Sequence]") -> list[int]:
    """One token id per row of ``logits`` [B, V], row i drawn for ``seqs[i]``;
    rows whose request asks for logprobs get them appended to its
    ``seq.logprobs`` (see ``record_logprobs``)."""
    tokens = _draw(logits, seqs)
    record_logprobs(logits, seqs, tokens)
    return tokens


def sample_isolated(logits: torch.Tensor, seqs: "list[Sequence]"
                    ) -> tuple[list, dict[int, str]]:
    """``sample``, with a failure confined to its own request: (tokens, errors)
    where rows with NaN logits, and rows whose draw fails when run alone, get
    no token (None) and an error message under their row index."""
    # a row's max is NaN iff the row holds one: one pass, no [B, V] mask
    errors = {i: "the model produced NaN logits" for i in
              torch.isnan(logits.amax(dim=-1)).nonzero().flatten().tolist()}
    good = [i for i in range(len(seqs)) if i not in errors]
    tokens: list = [None] * len(seqs)
    if not good:
        return tokens, errors
    kept = [len(seqs[i].logprobs) for i in good]
    try:
        rows = logits if len(good) == len(seqs) else logits[good]
        for i, t in zip(good, sample(rows, [seqs[i] for i in good])):
            tokens[i] = t
    except Exception:                   # find the request(s) at fault, one row at a time
        for i, n in zip(good, kept):
            del seqs[i].logprobs[n:]
            try:
                tokens[i] = sample(logits[i:i + 1], [seqs[i]])[0]
            except Exception as e:
                del seqs[i].logprobs[n:]
                errors[i] = f"sampling failed: {type(e).__name__}: {e}"
    return tokens, errors


def record_logprobs(logits: torch.Tensor, seqs: "list[Sequence]", tokens: list[int]) -> None:
    """vLLM's default: log-softmax of the model's raw logits (before penalties,
    temperature and filters): the chosen token's, and the top ``logprobs``
    tokens' as {token id: logprob}."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    for j, i in enumerate(rows):
        n = seqs[i].params.logprobs
        top = torch.topk(lp[j], n) if n else None
        seqs[i].logprobs.append((float(lp[j, tokens[i]]),
                                 {} if top is None else dict(zip(top.indices.tolist(),
                                                                 top.values.tolist()))))


def _draw(logits: torch.Tensor, seqs: "list[Sequence]") -> list[int]:
    params = [s.params for s in seqs]
    dev = logits.device
    if any(p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty
           for p in params):
        # penalties in fp32 (the model's bf16 logits are exact in it); a penalised
        # bf16 logit would be rounded again
        logits = kernelforge.ops.apply_penalties(
            logits.float(), _padded([s.prompt_ids for s in seqs], logits.device),
            _padded([s.output_ids for s in seqs], logits.device),
            repetition_penalty=torch.tensor([p.repetition_penalty for p in params], device=dev),
            frequency_penalty=torch.tensor([p.frequency_penalty for p in params], device=dev),
            presence_penalty=torch.tensor([p.presence_penalty for p in params], device=dev))
    if all(p.greedy for p in params):
        # the lowest index on ties, as sample(); max's indices (documented to
        # be the first maximum's), faster than argmax on CPU (docs/runtime.md,
        # "Measured: paged decode as a block product")
        return logits.max(dim=-1).indices.tolist()
    # float64: the op checks and compares the values as given (greedy below
    # SAMPLING_EPS, top_p > 0), so they must not be rounded to fp32 first
    f64 = torch.float64
    tokens = kernelforge.ops.sample(
        logits, temperature=torch.tensor([p.temperature for p in params], dtype=f64, device=dev),
        # any int is a valid top_k (>= V or <= 0 keeps every token); int64 holds them clamped
        top_k=torch.tensor([max(min(p.top_k, 2 ** 63 - 1), 0) for p in params], device=dev),
        top_p=torch.tensor([p.top_p for p in params], dtype=f64, device=dev),
        min_p=torch.tensor([p.min_p for p in params], dtype=f64, device=dev),
        seeds=torch.tensor([s.seed for s in seqs], device=dev),
        offsets=torch.tensor([len(s.output_ids) for s in seqs], device=dev))
    return tokens.tolist()
