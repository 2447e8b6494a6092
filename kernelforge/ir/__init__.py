"""The kernel IR: nodes (nodes.py), dtypes, the tracing builder, the
verifier, shared analyses and the text printer."""
from .dtypes import DType  # noqa: F401
from .errors import KernelError  # noqa: F401
from .nodes import Axis, Node, Op, Param  # noqa: F401
