"""kernelforge.dynamo_marks sets the mark torch's own decorator sets, and
importing kernelforge (ops and runtime) does not import Dynamo."""
import subprocess
import sys



from kernelforge import dynamo_marks


def test_constant_result_matches_torch():
    import torch._dynamo

    def ours():
        return 1

    def theirs():
        return 1

    dynamo_marks.constant_result(ours)
    torch._dynamo.assume_constant_result(theirs)
    marks = {k: v for k, v in vars(theirs).items()}
    assert marks == {dynamo_marks.MARK: True}, marks
    assert vars(ours) == marks


def test_import_and_a_graph_capture_do_not_load_dynamo():
    code = ("import sys, torch, kernelforge.ops, kernelforge.runtime\n"
            "from kernelforge import graph, ops\n"
            "x, w = torch.randn(2, 64), torch.ones(64)\n"
            "g = graph.capture(lambda: ops.rms_norm(x, w, 1e-6) * 2)\n"
            "assert torch.equal(g.replay(), ops.rms_norm(x, w, 1e-6) * 2)\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


def test_kernel_in_trace_error_is_dynamo_user_error():
    import torch._dynamo

    from kernelforge import lang
    assert issubclass(lang.KernelInTraceError, torch._dynamo.exc.UserError)
