"""The IR itself: printing, verifier errors that cite the author's line."""
import os

import pytest
import torch

import kernelforge.lang as kl
from kernelforge.ir.errors import KernelError
from kernelforge.kernels import rmsnorm

HERE = os.path.abspath(__file__)


def line_of(tag: str) -> int:
    with open(HERE) as f:
        for i, text in enumerate(f, 1):
            if text.rstrip().endswith(f"# {tag}") and "line_of(" not in text:
                return i
    raise LookupError(tag)


def expect_error(kdef, tag: str, *words, dtypes=None, sizes=None):
    with pytest.raises(KernelError) as e:
        kdef.specialize(dtypes or {}, sizes or {"N": 64})
    msg = str(e.value)
    assert f"{HERE}:{line_of(tag)}" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_print_shows_readable_ir():
    k = rmsnorm.rms_norm_fwd.specialize({"x": kl.bf16, "w": kl.f32, "out": kl.bf16}, {"N": 4096})
    text = str(k)
    first = text.splitlines()[0]
    assert first.startswith("kernel rms_norm_fwd(x: in bf16[M, N=4096], w: in f32[N=4096], "
                            "out: out bf16[M, N=4096], eps: f32, offset: f32)")
    assert "%m = parallel M block=1" in text
    assert "seq_for %n" in text and "carry(" in text and "yield" in text
    assert "reduce_sum" in text and "rsqrt" in text
    assert "store out[%m, %n" in text
    # every line names the kernel source line that produced it
    assert all("rmsnorm.py:" in line for line in text.splitlines()[1:])
    # and unspecialised printing works too (dtypes default to f32)
    assert "kernel fused_add_rms_norm_fwd(x: in f32[M, N]" in str(rmsnorm.fused_add_rms_norm_fwd)


def test_casts_are_explicit_dtype_mismatch_names_line():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        v = kl.load(x[m, n])
        kl.store(out[m, n], v + v.to(kl.f32))  # BAD-ADD
    expect_error(bad, "BAD-ADD", "add of bf16 and f32", ".to(",
                 dtypes={"x": kl.bf16, "out": kl.bf16})


def test_store_needs_the_output_dtype():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], kl.load(x[m, n]).to(kl.f32))  # BAD-STORE
    expect_error(bad, "BAD-STORE", "store of a f32 value into `out` (bf16)",
                 dtypes={"x": kl.bf16, "out": kl.bf16})


def test_value_escaping_its_loop():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), out: kl.Out("M")):
        m = kl.parallel("M")
        leaked = []
        kl.seq_for("N", lambda n: leaked.append(kl.sum(kl.load(x[m, n]), "N")))
        kl.store(out[m], leaked[0])  # BAD-ESCAPE
    expect_error(bad, "BAD-ESCAPE", "used outside that loop", "carried value")


def test_carried_value_must_keep_its_type():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), out: kl.Out("M")):
        m = kl.parallel("M")
        acc = kl.seq_for("N", lambda n, a: a + kl.load(x[m, n]),  # BAD-CARRY
                         init=kl.zeros(kl.f32, "M"))
        kl.store(out[m], acc)
    expect_error(bad, "BAD-CARRY", "carried value 0 starts as f32[M]", "returns f32[M, N]")


def test_reduce_over_an_axis_the_value_lacks():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), w: kl.In("N"), out: kl.Out("M")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m], kl.sum(kl.load(w[n]), "M"))  # BAD-REDUCE
    expect_error(bad, "BAD-REDUCE", "over axis `M`", "only varies along ['N']")


def test_store_into_an_input():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], kl.load(x[m, n]))
        kl.store(x[m, n], kl.load(x[m, n]))  # BAD-INPUT
    expect_error(bad, "BAD-INPUT", "declared kl.In")


