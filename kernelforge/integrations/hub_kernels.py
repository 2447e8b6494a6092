"""KernelForge layers behind transformers' hub-kernel hooks, through the
``kernels`` package's own mapping.

transformers marks layers such as ``LlamaRMSNorm`` with
``use_kernel_forward_from_hub("RMSNorm")``. With the ``kernels`` package
installed, ``kernels.kernelize(model)`` gives each marked layer the forward of
the layer a kernel mapping names for its device. KernelForge is such a
repository (``KernelForgeRepository``: the package's protocol is ``load()``
returning the layer class). Its layers are stateless like the Hub's: a
forward that reads the module's own weights.

``kernelize(model, backend)`` here runs ``kernels.kernelize`` with only
KernelForge's mapping; ``kernelforge.integrations.transformers.kernelize``
calls it when ``kernels`` is importable.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

import kernelforge


class RMSNorm(nn.Module):
    """``ops.rms_norm`` with the module's ``weight`` and ``variance_epsilon``;
    transformers' own forward where the dtypes differ (its promotion rule)."""

    can_torch_compile = True
    has_backward = False

    def forward(self, hidden_states):
        w = self.weight
        if hidden_states.dtype != w.dtype or hidden_states.shape[-1] != w.shape[0]:
            return type(self).forward(self, hidden_states)
        return kernelforge.ops.rms_norm(hidden_states, w, self.variance_epsilon,
                                        backend=self.__dict__.get("_kernelforge_backend"))


#: hub layer name (transformers' ``use_kernel_forward_from_hub`` argument) -> layer
LAYERS = {"RMSNorm": RMSNorm}
#: the ``kernels`` device types KernelForge serves (its backends choose per device)
DEVICES = ("cpu", "cuda", "rocm", "xpu")


class KernelForgeRepository:
    """A ``kernels`` repository holding one KernelForge layer."""

    def __init__(self, layer_name: str):
        self.layer_name = layer_name

    def load(self) -> type:
        return LAYERS[self.layer_name]

    def __eq__(self, other) -> bool:
        return isinstance(other, KernelForgeRepository) and other.layer_name == self.layer_name

    def __hash__(self) -> int:
        return hash(("kernelforge", self.layer_name))

    def __str__(self) -> str:
        return f"kernelforge layer `{self.layer_name}`"


def mapping() -> dict:
    """The kernel mapping, in the ``kernels`` package's format."""
    return {name: {device: KernelForgeRepository(name) for device in DEVICES} for name in LAYERS}


def available() -> bool:
    return importlib.util.find_spec("kernels") is not None


def kernelize(model: nn.Module, backend: str | None = None) -> list:
    """``kernels.kernelize`` with KernelForge's mapping alone; returns the
    modules it gave a KernelForge forward. Marked layers KernelForge has no
    layer for keep (or get back) their class's forward, silently."""
    import kernels
    targets = [m for m in model.modules()
               if getattr(type(m), "kernel_layer_name", None) in LAYERS]
    if not targets:
        return []
    for m in targets:
        m._kernelforge_backend = backend
    device = next((p.device.type for p in model.parameters()), "cpu")
    quiet = logging.getLogger("kernels._internals.layer.layer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)      # "no kernel mapping" for each layer we do not serve
    try:
        with kernels.use_kernel_mapping(mapping(), inherit_mapping=False):
            kernels.kernelize(model, mode=kernels.Mode.INFERENCE, device=device,
                              use_fallback=True)
    finally:
        quiet.setLevel(level)
    return [m for m in targets if isinstance(m.__dict__.get("_kernel_repo"),
                                              KernelForgeRepository)]


def is_hub_rms_norm(mod: nn.Module) -> bool:
    return isinstance(mod.__dict__.get("_kernel_repo"), KernelForgeRepository) and \
        isinstance(getattr(mod, "weight", None), torch.Tensor)
