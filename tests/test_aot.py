"""Every registered kernel compiles ahead of time for NVIDIA sm_80 and sm_90
and AMD gfx942 (no GPU needed)."""
import pytest

from kernelforge import aot, cli


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton", reason="triton is not installed: nothing to compile with")
    return aot.check()


def test_every_kernel_compiles_for_every_target(results):
    from kernelforge.ops import KERNELS
    kernels = {k.name for kdefs in KERNELS.values() for k in kdefs}
    assert {r.kernel for r in results} == kernels
    assert {r.target for r in results} == {"sm_80", "sm_90", "gfx942"}
    bad = [(r.kernel, r.spec, r.target, r.detail) for r in results if not r.ok]
    assert not bad
    for r in results:
        assert r.detail.startswith("hsaco" if r.target == "gfx942" else "cubin")


def test_aot_check_command_prints_a_table(capsys):
    pytest.importorskip("triton")
    assert cli.main(["aot-check", "--targets", "sm_90,gfx942", "--op", "rms_norm"]) == 0
    out = capsys.readouterr().out
    assert "sm_90" in out and "gfx942" in out and "rms_norm [bf16 N=16384]" in out
    assert "compiled" in out and "FAIL" not in out


def test_aot_check_rejects_unknown_target(capsys):
    assert cli.main(["aot-check", "--targets", "sm_75x"]) == 2
    assert "unknown target" in capsys.readouterr().err
