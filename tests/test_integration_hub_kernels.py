"""transformers' hub-kernel layers (``use_kernel_forward_from_hub("RMSNorm")``)
get KernelForge's forward through the real ``kernels`` package's mapping and
``kernels.kernelize``, which validates the layer (stateless, same forward
signature) before it swaps the forward."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
kernels = pytest.importorskip("kernels")

import kernelforge  # noqa: E402
from kernelforge.integrations import hub_kernels  # noqa: E402
from kernelforge.integrations.transformers import kernelize  # noqa: E402
from kernelforge.tolerance import assert_close_rows  # noqa: E402


def _model(seed=0):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():          # norm weights away from 1: a dropped weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.fixture
def norm_calls(monkeypatch):
    calls = [0]
    real = kernelforge.ops.rms_norm

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(kernelforge.ops, "rms_norm", counted)
    return calls


def test_the_layer_is_swapped_through_the_kernels_mapping(norm_calls):
    stock, kf = _model(), _model()
    assert type(kf.model.norm).kernel_layer_name == "RMSNorm"    # transformers marks it
    swapped = hub_kernels.kernelize(kf)
    norms = [m for m in kf.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(swapped) == len(norms) == 5
    assert all(isinstance(m.__dict__["_kernel_repo"], hub_kernels.KernelForgeRepository)
               for m in norms)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want, got = stock(ids).logits, kf(ids).logits
    assert norm_calls[0] == 5
    assert_close_rows(got.flatten(0, 1), want.flatten(0, 1), torch.float32, "logits")


def test_kernelize_takes_the_kernels_mapping_for_marked_norms():
    kf = kernelize(_model())
    norms = [m for m in kf.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert kf.kernelforge_swapped["rms_norm"] == len(norms) == 5
    assert all(isinstance(m.__dict__.get("_kernel_repo"), hub_kernels.KernelForgeRepository)
               for m in norms)


def test_the_kernels_package_accepts_the_layer_as_a_hub_layer():
    """kernels' own validation (no constructor, no extra members, the marked
    layer's forward signature) passes; a layer with state would not."""
    from kernels._internals.layer.layer import _validate_layer
    repo = hub_kernels.KernelForgeRepository("RMSNorm")
    norm_cls = transformers.models.llama.modeling_llama.LlamaRMSNorm
    _validate_layer(check_cls=norm_cls, cls=repo.load(), repo=repo)

    class Stateful(hub_kernels.RMSNorm):
        scale = 2.0
    with pytest.raises(TypeError):
        _validate_layer(check_cls=norm_cls, cls=Stateful, repo=repo)


def test_a_norm_with_weights_of_another_dtype_keeps_transformers_forward():
    stock, kf = _model(), _model()
    hub_kernels.kernelize(kf)
    kf.model.norm.weight.data = kf.model.norm.weight.data.double()
    stock.model.norm.weight.data = stock.model.norm.weight.data.double()
    h = torch.randn(3, 64)
    assert torch.equal(kf.model.norm(h), stock.model.norm(h))
