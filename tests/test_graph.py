"""kernelforge.graph: capture once, replay on new input contents.

Every replay is compared with a float64 formula on the inputs' new values
(not with the captured run), so a replay that reused stale values, skipped an
op or ran one twice fails. What a replay cannot repeat must be refused at
capture with CaptureError.
"""
import pytest
import torch

import kernelforge
from kernelforge import dispatch, graph
from kernelforge.tolerance import assert_close
import reference
from test_attention import cu, randn, scatter_to_pages

ops = kernelforge.ops
# the CPU backends with cheap builds (inductor's first compile is ~20 s; its
# launches are bound the same generic way as eager's)
CPU_BACKENDS = ("eager", "cpp")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_follows_new_input_values(backend, dtype):
    def norm_silu(x, r, w):
        h, s = ops.fused_add_rms_norm(x, r, w, 1e-6, backend=backend)
        return torch.nn.functional.silu(h) * s, s

    g = torch.Generator().manual_seed(0)
    x, r = randn((5, 96), dtype, g), randn((5, 96), dtype, g)
    w = torch.rand(96, generator=g).to(dtype)
    with torch.inference_mode():
        gr = graph.capture(norm_silu, x, r, w)
    assert (gr.launches, gr.torch_ops) == (1, 2)
    out, s = gr.output
    for i in range(3):
        x.copy_(randn((5, 96), dtype, g))
        r.copy_(randn((5, 96), dtype, g))
        got, got_s = gr.replay()
        assert got is out and got_s is s           # the captured tensors, rewritten
        normed, ref_s = reference.fused_add_rms_norm(x, r, w, 1e-6)
        ref = torch.nn.functional.silu(normed.to(dtype).double()) * ref_s.double()
        assert_close(got_s, ref_s, dtype, f"replay {i}: the sum")
        assert_close(got, ref, dtype, f"replay {i}: silu(norm) * sum")


def test_in_place_ops_replay_each_time():
    x = torch.zeros(4)
    inc = torch.ones(4)
    gr = graph.capture(lambda: x.add_(inc))
    for _ in range(3):
        gr.replay()
    assert x.tolist() == [4.0] * 4          # the capture run plus three replays


def test_views_and_allocations_are_not_replayed():
    x = torch.randn(6, 8)
    gr = graph.capture(lambda: (x.view(2, 3, 8)[:, 1] * 2).t().reshape(-1))
    assert (gr.launches, gr.torch_ops) == (0, 2)     # the mul and the copy reshaping a transpose
    assert gr.skipped >= 2
    x.copy_(torch.randn(6, 8))
    torch.testing.assert_close(gr.replay(), (x.view(2, 3, 8)[:, 1] * 2).t().reshape(-1))


def test_op_without_out_variant_is_copied():
    x = torch.randn(3, 4)
    gr = graph.capture(lambda: torch.ops.aten.linalg_vector_norm.default(x, 2.0, [1]))
    assert gr.torch_ops == 1
    x.copy_(torch.randn(3, 4))
    torch.testing.assert_close(gr.replay(), x.double().pow(2).sum(1).sqrt().float())


def test_decode_attention_replay_follows_lengths_and_tables():
    """A paged-attention step captured once, replayed as its sequences grow:
    the key ranges the plan derives are torch ops on the lengths, so they
    are recomputed by every replay (not frozen at capture)."""
    g = torch.Generator().manual_seed(3)
    hkv, group, D, bs = 2, 3, 64, 16
    lens_now = [5, 17, 30]
    k_lens_max = [n + 4 for n in lens_now]
    k = randn((sum(k_lens_max), hkv, D), torch.float32, g)
    v = randn((sum(k_lens_max), hkv, D), torch.float32, g)
    kc, vc, tables, _ = scatter_to_pages(k, v, k_lens_max, bs, g)
    q = torch.zeros(3, hkv * group, D)
    lens = torch.tensor(lens_now, dtype=torch.int32)
    qsl = torch.arange(4, dtype=torch.int32)

    def step():
        plan = ops.paged_attention_plan(tables, lens, qsl, check_tables=False)
        return ops.paged_attention(q, kc, vc, tables, lens, qsl, check_tables=False, plan=plan,
                                   backend="cpp")

    with torch.inference_mode():
        gr = graph.capture(step)
    starts = cu(k_lens_max).tolist()
    for extra in range(4):
        now = [n + extra for n in lens_now]
        lens.copy_(torch.tensor(now, dtype=torch.int32))
        q.copy_(randn(q.shape, torch.float32, g))
        out = gr.replay()
        for b, n in enumerate(now):
            ks = slice(starts[b], starts[b] + n)
            ref = reference.attention(q[b:b + 1], k[ks], v[ks], cu([1]), cu([n]), D ** -0.5)
            assert_close(out[b:b + 1], ref, torch.float32, f"row {b}, {n} keys")


def test_host_read_is_refused():
    x = torch.randn(4)
    with pytest.raises(graph.CaptureError, match="reads a tensor's value on the host"):
        graph.capture(lambda: x * float(x.sum().item()))
    assert dispatch._capture is None        # a failed capture leaves dispatch as it was


def test_data_dependent_shape_is_refused():
    x = torch.randn(8)
    with pytest.raises(graph.CaptureError, match="output shape of .* depends on tensor values"):
        graph.capture(lambda: x[x > 0] * 2)


def test_integer_index_is_allowed():
    x, idx = torch.randn(8, 3), torch.tensor([5, 0, 2])
    gr = graph.capture(lambda: x[idx] + 1)
    idx.copy_(torch.tensor([1, 1, 7]))
    torch.testing.assert_close(gr.replay(), x[torch.tensor([1, 1, 7])] + 1)


def test_captures_do_not_nest():
    x = torch.randn(4)

    def inner():
        return graph.capture(lambda: x * 2)
    with pytest.raises(graph.CaptureError, match="do not nest"):
        graph.capture(inner)
    assert dispatch._capture is None


@pytest.mark.slow
def test_inductor_launch_is_captured():
    """Inductor's compiled kernels run outside the recording mode (torch.compile
    refuses to trace under one): captured and replayed like the others."""
    x, w = torch.randn(3, 64), torch.rand(64)
    gr = graph.capture(lambda: ops.rms_norm(x, w, 1e-6, backend="inductor"))
    assert gr.launches == 1
    x.copy_(torch.randn(3, 64))
    assert_close(gr.replay(), reference.rms_norm(x, w, 1e-6), torch.float32, "replay")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_opaque_tensor_inputs_are_allowed():
    """A oneDNN-packed weight has no storage to compare: it is an input like any other."""
    w = torch.randn(32, 16)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
    x = torch.randn(4, 16)
    gr = graph.capture(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none",
                                                                  [], ""))
    x.copy_(torch.randn(4, 16))
    assert_close(gr.replay(), x.double() @ w.double().t(), torch.float32, "replay")
