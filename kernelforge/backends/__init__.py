"""Lowerings as backends: eager, inductor and triton, plus plug-ins."""
from .registry import Decision, backends, register, select  # noqa: F401
