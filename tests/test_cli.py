"""The kernelforge command."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernelforge import cli


def test_ops_lists_ops_and_backends(capsys):
    assert cli.main(["ops"]) == 0
    out = capsys.readouterr().out
    for word in ("eager", "inductor", "triton", "rms_norm", "fused_add_rms_norm",
                 "torch.ops.kernelforge.rms_norm", "(default)"):
        assert word in out


def test_show_generated_triton_points_at_kernel_source(capsys):
    assert cli.main(["show", "rms_norm", "--backend", "triton", "--hidden", "4097"]) == 0
    out = capsys.readouterr().out
    assert "@triton.jit" in out and "def launch(" in out
    assert "# rmsnorm.py:" in out and "kl.load(x[m, n])" in out
    assert "mask_n" in out            # 4097 is not a multiple of the block


@pytest.mark.parametrize("backend", ["inductor", "eager", "ir"])
def test_show_other_backends(capsys, backend):
    assert cli.main(["show", "fused_add_rms_norm", "--backend", backend, "--dtype", "f16"]) == 0
    out = capsys.readouterr().out
    assert ("kernel fused_add_rms_norm_fwd" in out) if backend == "ir" else \
        ("def fused_add_rms_norm_fwd(" in out and "torch.float16" in out)


def test_show_unknown_op(capsys):
    assert cli.main(["show", "nope"]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_demo_runs_every_backend(capsys):
    assert cli.main(["demo", "--rows", "4", "--hidden", "576"]) == 0
    out = capsys.readouterr().out
    for word in ("eager", "inductor", "triton", "bfloat16", "Generated Triton"):
        assert word in out
    assert " NO" not in out


def test_console_script_is_installed():
    exe = shutil.which("kernelforge")
    if exe is None:
        pytest.skip("package not installed with its console script")
    out = subprocess.run([exe, "ops"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "rms_norm" in out.stdout


def test_runtime_peers_script_refuses_bad_counts():
    """The runtime benchmark runs from the checkout (bench/runtime_peers.py, not a
    subcommand of the installed package) and checks its counts before loading anything."""
    root = Path(__file__).resolve().parent.parent
    for bad in (["--new-tokens", "0"], ["--repeats", "0"]):
        out = subprocess.run([sys.executable, str(root / "bench" / "runtime_peers.py"), *bad],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out
        assert "--new-tokens and --repeats must be >= 1" in out.stderr
    with pytest.raises(SystemExit):
        cli.main(["bench-runtime"])                                # gone from the package
    with pytest.raises(SystemExit):
        cli.main(["generate", "hi", "--quantization", "int3"])     # choices: int4