def test_wrong_number_of_indices_and_unknown_axis():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m = kl.parallel("M")
        kl.store(out[m, kl.tile("N")], kl.load(x[m]))  # BAD-INDEX
    expect_error(bad, "BAD-INDEX", "tensor `x` has 2 dims")

    @kl.kernel(static=("N",))
    def bad2(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        kl.parallel("Q")  # BAD-AXIS
    expect_error(bad2, "BAD-AXIS", "unknown axis `Q`", "['M', 'N']")


def test_whole_axis_tile_needs_a_static_size():
    @kl.kernel()
    def bad(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m = kl.parallel("M")
        n = kl.tile("N")  # BAD-TILE
        kl.store(out[m, n], kl.load(x[m, n]))
    expect_error(bad, "BAD-TILE", "needs a static extent", "seq_for")


def test_python_control_flow_on_values_is_refused():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        v = kl.load(x[m, n])
        if v > 0:  # BAD-IF
            pass
    msg = expect_error(bad, "BAD-IF", "kl.where(cond, a, b)", "`if`")
    assert "kl.maximum" not in msg


def test_builtin_max_min_on_values_suggest_maximum_minimum():
    @kl.kernel(static=("N",))
    def relu(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], max(kl.load(x[m, n]), 0.0))  # BAD-MAX
    msg = expect_error(relu, "BAD-MAX", "kl.maximum(a, b)", "max()")
    assert "kl.where" not in msg

    @kl.kernel(static=("N",))
    def clip(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], min(1.0, kl.load(x[m, n])))  # BAD-MIN
    expect_error(clip, "BAD-MIN", "kl.minimum(a, b)")

    @kl.kernel(static=("N",))
    def both(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        v = kl.load(x[m, n])
        kl.store(out[m, n], kl.where((v > 0.0) and (v < 1.0), v, 0.0))  # BAD-AND
    msg = expect_error(both, "BAD-AND", "`and`", "`&`")
    assert "kl.maximum" not in msg


def test_output_never_stored_and_float_only_ops():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), out: kl.Out("M", "N")):  # BAD-NOSTORE
        kl.parallel("M")
    expect_error(bad, "BAD-NOSTORE", "output `out` is never stored")

    @kl.kernel(static=("N",))
    def bad2(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], kl.exp(kl.load(x[m, n])))  # BAD-EXP
    expect_error(bad2, "BAD-EXP", "exp needs a float operand, got i32",
                 dtypes={"x": kl.i32, "out": kl.i32})


def test_low_precision_sum_is_refused():
    @kl.kernel(static=("N",))
    def bad(x: kl.In("M", "N"), out: kl.Out("M")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m], kl.sum(kl.load(x[m, n]), "N"))  # BAD-SUM
    expect_error(bad, "BAD-SUM", "sum in bf16 loses precision", dtypes={"x": kl.bf16,
                                                                        "out": kl.bf16})


def test_missing_annotation():
    with pytest.raises(KernelError, match="needs an annotation"):
        @kl.kernel
        def bad(x, out: kl.Out("M")):
            pass


def test_same_expression_is_shared():
    """Hash-consing: writing the same expression twice yields one node."""
    k = rmsnorm.rms_norm_fwd.specialize({}, {"N": 8})
    text = str(k)
    assert text.count("rsqrt") == 1


def test_generated_source_is_deterministic():
    """Same kernel, same specialisation: the same text, whatever was traced
    before (the disk cache and torch.compile's caches are keyed by it)."""
    from kernelforge.lower import torch_printer, triton_printer
    spec = ({"x": kl.bf16, "w": kl.bf16, "out": kl.bf16}, {"N": 4097})
    a = rmsnorm.rms_norm_fwd.specialize(*spec)
    rmsnorm.fused_add_rms_norm_fwd.specialize({}, {"N": 12})    # trace something else between
    b = kl.KernelDef(rmsnorm.rms_norm_fwd.fn, ("N",)).specialize(*spec)
    assert a is not b
    assert triton_printer.print_module(a) == triton_printer.print_module(b)
    assert torch_printer.print_module(a) == torch_printer.print_module(b)
    assert str(a) == str(b)


def test_seq_for_results_must_not_depend_on_chunking():
    @kl.kernel(static=("N",))
    def counts_chunks(x: kl.In("M", "N"), out: kl.Out("M")):
        m = kl.parallel("M")
        c = kl.seq_for("N", lambda n, c: c + 1.0, init=kl.zeros(kl.f32, "M"))  # BAD-COUNT
        kl.store(out[m], c)
    expect_error(counts_chunks, "BAD-COUNT", "without depending on the loop's tile")

    @kl.kernel(static=("N",))
    def sorts_chunks(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m = kl.parallel("M")
        kl.seq_for("N", lambda n: kl.store(out[m, n], kl.sort(kl.load(x[m, n]), "N")))  # BAD-SORT
    expect_error(sorts_chunks, "BAD-SORT", "one chunk at a time", "kl.tile()")


def test_more_verifier_rules():
    @kl.kernel(static=("D",))
    def rowwise_dot(a: kl.In("M", "D"), b: kl.In("M", "D"), out: kl.Out("M")):
        m, d = kl.parallel("M", block=16), kl.tile("D")
        kl.store(out[m], kl.dot(kl.load(a[m, d]), kl.load(b[m, d]), "D"))  # BAD-DOT
    expect_error(rowwise_dot, "BAD-DOT", "both vary along ['M']", "kl.sum(a * b, 'D')",
                 sizes={"D": 16})

    @kl.kernel(static=("N",))
    def bool_sum(x: kl.In("M", "N"), out: kl.Out("M")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m], kl.sum(kl.load(x[m, n]) > 0.0, "N"))  # BAD-BOOLSUM
    expect_error(bool_sum, "BAD-BOOLSUM", "sum of bool values")

    @kl.kernel(static=("N",))
    def bitcast_literal(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], kl.load(x[m, n]) + kl.size("N").bitcast(kl.i32))  # BAD-BITCAST
    expect_error(bitcast_literal, "BAD-BITCAST", "bitcast() of a literal",
                 dtypes={"x": kl.i32, "out": kl.i32})
    with pytest.raises(KernelError, match="unknown tensor|not tensor parameters"):
        rmsnorm.rms_norm_fwd.specialize({"X": kl.bf16}, {"N": 8})


