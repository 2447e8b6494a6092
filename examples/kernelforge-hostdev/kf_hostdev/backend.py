"""The KernelForge backend for hostdev (``hostdev_cpp``); it lives in the
top-level module ``kf_hostdev_backend`` so that loading it never imports
the device."""
from kf_hostdev_backend import DEVICE, PRIORITY, HostdevCppBackend

__all__ = ["DEVICE", "PRIORITY", "HostdevCppBackend"]
