"""Dynamo's function marks, set without importing Dynamo.

Importing ``torch._dynamo`` takes seconds; a process that never compiles
(``kernelforge generate``, an engine on the cpp backend) should not pay it at
import. ``constant_result`` sets what ``torch._dynamo.assume_constant_result``
sets (tests/test_dynamo_marks.py compares the two on this torch).
"""
from __future__ import annotations

#: the attribute torch._dynamo.assume_constant_result sets on a function
MARK = "_dynamo_marked_constant"


def constant_result(fn):
    """``torch._dynamo.assume_constant_result(fn)``: inside a trace Dynamo runs
    the call eagerly and uses its result as a constant."""
    setattr(fn, MARK, True)
    return fn
