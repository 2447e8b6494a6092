"""``kernelforge new-op NAME``: the files of a new op, ready to edit.

Writes kernelforge/kernels/NAME.py (a row-wise kernel and its spec: a
working op that copies its input, to be replaced by the real computation) and
tests/test_NAME.py (a place for the op's own tests; the generic ones come
from the spec). The op is found by kernelforge.ops as soon as the file
exists; ``pytest tests/test_ops.py -k NAME --kf-backend=eager`` runs its checks.
"""
from __future__ import annotations

import keyword
import os
import sys

OP_TEMPLATE = '''"""{name}: TODO one line saying what it computes, written once in the kernel IR.

TODO: the formula, the precision (what is computed in fp32, what is rounded
where) and which model or engine uses it.
"""
import torch

import kernelforge.lang as kl
from kernelforge.dispatch import launch
from kernelforge.spec import Backend, Call, OpSpec, Out, Output, Tensor, resize_rows, rowwise


@kl.kernel(static=("N",), examples=({{"N": 4096}},))
def {name}_fwd(x: kl.In("M", "N"), out: kl.Out("M", "N")):
    m = kl.parallel("M")

    def body(n):
        v = kl.load(x[m, n]).to(kl.f32)
        kl.store(out[m, n], v.to(out.dtype))          # TODO: the computation

    kl.seq_for("N", body)


def reference(x):
    """float64, written from the formula, sharing nothing with the kernel."""
    return x.double()                                   # TODO


def _samples(st, budget):
    @st.composite
    def draw(draw):
        # sizes for backends that compile each (most telling first), any size for eager
        x, dtype, _ = budget.row_input(draw, [4096, 7, 1], st.integers(1, 5000))
        return Call(dict(x=x), f"{{list(x.shape)}} {{dtype}}")
    return draw()


{upper} = OpSpec(
    "{name}",
    "TODO: one line for the docstring.",
    args=(Tensor("x", dims=(1, None), doc="[..., N] float32, bfloat16 or float16"),
          Out(), Backend()),
    outputs=(Output("y", lambda a: a.x.shape, "x", "``x``'s shape and dtype"),),
    run=rowwise(lambda a, x, out: launch({name}_fwd, x, out, backend=a.backend)),
    kernels=lambda: ({name}_fwd,),
    example=">>> y = kernelforge.ops.{name}(x)",
    reference=lambda a: (reference(a.x),),
    samples=_samples,
    resize=resize_rows("x"),
)

{name} = {upper}.op
SPECS = ({upper},)
'''

TEST_TEMPLATE = '''"""{name}: the op's own tests. Every backend's property, bad-input,
compile-count and bounds checks come from its spec (tests/test_ops.py);
test here what the spec cannot say: a second, independent reference (a
torch op, transformers, vLLM), the edge cases of the formula, NaN and inf."""
import torch

import kernelforge
from kernelforge.tolerance import assert_close
from conftest import BACKENDS, DEVICE


def test_{name}_against_an_independent_reference():
    x = torch.randn(5, 64, device=DEVICE)
    for backend in BACKENDS:
        y = kernelforge.ops.{name}(x, backend=backend)
        assert_close(y, x.double(), torch.float32, f"{name}[{{backend}}]")   # TODO
'''


def main(name: str, root: str = ".") -> int:
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
        print(f"new-op: `name` expected a Python identifier (e.g. gelu_and_mul), got {name!r}",
              file=sys.stderr)
        return 2
    from . import ops
    if name in ops.KERNELS or hasattr(ops, name):
        print(f"new-op: an op named {name!r} exists already", file=sys.stderr)
        return 2
    paths = {os.path.join(root, "kernelforge", "kernels", f"{name}.py"): OP_TEMPLATE,
             os.path.join(root, "tests", f"test_{name}.py"): TEST_TEMPLATE}
    for path in paths:
        if os.path.exists(path):
            print(f"new-op: {path} exists; not overwriting it", file=sys.stderr)
            return 2
        if not os.path.isdir(os.path.dirname(path)):
            print(f"new-op: {os.path.dirname(path)}/ not found: run it from a checkout's root "
                  "or pass --root", file=sys.stderr)
            return 2
    for path, template in paths.items():
        with open(path, "w") as f:
            f.write(template.format(name=name, upper=name.upper()))
        print(f"wrote {path}")
    print(f"next: edit the kernel and the reference, then\n"
          f"  pytest tests/test_ops.py -k {name} --kf-backend=eager     # the spec's checks\n"
          f"  kernelforge show {name} --backend cpp                     # the generated code\n"
          f"(docs/kernel-authors.md walks through it)")
    return 0
