"""Graphs: run a function once, record its kernel launches and torch ops,
then replay them without the Python around them (CUDA graphs' idea, on any
device).

A decode step of a small model is a few hundred small calls. On a CPU each
spends more time in Python (argument checks, backend choice, packing the C
call) than in its few microseconds of work, a large share of a batch-1 token
(docs/design.md, "Graphs"). Captured, each KernelForge launch becomes one
pre-bound call (for the cpp backend: a C function with its argument array
packed once) and each torch op one call of its ATen overload; views,
allocations and the checks are gone.

    >>> x = torch.randn(4, 576); w = torch.ones(576)
    >>> g = kernelforge.graph.capture(lambda: ops.rms_norm(x, w) * 2)
    >>> x.copy_(torch.randn(4, 576))       # new contents, same tensor
    >>> y = g.replay()                      # the same tensor each replay, rewritten

The rules are CUDA graphs':

* **Inputs** are the tensors the function reads that exist before capture.
  Change their contents (``copy_``, slicing assignment) between replays, never
  the tensor objects, shapes or strides: the replay reads the same memory.
* **Outputs** are whatever the function returned: tensors made during capture,
  rewritten in place by every replay (copy them to keep a result).
* **Python decisions on tensor values are frozen** at capture: an ``if`` on a
  value, a loop bound read from a tensor, a shape. ``item()`` and other ops
  that read a value on the host raise ``CaptureError``, as do ops whose output
  shape depends on the data (boolean masks, ``nonzero``). ``tolist()`` bypasses
  torch's dispatch and cannot be caught: a captured function must not call it.
* Random ops replay, but their generator state is not captured; keep sampling
  outside the graph.
"""
from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from . import dispatch

aten = torch.ops.aten

#: ops that only allocate: their contents are undefined, so a replay has nothing to redo
_ALLOCATIONS = frozenset([aten.empty.memory_format, aten.empty_strided.default,
                          aten.empty_like.default, aten.new_empty.default,
                          aten.new_empty_strided.default])


class CaptureError(RuntimeError):
    """The captured function did something a replay could not repeat."""


class Graph:
    """A captured function: ``replay()`` reruns its launches and torch ops in
    order and returns the output captured (the same tensors, rewritten).

    Attributes:
        output: what the function returned at capture.
        launches, torch_ops, skipped: how many KernelForge launches and torch
            ops the replay runs, and how many ops it leaves out (views and
            allocations, which only describe memory).
    """

    def __init__(self, calls: list, output, launches: int, torch_ops: int, skipped: int,
                 inference: bool):
        self._calls = tuple(calls)
        self.output = output
        self.launches, self.torch_ops, self.skipped = launches, torch_ops, skipped
        self._inference = inference

    def replay(self):
        """Run the recorded calls on the inputs' current contents; returns ``output``."""
        # the torch ops were recorded on inference tensors in inference mode
        # (where the engine runs); outside it an in-place op on one raises
        with torch.inference_mode(self._inference), torch.no_grad():
            for call in self._calls:
                call()
        return self.output

    def __len__(self) -> int:
        return len(self._calls)

    def __repr__(self) -> str:
        return (f"Graph({self.launches} launches, {self.torch_ops} torch ops, "
                f"{self.skipped} views/allocations left out)")


def capture(fn, *args, **kwargs) -> Graph:
    """Run ``fn(*args, **kwargs)`` once and record it for replay.

    Args:
        fn: a function of KernelForge ops and torch ops on tensors that exist
            before the call (its inputs); see the module docstring for the rules.
        args, kwargs: passed to ``fn`` at capture only (a replay reuses them).
    Returns:
        a ``Graph``; its ``output`` is ``fn``'s result, computed by the capture run.

    Raises:
        CaptureError: ``fn`` read a tensor value on the host (``item()``), ran
            an op whose output shape depends on data, or captures are nested.

    Example:
        >>> g = kernelforge.graph.capture(model_step, static_inputs)
        >>> static_inputs.copy_(next_inputs); logits = g.replay()
    """
    if dispatch._capture is not None:
        raise CaptureError("capture: a capture is already running (captures do not nest)")
    rec = _Recorder()
    dispatch._capture = rec
    try:
        with rec:
            out = fn(*args, **kwargs)
    finally:
        dispatch._capture = None
    return Graph(rec.calls, out, rec.launches, rec.torch_ops, rec.skipped,
                 torch.is_inference_mode_enabled())


