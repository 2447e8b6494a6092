"""Hostile inputs (kernelforge/hostile.py) on every backend under test: about
KF_HOSTILE_LIMIT mutations per op (default 40, spread over the whole list;
0 runs them all), each in a worker process so a crash is counted, not
fatal. The counts per outcome are printed (pytest -s, or -rA); the goal is
0 crashes, 0 wrong outputs and 0 unclear errors."""
import os

import pytest

import kernelforge
from kernelforge import hostile
from conftest import BACKENDS

LIMIT = int(os.environ.get("KF_HOSTILE_LIMIT", "40")) or None


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_inputs(backend, capsys):
    per_op = {op: hostile.run(op, backend, LIMIT, timeout=300)
              for op in kernelforge.ops.SPECS}
    total, table = hostile.summary(per_op)
    bad = [f"{op}: {r['label']}: {r['outcome']}: {r['detail']}" for op, results in per_op.items()
           for r in results if r["outcome"] in ("crash", "wrong output", "unclear error")]
    with capsys.disabled():
        print(f"\nhostile inputs on {backend} (about {LIMIT or 'all'} per op):\n{table}")
    assert not bad, "\n".join(bad)
