"""Hostile inputs (kernelforge/hostile.py) on every backend under test: about
KF_HOSTILE_LIMIT mutations per op (default 40, spread over the whole list;
0 runs them all), in a worker process so a crash is counted, not fatal. The
counts per outcome are printed (pytest -s, or -rA); the goal is 0 crashes,
0 wrong outputs and 0 unclear errors."""
import os
import signal

import pytest

import kernelforge
from kernelforge import hostile
from conftest import BACKENDS

LIMIT = int(os.environ.get("KF_HOSTILE_LIMIT", "40")) or None


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_inputs(backend, capsys):
    per_op = hostile.run_ops(list(kernelforge.ops.SPECS), backend, LIMIT, timeout=300)
    total, table = hostile.summary(per_op)
    bad = [f"{op}: {r['label']}: {r['outcome']}: {r['detail']}" for op, results in per_op.items()
           for r in results if r["outcome"] in ("crash", "wrong output", "unclear error")]
    with capsys.disabled():
        print(f"\nhostile inputs on {backend} (about {LIMIT or 'all'} per op):\n{table}")
    assert not bad, "\n".join(bad)


def test_a_crash_is_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    """A worker killed by a signal in one case: that case is a crash, and a new
    worker runs the rest of that op and the ops after it (nothing lost)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal\n"
        "from kernelforge import testing\n"
        "_run = testing.run\n"
        "def run(spec, call, backend):\n"
        "    x = call.kwargs.get('x')\n"
        "    if spec.name == 'silu_and_mul' and x is not None and x.isnan().any():\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    return _run(spec, call, backend)\n"
        "testing.run = run\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    names = ["silu_and_mul", "rms_norm"]
    per_op = hostile.run_ops(names, "eager", None, timeout=120)
    for op in names:
        spec = kernelforge.ops.SPECS[op]
        labels = [label for label, _ in hostile.mutations(spec, hostile.base_call(spec, "eager"))]
        assert [r["label"] for r in per_op[op]] == labels
    crashes = [(r["label"], r["detail"]) for r in per_op["silu_and_mul"] if r["outcome"] == "crash"]
    assert crashes == [("x holding nan", f"signal {int(signal.SIGSEGV)}")]
    assert not [r for r in per_op["rms_norm"] if r["outcome"] == "crash"]
