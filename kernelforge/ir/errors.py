"""Errors that point at the kernel author's source line."""
from __future__ import annotations


class KernelError(Exception):
    """A malformed kernel. The message starts with ``file:line`` of the
    kernel source that caused it and quotes that line."""

    def __init__(self, message: str, loc=None):
        self.loc = loc
        self.reason = message
        if loc is not None:
            text = f"\n    {loc.text.strip()}" if loc.text else ""
            message = f"{loc}: {message}{text}"
        super().__init__(message)
