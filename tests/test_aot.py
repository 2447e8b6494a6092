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


def test_every_attention_kernel_the_ops_launch_on_triton_is_checked(monkeypatch):
    """The kernels attention and paged_attention launch on the Triton
    backend (each round_p, softcap and split form; run here through the
    interpreter) are all in ops.KERNELS, so aot-check compiles what a GPU
    runs. (KERNELS once missed the round_p forms Triton launches by default.)"""
    pytest.importorskip("triton")
    import torch
    import kernelforge
    from kernelforge.kernels import attention as A
    from kernelforge.ops import KERNELS
    launched = set()
    real = A.launch

    def spy(kdef, *args, **kw):
        launched.add(kdef.name)
        return real(kdef, *args, **kw)

    monkeypatch.setattr(A, "launch", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 2, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 5], dtype=torch.int32)
    kc, vc = (torch.randn(2, 16, 2, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    tables, lens = torch.tensor([[1]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    for round_p in (None, False):
        for softcap in (None, 20.0):
            kernelforge.ops.attention(q, k, v, cu, cu, softcap=softcap, round_p=round_p,
                                      backend="triton")
            for splits in (1, 2):
                kernelforge.ops.paged_attention(q, kc, vc, tables, lens, cu, softcap=softcap,
                                                round_p=round_p, splits=splits,
                                                backend="triton")
    checked = {k.name for kdefs in KERNELS.values() for k in kdefs}
    assert len(launched) == 13, launched   # (softcap x round_p) x (packed, paged, split) + combine
    assert launched <= checked, sorted(launched - checked)


def test_aot_check_op_names_are_checked_and_take_comma_lists(capsys):
    """An unknown name was a ValueError traceback (max() of nothing); a comma
    list was taken as one unknown name."""
    assert cli.main(["aot-check", "--op", "no_such_op"]) == 2
    assert "unknown op(s) ['no_such_op']" in capsys.readouterr().err
    pytest.importorskip("triton")
    assert cli.main(["aot-check", "--targets", "sm_90", "--op", "rms_norm,silu_and_mul",
                     "--op", "gelu_tanh_and_mul"]) == 0
    out = capsys.readouterr().out
    assert "rms_norm [" in out and "silu_and_mul [" in out and "gelu_tanh_and_mul [" in out
