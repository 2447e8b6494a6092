"""Every op, on every backend under test, from its spec (kernelforge/spec.py,
kernelforge/testing.py): outputs against the spec's float64 reference,
bad input refused with an error naming the argument, no recompiles for a
new row count, no reads or writes outside the tensors' views.

    pytest tests/test_ops.py --kf-backend=cpp      # one backend's cases
"""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import kernelforge
from kernelforge import testing
from conftest import BACKENDS, DEVICE

SPECS = list(kernelforge.ops.SPECS.values())
_ids = [s.name for s in SPECS]


def _slow(backend: str) -> bool:
    """Inductor compiles each drawn specialisation; the Triton interpreter
    runs every program in NumPy."""
    return backend == "inductor" or (backend == "triton" and DEVICE.type == "cpu")


def _examples(backend: str) -> int:
    """The profile's example count; a third of it on slow backends, which
    the other backends' runs and the per-op tests still cover at full count."""
    n = settings.default.max_examples
    return max(3, n // 3) if _slow(backend) else n


def _property(spec, backend, check, examples: int, **budget_kw):
    strategy = spec.samples(st, testing.budget(backend, DEVICE, spec, **budget_kw))

    @settings(max_examples=examples, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def prop(data):
        check(data.draw(strategy, label="call"))
    prop()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_matches_reference(spec, backend):
    _property(spec, backend, lambda call: testing.check_reference(spec, call, backend),
              _examples(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_bad_input_names_the_argument(spec, backend):
    def check(call):
        for label, bad, words in testing.bad_cases(spec, call):
            testing.check_bad(spec, label, bad, words, backend)
    _property(spec, backend, check, 2, force_rows=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [s for s in SPECS if s.resize], ids=[s.name for s in SPECS
                                                                       if s.resize])
def test_a_new_row_count_compiles_nothing(spec, backend):
    _property(spec, backend, lambda call: testing.check_compile_count(
        spec, lambda rows: spec.resize(call, rows), backend), 1, force_rows=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_no_access_outside_the_views(spec, backend):
    _property(spec, backend, lambda call: testing.check_poison(spec, call, backend),
              1 if _slow(backend) else 3, force_rows=3)
