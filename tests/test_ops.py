"""Every op, on every backend under test, from its spec (kernelforge/spec.py,
kernelforge/testing.py): outputs against the spec's float64 reference,
bad input refused with an error naming the argument, no recompiles for a
new row count, no reads or writes outside the tensors' views.

    pytest tests/test_ops.py --kf-backend=cpp      # one backend's cases
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import kernelforge
from kernelforge import testing
from conftest import BACKENDS, DEVICE

SPECS = list(kernelforge.ops.SPECS.values())
_ids = [s.name for s in SPECS]


def _draw(data, spec, backend, **kw):
    return data.draw(spec.samples(st, testing.budget(backend, DEVICE, spec, **kw)), label="call")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@given(data=st.data())
def test_matches_reference(spec, backend, data):
    testing.check_reference(spec, _draw(data, spec, backend), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@settings(max_examples=2)
@given(data=st.data())
def test_bad_input_names_the_argument(spec, backend, data):
    call = _draw(data, spec, backend, force_rows=2)
    for label, bad, words in testing.bad_cases(spec, call):
        testing.check_bad(spec, label, bad, words, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [s for s in SPECS if s.resize], ids=[s.name for s in SPECS
                                                                       if s.resize])
@settings(max_examples=1, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_new_row_count_compiles_nothing(spec, backend, data):
    call = _draw(data, spec, backend, force_rows=3)
    testing.check_compile_count(spec, lambda rows: spec.resize(call, rows), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@settings(max_examples=3)
@given(data=st.data())
def test_no_access_outside_the_views(spec, backend, data):
    testing.check_poison(spec, _draw(data, spec, backend, force_rows=3), backend)
