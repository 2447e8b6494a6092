"""transformers' own decode with kernelize(model) against the stock model, in
one run (issue 19's goal: at least 1.5x at batch 1 and 8). SmolLM2-135M from
its GGUF in fp32, 32 new tokens after an 8-token prompt, greedy.

    python3 -m pytest bench/test_transformers_bench.py --benchmark-only
"""
import copy
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kernelforge.integrations.transformers import kernelize  # noqa: E402

NEW = 32


@pytest.fixture(scope="module")
def models():
    from kernelforge.runtime.loader import default_model_path
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"transformers' GGUF loading needs {module}")
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model unavailable ({e})")
    stock = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return {"stock": stock, "kernelforge": kernelize(copy.deepcopy(stock))}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", ["stock", "kernelforge"])
def test_decode(benchmark, models, impl, batch):
    model = models[impl]
    ids = torch.randint(100, 1000, (batch, 8), generator=torch.Generator().manual_seed(0))

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
    benchmark.group = f"transformers decode, batch {batch}, {NEW} new tokens"
    benchmark.extra_info["tokens_per_s"] = None
    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    assert out.shape == (batch, 8 + NEW)
    benchmark.extra_info["tokens_per_s"] = batch * NEW / benchmark.stats.stats.median
