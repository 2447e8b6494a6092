"""Every op with a spec, at its benchmark shapes, on this machine's backends
and against its peer (the plain torch an engine would run instead), in one
run: the cases come from the specs (``OpSpec.bench``, ``peer``, ``cost``).

    python3 -m pytest bench/test_ops_bench.py --benchmark-only

Each case is checked once against the spec's float64 reference before it is
timed. Bytes moved (``cost``) give GB/s and the fraction of the copy
bandwidth measured in the same run (bench/conftest.py); the summary prints
each backend's ratio to the peer. ``-k small`` keeps each op's first shape.
"""
from __future__ import annotations

import pytest
import torch

import kernelforge
from kernelforge import testing
from kernelforge.backends import registry

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
_BACKENDS = [n for n, b in registry.backends().items()
             if registry.builtin(n) and b.can_run(DEVICE)[0]
             and not (n == "triton" and DEVICE.type == "cpu")]      # (the interpreter: no timing)

CASES = [(spec, label, make, impl)
         for spec in kernelforge.ops.SPECS.values()
         for i, (label, make) in enumerate(spec.bench)
         for impl in [f"kf_{b}" for b in _BACKENDS] + (["peer"] if spec.peer else [])]


def _id(case) -> str:
    spec, label, _, impl = case
    small = "small-" if label == spec.bench[0][0] else ""
    return f"{small}{spec.name}-{label}-{impl}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_op(benchmark, record_case, copy_bandwidth, case):
    spec, label, make, impl = case
    call = make(DEVICE, DTYPE)
    a = testing.bound(spec, call)
    if impl == "peer":
        def fn():
            return spec.peer(testing.bound(spec, call))
    else:
        backend = impl[3:]
        testing.check_reference(spec, call, backend)      # a broken kernel posts no number

        def fn():
            return spec.op(**call.kwargs, backend=backend)
    fn()
    benchmark.group = f"{spec.name} {label} {str(DTYPE).replace('torch.', '')}"
    benchmark.pedantic(fn, rounds=30, warmup_rounds=2, iterations=1)
    nbytes, flops = spec.cost(a) if spec.cost else (0, None)
    record_case(benchmark, group=benchmark.group, impl=impl, nbytes=nbytes, op="spec",
                flops=flops)
