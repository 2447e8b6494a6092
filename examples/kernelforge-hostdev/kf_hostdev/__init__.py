"""hostdev: an out-of-tree PyTorch device on host memory.

``import kf_hostdev`` registers the device with torch through the
PrivateUse1 dispatch key, under the name ``"hostdev"``::

    import torch, kf_hostdev
    x = torch.randn(4, 64, device="hostdev")
    y = torch.nn.functional.softmax(x @ x.T, -1).cpu()

Its memory is host memory (64-byte aligned), so ``data_ptr()`` is a host
address a CPU kernel can use directly. It implements allocation, copies,
views and resizing itself; every other aten op runs on the CPU kernel, on
CPU tensors that alias the device tensors' memory (no copies). ``torch.hostdev``
is its device module (``is_available``, ``device_count``, ``synchronize``,
seeds and RNG state, memory statistics).

One process has one PrivateUse1 device: importing this after another
plug-in took PrivateUse1 fails, saying which one.
"""
import torch

NAME = "hostdev"


def _claim() -> None:
    taken = torch._C._get_privateuse1_backend_name()
    if taken not in ("privateuseone", NAME):
        raise RuntimeError(
            f"kf_hostdev: torch's PrivateUse1 device is already registered as {taken!r} by "
            f"another plug-in in this process; a process has one PrivateUse1 device, so "
            f"{NAME!r} cannot be registered (import kf_hostdev in a process without {taken!r})")


_claim()   # before loading the extension: its kernels register for PrivateUse1

from . import _C  # noqa: E402  (allocator, device guard, hooks, kernels)
from . import hostdev as _module  # noqa: E402

if torch._C._get_privateuse1_backend_name() != NAME:
    torch.utils.rename_privateuse1_backend(NAME)
if getattr(torch, NAME, None) is not _module:
    torch._register_device_module(NAME, _module)
if not hasattr(torch.Tensor, f"is_{NAME}"):
    torch.utils.generate_methods_for_privateuse1_backend(for_storage=True)

__all__ = ["NAME"]
