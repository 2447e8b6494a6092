"""Independent references for the runtime tests: transformers' own forward."""
import inspect

import torch


@torch.no_grad()
def hf_greedy(model, ids: list, n: int) -> list:
    """n greedy tokens from a transformers causal LM (its KV cache, argmax), eos ignored."""
    from transformers import DynamicCache

    # transformers 5.x renames forward's past_key_values to cache; the cache fills in place
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    out, x = [], torch.tensor([ids])
    for _ in range(n):
        logits = model(x, use_cache=True, **{kw: cache}).logits
        t = int(logits[0, -1].argmax())
        out.append(t)
        x = torch.tensor([[t]])
    return out


@torch.no_grad()
def hf_logits(model, ids: list) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()