def _storage(t):
    """The storage address of a non-empty strided tensor; None for anything
    else (an opaque oneDNN tensor has no storage to compare)."""
    if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel():
        return t.untyped_storage().data_ptr()
    return None


def _copy_into(targets, func, args, kwargs, picks):
    res, _ = tree_flatten(func(*args, **kwargs))
    for i in picks:
        targets[i].copy_(res[i])


def _copy_one(target, func, args, kwargs):
    target.copy_(func(*args, **kwargs))


def _out_variant(func):
    """The ``out=`` overload computing what ``func`` does (``mul.Tensor`` ->
    ``mul.out``): a replay then writes the captured output directly instead of
    allocating a result and copying it (less time per op; docs/design.md,
    "Graphs"). Matched by
    schema: the same arguments plus exactly one ``out``."""
    if len(func._schema.returns) != 1:
        return None
    name = func._overloadname
    names = [a.name for a in func._schema.arguments]
    for cand in (["out"] if name in ("default", "Tensor") else []) + [f"{name}_out"]:
        if cand not in func.overloadpacket.overloads():
            continue
        o = getattr(func.overloadpacket, cand)
        args = o._schema.arguments
        outs = [a for a in args if a.is_out]
        if len(outs) == 1 and outs[0].name == "out" and \
                [a.name for a in args if not a.is_out] == names:
            return o
    return None


class _Recorder(TorchDispatchMode):
    """Sees every torch op (``__torch_dispatch__``) and every KernelForge
    launch (``dispatch.launch`` calls ``launch`` here while a capture runs)."""

    def __init__(self):
        super().__init__()
        self.calls: list = []
        self.launches = self.torch_ops = self.skipped = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch otherwise wraps __torch_dispatch__ in a Dynamo "disable", which
        # imports Dynamo (seconds) on the first capture; this one runs aten ops
        # and launches (compiled code runs with the modes disabled, above)
        return False

    def launch(self, kdef, args, backend) -> tuple:
        """Run one kernel launch and record it bound to its arguments: outputs
        the op left to dispatch are allocated here, once, and reused."""
        # a lowering's own torch ops are part of the launch, not recorded; and
        # torch.compile (the inductor backend) refuses to trace under a mode
        with _disable_current_modes():
            args, outs = list(args), []
            for i, a in enumerate(args):
                if isinstance(a, dispatch.NewTensor):
                    args[i] = t = torch.empty(a.shape, dtype=a.dtype, device=a.device)
                    outs.append(t)
            fn, _ = dispatch.compiled(kdef, args, backend)
            fn(*args)
            bind = getattr(fn, "bind", None)
            self.calls.append(bind(*args) if bind is not None else functools.partial(fn, *args))
            self.launches += 1
        return tuple(outs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tags = func.tags
        if torch.Tag.data_dependent_output in tags:
            raise CaptureError(f"capture: {func} reads a tensor's value on the host; a replay "
                               "would reuse the value read at capture")
        if torch.Tag.dynamic_output_shape in tags and not _static_index(func, args):
            raise CaptureError(f"capture: the output shape of {func} depends on tensor "
                               "values; a replay could not reuse its output")
        if func in _ALLOCATIONS:
            self.skipped += 1
        elif func._schema.is_mutable:           # in place or out=: rerun as it is
            self.calls.append(functools.partial(func, *args, **kwargs))
            self.torch_ops += 1
        else:
            results, _ = tree_flatten(out)
            inputs, _ = tree_flatten((args, kwargs))
            shared = {_storage(t) for t in inputs} | {None}     # None: nothing to copy
            # an output in an input's memory is a view: it follows its base
            picks = [i for i, t in enumerate(results) if _storage(t) not in shared]
            if not picks:
                self.skipped += 1
                return out
            self.torch_ops += 1
            if isinstance(out, torch.Tensor):
                variant = _out_variant(func)
                if variant is not None:
                    self.calls.append(functools.partial(variant, *args, **kwargs, out=out))
                else:
                    self.calls.append(functools.partial(_copy_one, out, func, args, kwargs))
            else:
                self.calls.append(functools.partial(_copy_into, results, func, args, kwargs,
                                                    picks))
        return out


def _static_index(func, args) -> bool:
    """``x[idx]`` with integer index tensors: its shape follows the indices'
    shapes, not their values (a boolean mask's would not)."""
    if func is not aten.index.Tensor:
        return False
    return all(i is None or not (i.dtype == torch.bool or i.dtype == torch.uint8)
               for i in args[1])


__all__ = ["capture", "Graph", "CaptureError"]
