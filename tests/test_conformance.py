"""The conformance kit (kernelforge/conformance.py) and the checks it shares
with the tests (kernelforge/testing.py) fail where a backend is wrong: wrong
values, a write outside an output, a recompile per row count, a missing
check; and `kernelforge conformance` / `new-op` work from the command line."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import kernelforge
from kernelforge import conformance, testing
from kernelforge.backends import registry
from kernelforge.backends.eager import EagerBackend
from kernelforge.spec import Call

RMS = kernelforge.ops.SPECS["rms_norm"]


class _Skewed(EagerBackend):
    """Eager, but every output off by 1e-3: a lowering with a wrong constant."""
    name = "skewed"

    def default_priority(self, device):
        return None, "test only"

    def build(self, kernel, device):
        run = super().build(kernel, device)
        outs = [i for i, p in enumerate(kernel.params) if p.kind == "out"]

        def call(*args):
            run(*args)
            for i in outs:
                args[i].add_(1e-3)
        return call


class _Spills(EagerBackend):
    """Eager, then one element written just past each output's last one."""
    name = "spills"

    def default_priority(self, device):
        return None, "test only"

    def build(self, kernel, device):
        run = super().build(kernel, device)
        outs = [i for i, p in enumerate(kernel.params) if p.kind == "out"]

        def call(*args):
            run(*args)
            for i in outs:
                t = args[i]
                last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
                torch.as_strided(t, (1,), (1,), last + 1).fill_(7.0)
        return call


class _Recompiles(EagerBackend):
    """Eager under torch.compile with static shapes: a new row count recompiles."""
    name = "recompiles"

    def default_priority(self, device):
        return None, "test only"

    def build(self, kernel, device):
        return torch.compile(super().build(kernel, device), backend="eager", dynamic=False)


@pytest.fixture
def plugins():
    added = [_Skewed(), _Spills(), _Recompiles()]
    for b in added:
        registry.register(b)
    yield
    for b in added:
        registry.backends().pop(b.name)
    registry.reset()


def _call(rows=3, n=64):
    return Call(dict(x=torch.randn(rows, n), weight=torch.randn(n), eps=1e-6), f"{rows}x{n}")


def test_wrong_values_fail_the_property_check(plugins):
    testing.check_reference(RMS, _call(), "eager")
    with pytest.raises(AssertionError, match=r"rms_norm\[skewed\].*exceeds"):
        testing.check_reference(RMS, _call(), "skewed")
    report = conformance.run("skewed", "cpu", ["rms_norm"], examples=3)
    assert report["level"] == 0
    assert "FAIL" in conformance.table(report) and "not conformant" in conformance.table(report)


def test_a_write_past_an_output_fails_the_bounds_check(plugins):
    testing.check_poison(RMS, _call(), "eager")
    with pytest.raises(AssertionError, match="a write landed outside `out`"):
        testing.check_poison(RMS, _call(), "spills")


def test_a_recompile_per_row_count_fails_the_compile_check(plugins):
    testing.check_compile_count(RMS, lambda r: RMS.resize(_call(), r), "eager")
    with pytest.raises(AssertionError, match="a new number of rows compiled again"):
        testing.check_compile_count(RMS, lambda r: RMS.resize(_call(), r), "recompiles")


def test_a_missing_check_fails_the_bad_input_check(monkeypatch):
    cases = testing.bad_cases(RMS, _call())
    labels = [c[0] for c in cases]
    assert "weight of the wrong size" in labels and "an unknown backend" in labels
    label, bad, words = next(c for c in cases if c[0] == "eps=0.0")
    testing.check_bad(RMS, label, bad, words, "eager")
    eps = next(x for x in RMS.args if x.name == "eps")
    monkeypatch.setattr(eps, "positive", False)         # the op forgets eps > 0
    with pytest.raises(AssertionError, match="eps=0.0: accepted"):
        testing.check_bad(RMS, label, bad, words, "eager")


def test_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "kernelforge.cli", "conformance", "--backend",
                          "eager", "--ops", "silu_and_mul", "--examples", "3", "--json",
                          str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "silu_and_mul" in res.stdout and "verdict: L1" in res.stdout
    report = json.loads(out.read_text())
    assert report["level"] == 1 and report["ops"][0]["op"] == "silu_and_mul"
    assert {c["name"] for c in report["ops"][0]["checks"]} == {"property", "bad input",
                                                               "compiles", "bounds"}
    bad = subprocess.run([sys.executable, "-m", "kernelforge.cli", "conformance", "--backend",
                          "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "`backend` expected one of" in bad.stdout


def test_new_op_writes_a_working_op(tmp_path):
    (tmp_path / "kernelforge" / "kernels").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    from kernelforge.new_op import main
    assert main("kit_probe_copy", str(tmp_path)) == 0
    assert main("kit_probe_copy", str(tmp_path)) == 2          # never overwrites
    assert main("not an identifier", str(tmp_path)) == 2
    assert main("rms_norm", str(tmp_path)) == 2                 # exists already
    path = tmp_path / "kernelforge" / "kernels" / "kit_probe_copy.py"
    spec_ = importlib.util.spec_from_file_location("kit_probe_copy", path)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    spec = mod.SPECS[0]
    x = torch.randn(3, 7)
    testing.check_reference(spec, Call(dict(x=x)), "eager")
    assert torch.equal(mod.kit_probe_copy(x), x)
    assert (tmp_path / "tests" / "test_kit_probe_copy.py").read_text().count("def test_") == 1
