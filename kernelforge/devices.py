"""Devices by name: the default one, checking a requested one, and loading
the plug-in of an out-of-tree device.

The default is the GPU PyTorch itself ships (CUDA or ROCm, then XPU), else
the CPU. An out-of-tree device (PrivateUse1: a vendor's plug-in) is chosen
by name, ``device="<name>"``; a package announces the Python module that
registers it under the ``kernelforge.devices`` entry point group, and the
first request for that name imports it. Importing a plug-in never moves
every model onto it.

In the runtime (``LLM(device=...)``), what depends on the device:

* CPU only: weights and the KV cache on 2 MB pages (``hugepages.py``), the
  int4/int8 weight-only layers (torch's ``*_for_cpu`` kernels), and decode
  steps replayed from ``kernelforge.graph`` recordings (``decode_graphs.py``).
* CUDA: decode steps replayed through CUDA graphs (``cuda_graphs.py``).
* Anything else: every step op by op, on the device's own tensors.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Optional, Union

import torch

DeviceLike = Union[str, torch.device, None]


def default_device() -> torch.device:
    """The best device PyTorch has built in here: CUDA (or ROCm), then XPU, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu", xpu.current_device())
    return torch.device("cpu")


def resolve(device: DeviceLike, arg: str = "device") -> torch.device:
    """``device`` as a checked ``torch.device`` (None: ``default_device()``).

    Raises ValueError naming ``arg`` when the device type is unknown to torch
    (a plug-in not imported), not available here, or its index is out of range.
    """
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"{arg} must be a device name like 'cpu', 'cuda', 'cuda:1' or a "
                         f"torch.device, got {type(device).__name__} {device!r}")
    if isinstance(device, str):
        load_plugin(device.split(":")[0])
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        known = sorted(announced())
        raise ValueError(f"{arg}: {device!r} is not a device torch knows here ({e}); an "
                         f"out-of-tree device exists once its plug-in is imported (announced "
                         f"device plug-ins: {known or 'none'})") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "meta":
        raise ValueError(f"{arg}: 'meta' tensors hold no data; a model cannot run on them")
    module = getattr(torch, dev.type, None)
    if dev.type == _privateuse1() and not callable(getattr(module, "is_available", None)):
        raise ValueError(f"{arg}: {dev.type!r} is registered (PrivateUse1) but has no device "
                         f"module: its plug-in must call torch._register_device_module")
    if module is None or not callable(getattr(module, "is_available", None)):
        raise ValueError(f"{arg}: {dev.type!r} has no torch device module to check it with")
    if not module.is_available():
        raise ValueError(f"{arg}: {str(device)!r} was requested but torch.{dev.type}."
                         f"is_available() is False on this machine")
    count = module.device_count() if callable(getattr(module, "device_count", None)) else 1
    index = dev.index if dev.index is not None else (
        module.current_device() if callable(getattr(module, "current_device", None)) else 0)
    if not 0 <= index < count:
        raise ValueError(f"{arg}: {str(device)!r} asks for device {index}, but "
                         f"torch.{dev.type}.device_count() is {count}")
    return torch.device(dev.type, index)


def announced() -> dict:
    """Device name -> the entry point (group ``kernelforge.devices``) of every
    installed device plug-in; its value is the module that registers the device."""
    return {ep.name: ep for ep in entry_points(group="kernelforge.devices")}


def load_plugin(name: str) -> bool:
    """Import the plug-in announced for device ``name`` unless torch knows the
    name already; whether one was imported. A plug-in that fails to import
    raises RuntimeError naming its package (not ImportError: a missing
    optional dependency of kernelforge itself is reported differently)."""
    if _privateuse1() == name or name in ("cpu", "cuda", "meta", "xpu", "mps", "hip", "mtia"):
        return False
    ep = announced().get(name)
    if ep is None:
        return False
    try:
        importlib.import_module(ep.value.split(":")[0])
    except Exception as e:
        dist = getattr(getattr(ep, "dist", None), "name", "?")
        raise RuntimeError(f"the plug-in of device {name!r} ({ep.value}, from {dist}) failed "
                          f"to import: {type(e).__name__}: {e}") from e
    return True


def _privateuse1() -> Optional[str]:
    """The name the PrivateUse1 key was renamed to, or None while it has none."""
    name = torch._C._get_privateuse1_backend_name()
    return None if name == "privateuseone" else name


def is_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op where work runs as it is called)."""
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    if device.type != "cpu" and callable(sync):
        sync()