def test_loads_stay_where_they_are_written():
    """A loop-invariant load inside a loop is not hoisted above the loop's stores."""
    @kl.kernel(static=("N",))
    def k(x: kl.In("M", "N"), buf: kl.Out("M", "N")):
        m = kl.parallel("M")

        def body(n):
            kl.store(buf[m, n], kl.load(x[m, n]))
            kl.store(buf[m, n], kl.load(x[m, 0]) + kl.load(x[m, n]))
        kl.seq_for("N", body)
    text = str(k.specialize({}, {"N": 8}))
    loop_line = next(i for i, line in enumerate(text.splitlines()) if "seq_for" in line)
    first_load = next(i for i, line in enumerate(text.splitlines()) if "load x[%m, 0]" in line)
    assert first_load > loop_line


def test_hash_consing_shares_repeated_expressions():
    @kl.kernel(static=("N",))
    def twice(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        v = kl.load(x[m, n])
        a = kl.exp(v * 2.0)
        b = kl.exp(v * 2.0)          # the same expression, written again
        kl.store(out[m, n], a + b)
    text = str(twice.specialize({}, {"N": 8}))
    assert text.count("= exp ") == 1 and text.count("= mul ") == 1


def test_kernels_in_modules_with_postponed_annotations(tmp_path, monkeypatch):
    (tmp_path / "future_kernel.py").write_text(
        "from __future__ import annotations\n"
        "import kernelforge.lang as kl\n\n"
        "@kl.kernel(static=('N',))\n"
        "def double(x: kl.In('M', 'N'), out: kl.Out('M', 'N')):\n"
        "    m, n = kl.parallel('M'), kl.tile('N')\n"
        "    kl.store(out[m, n], kl.load(x[m, n]) * 2.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import future_kernel
    assert "kernel double(x: in f32[M, N=8]" in str(future_kernel.double.specialize({}, {"N": 8}))


def test_bounds_and_store_masks_are_verified():
    @kl.kernel()
    def float_bound(x: kl.In("M", "N"), out: kl.Out("M")):
        m = kl.parallel("M")
        (s,) = kl.seq_for("N", lambda n, a: a + kl.sum(kl.load(x[m, n]), "N"),
                          init=(kl.zeros(kl.f32, "M"),), stop=kl.load(x[m, 0]))  # BAD-BOUND
        kl.store(out[m], s)
    expect_error(float_bound, "BAD-BOUND", "bounds must be signed integers, got f32")

    @kl.kernel(static=("N",))
    def bad_mask(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], kl.load(x[m, n]), mask=kl.load(x[m, n]))  # BAD-MASK
    expect_error(bad_mask, "BAD-MASK", "store mask must be bool")
    text = str(__import__("ir_kernels").scatter_rows.specialize({"slot": kl.i64}, {"D": 8}))
    assert "store table[" in text and " if %" in text


def _build_and_run(x):
    @kl.kernel(static=("N",))
    def doubled(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], kl.load(x[m, n]) * 2.0)
    import kernelforge
    out = torch.empty_like(x)
    kernelforge.launch(doubled, x, out, backend="eager")
    return out + 1.0


def test_building_a_kernel_inside_a_fullgraph_trace_says_what_to_do():
    """Dynamo cannot trace kernel construction (inspect): under fullgraph the
    caller gets a KernelError naming the fix, not a Dynamo error blaming
    PyTorch; without fullgraph it graph-breaks and builds the kernel eagerly."""
    torch._dynamo.reset()
    x = torch.randn(2, 8)
    with pytest.raises(KernelError, match=r"kernel `doubled` is built inside a "
                                          r"torch.compile\(fullgraph=True\) trace.*kernel_factory"):
        torch.compile(_build_and_run, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(_build_and_run, backend="eager")(x), x * 2.0 + 1.0)
