"""The example out-of-tree device, examples/kernelforge-hostdev: a torch
device registered through PrivateUse1 ("hostdev", memory on the host, a
boxed fallback running other aten ops on the CPU kernels), and its
KernelForge backend (hostdev_cpp, announced through the entry point).

Importing kf_hostdev renames PrivateUse1 and registers kernels for the whole
process, which the other tests of a pytest worker must not inherit: every
check below runs in one child process (this file run as a script, under
``-X faulthandler`` so a crash shows its stack instead of a bare failure),
which reports each check's outcome; the tests read those outcomes. Every
check compares with an independent reference: the same torch op on CPU
tensors holding the same values, or a float64 formula.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback

import pytest

from child_checks import fail_on_failed, run_child_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "HOSTDEV-CHECKS "
CHILD_TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("kf_hostdev") is None,
    reason="the example device kf_hostdev is not installed (make install installs it: "
           "pip install --no-deps --no-build-isolation ./examples/kernelforge-hostdev)")

# -- the checks (run in the child process) ---------------------------------------------

CHECKS: dict = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env.pop("KERNELFORGE_BACKEND", None)
    return env


def _same(dev, ref, what="", exact=True):
    """``dev`` (a hostdev tensor) holds ``ref`` (a CPU tensor): same shape,
    dtype and values (bit for bit where ``exact``: the same CPU kernel ran on
    the same bytes)."""
    import torch
    assert isinstance(dev, torch.Tensor), f"{what}: {type(dev)}"
    assert dev.device.type == "hostdev", f"{what}: on {dev.device}"
    got = dev.cpu()
    assert got.dtype == ref.dtype and got.shape == ref.shape, \
        f"{what}: {got.dtype} {list(got.shape)}, expected {ref.dtype} {list(ref.shape)}"
    if exact:
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True, msg=what)
    else:
        torch.testing.assert_close(got, ref, msg=what)


def _data(*shape, seed=0, dtype=None):
    import torch
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g)
    return t if dtype is None else t.to(dtype)


def entry_point_loads_without_the_device():
    """Run before kf_hostdev is imported: the registry finds hostdev_cpp
    through the kernelforge.backends entry point, and loading it neither
    imports the device nor touches PrivateUse1."""
    import torch
    from kernelforge.backends import registry
    bs = registry.backends()
    assert "hostdev_cpp" in bs, sorted(bs)
    assert registry.origin["hostdev_cpp"] == "kernelforge-hostdev", registry.origin
    assert "kf_hostdev" not in sys.modules, "loading the backend imported the device"
    assert torch._C._get_privateuse1_backend_name() == "privateuseone"
    assert bs["hostdev_cpp"].default_priority(torch.device("cpu"))[0] is None


@check
def device_module():
    import torch
    import kf_hostdev
    assert kf_hostdev.NAME == "hostdev" and torch.hostdev is sys.modules["kf_hostdev.hostdev"]
    assert torch.hostdev.is_available() and torch.hostdev.device_count() == 1
    assert torch.hostdev.current_device() == 0
    torch.hostdev.set_device(0)
    torch.hostdev.synchronize()
    torch.hostdev.synchronize("hostdev:0")
    for bad in (1, "hostdev:1", "cpu"):
        try:
            torch.hostdev.set_device(bad)
        except ValueError as e:
            assert "hostdev" in str(e), e
        else:
            raise AssertionError(f"set_device({bad!r}) accepted")
    x = torch.ones(2, device="hostdev")
    assert x.is_hostdev and not x.is_cpu and x.device == torch.device("hostdev", 0)
    assert not torch.ones(2).is_hostdev
    assert x.untyped_storage().device.type == "hostdev"
    assert torch.accelerator.current_accelerator().type == "hostdev"
    stream, event = torch.Stream("hostdev"), torch.Event("hostdev")
    event.record(stream)                 # one synchronous stream: done when recorded
    assert stream.query() and event.query()
    event.synchronize()
    torch.accelerator.synchronize()


@check
def allocation():
    import torch
    base = torch.hostdev.memory_allocated()
    x = torch.empty(1000, device="hostdev")
    assert x.data_ptr() % 64 == 0
    assert torch.hostdev.memory_allocated() - base >= 4000
    del x
    assert torch.hostdev.memory_allocated() == base
    _same(torch.zeros(2, 3, device="hostdev"), torch.zeros(2, 3), "zeros")
    _same(torch.ones(2, 3, dtype=torch.bfloat16, device="hostdev"),
          torch.ones(2, 3, dtype=torch.bfloat16), "ones bf16")
    _same(torch.full((3,), 7, device="hostdev"), torch.full((3,), 7), "full")
    _same(torch.arange(7, device="hostdev"), torch.arange(7), "arange")
    _same(torch.arange(0, 1, 0.125, device="hostdev"), torch.arange(0, 1, 0.125), "arange f")
    _same(torch.empty_strided((2, 3), (1, 2), device="hostdev").fill_(1),
          torch.ones(2, 3), "empty_strided")
    assert torch.empty_strided((2, 3), (1, 2), device="hostdev").stride() == (1, 2)
    _same(torch.empty(0, device="hostdev"), torch.empty(0), "empty 0")
    _same(torch.tensor([[1, 2], [3, 4]], device="hostdev"), torch.tensor([[1, 2], [3, 4]]),
          "torch.tensor")
    s = torch.UntypedStorage(16, device="hostdev")
    assert s.device.type == "hostdev" and s.nbytes() == 16
    for bad, words in ((lambda: torch.empty(2, device="hostdev:1"), "index 0"),
                       (lambda: torch.empty(2, device="hostdev", pin_memory=True), "pin_memory")):
        try:
            bad()
        except (RuntimeError, ValueError) as e:
            assert words in str(e), e
        else:
            raise AssertionError(f"accepted; expected an error saying {words!r}")


@check
def copies_both_ways():
    import torch
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32,
               torch.int64, torch.int8, torch.uint8, torch.bool):
        c = (_data(5, 7, seed=1) * 50).to(dt)
        d = c.to("hostdev")
        assert d.device.type == "hostdev" and d.dtype == dt
        _same(d, c, f"cpu -> hostdev {dt}")
        back = d.cpu()
        assert back.device.type == "cpu" and torch.equal(back, c)
        assert back.data_ptr() != d.data_ptr()          # .cpu() is a copy
        _same(d.to(torch.float32), c.to(torch.float32), f"{dt} -> float32 on device")
        _same(d.clone(), c, f"clone {dt}")
    c = _data(6, 4, seed=2)
    _same(c.t().to("hostdev"), c.t().contiguous(), "non-contiguous source")
    d = torch.empty(4, 6, device="hostdev")
    d.copy_(c.t())
    _same(d, c.t().contiguous(), "copy_ from a transposed cpu tensor")
    e = torch.empty(4, 6, dtype=torch.bfloat16, device="hostdev")
    e.copy_(d)
    _same(e, c.t().to(torch.bfloat16), "copy_ with conversion")
    b = torch.empty(3, 4, device="hostdev")
    b.copy_(torch.arange(4.))                            # broadcast
    _same(b, torch.arange(4.).expand(3, 4).contiguous(), "broadcast copy_")
    into = torch.zeros(4, 6)
    into.copy_(d)                                        # hostdev -> existing cpu tensor
    assert torch.equal(into, c.t())


@check
def views_share_memory():
    import torch
    c = _data(6, 8, seed=3)
    d = c.to("hostdev")
    es = d.element_size()
    v = d[2:4, 1:5]
    assert v.data_ptr() == d.data_ptr() + (2 * 8 + 1) * es
    assert v.untyped_storage().data_ptr() == d.untyped_storage().data_ptr()
    for name, view, ref in (("transpose", d.t(), c.t()), ("slice", d[1::2, ::3], c[1::2, ::3]),
                            ("expand", d[:1].expand(4, 8), c[:1].expand(4, 8)),
                            ("view", d.view(12, 4), c.view(12, 4)),
                            ("reshape", d.reshape(2, 24), c.reshape(2, 24)),
                            ("unfold", d[0].unfold(0, 3, 2), c[0].unfold(0, 3, 2)),
                            ("diagonal", d.diagonal(), c.diagonal()),
                            ("select", d[3], c[3]), ("narrow", d.narrow(1, 2, 3), c.narrow(1, 2, 3)),
                            ("unsqueeze", d[None], c[None]),
                            ("as_strided", d.as_strided((3, 3), (8, 1), 2),
                             c.as_strided((3, 3), (8, 1), 2))):
        assert view.untyped_storage().data_ptr() == d.untyped_storage().data_ptr(), name
        assert view.stride() == ref.stride() and view.storage_offset() == ref.storage_offset(), \
            name
        _same(view, ref, name)
        _same(view + 1, ref + 1, f"{name} + 1")
        _same(view.contiguous(), ref.contiguous(), f"{name}.contiguous()")
    v.mul_(10)
    c[2:4, 1:5].mul_(10)
    _same(d, c, "an in-place op on a view writes the base")
    d.t()[0].zero_()
    c.t()[0].zero_()
    _same(d, c, "in-place through a transposed view")


@check
def inplace_ops():
    import torch
    c = _data(5, 8, seed=4)
    d = c.to("hostdev")
    ptr = d.data_ptr()
    steps = [lambda t: t.add_(1.5), lambda t: t.mul_(t), lambda t: t.clamp_(-1, 2),
             lambda t: t.masked_fill_(t > 1, -3.0), lambda t: t.sub_(t[0].clone()),
             lambda t: t.index_fill_(0, torch.tensor([1, 3], device=t.device), 0.25),
             lambda t: t.scatter_(1, torch.tensor([[0], [7], [2], [2], [5]], device=t.device),
                                  9.0),
             lambda t: t.__setitem__((slice(None), 2), 4.0),
             lambda t: t.index_put_((torch.tensor([0, 4], device=t.device),),
                                    torch.tensor(2.5)),
             lambda t: t.exp_(), lambda t: t.fill_(1).add_(torch.arange(8., device=t.device))]
    for i, step in enumerate(steps):
        r = step(d)
        step(c)
        assert r is None or r is d, f"step {i} returned another tensor"
        _same(d, c, f"in-place step {i}")
    assert d.data_ptr() == ptr
    x = torch.zeros(3, device="hostdev")
    y = x.add_(1)
    assert y is x and x._version > 0
    # the CPU kernel sees the device tensors' aliasing: a partial overlap of
    # input and output is refused as on the CPU, not computed from a copy
    for t in (c, d):
        try:
            t.sub_(t[0])
        except RuntimeError as e:
            assert "single memory location" in str(e), e
        else:
            raise AssertionError(f"an overlapping in-place op accepted on {t.device}")


@check
def out_with_resize():
    import warnings
    import torch
    a = _data(5, 8, seed=5)
    d = a.to("hostdev")
    o = torch.empty(0, device="hostdev")
    r = torch.add(d, 1, out=o)
    assert r is o
    _same(o, a + 1, "out= resized from empty")
    ptr = o.data_ptr()
    torch.mul(d, 2, out=o)
    assert o.data_ptr() == ptr                          # the right size: written in place
    _same(o, a * 2, "out= of the right shape")
    small = torch.empty(3, device="hostdev")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.sub(d, 1, out=small)                      # grown by the CPU kernel
    _same(small, a - 1, "out= grown")
    big = torch.zeros(20, device="hostdev")
    ref = torch.zeros(20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.add(torch.ones(6, device="hostdev"), 1, out=big[2:4])
        torch.add(torch.ones(6), 1, out=ref[2:4])
    _same(big, ref, "a view out= grown inside its storage")
    v, i = torch.empty(0, device="hostdev"), torch.empty(0, dtype=torch.long, device="hostdev")
    res = torch.max(d, 1, out=(v, i))
    assert res[0] is v and res[1] is i
    _same(v, a.max(1).values, "max out values")
    _same(i, a.max(1).indices, "max out indices")
    mm_out = torch.empty(0, device="hostdev")
    torch.mm(d, d.t(), out=mm_out)
    _same(mm_out, a @ a.t(), "mm out", exact=False)
    cat_out = torch.empty(0, dtype=torch.bfloat16, device="hostdev")
    torch.cat([d.bfloat16(), d.bfloat16()], out=cat_out)
    _same(cat_out, torch.cat([a.bfloat16(), a.bfloat16()]), "cat out")


@check
def dtypes():
    import torch
    a = _data(4, 6, seed=6) * 20
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64):
        c, d = a.to(dt), a.to(dt).to("hostdev")
        _same(d + d, c + c, f"{dt} add")
        _same(d * 3, c * 3, f"{dt} mul")
        _same(d.sum(-1), c.sum(-1), f"{dt} sum")
        _same(d.max(), c.max(), f"{dt} max")
        _same(d > 0, c > 0, f"{dt} compare")
        if dt.is_floating_point:
            _same(torch.softmax(d, -1), torch.softmax(c, -1), f"{dt} softmax")
            _same(d @ d.t(), c @ c.t(), f"{dt} matmul", exact=False)
        else:
            _same(d // 3, c // 3, f"{dt} floor div")
            _same(d & 6, c & 6, f"{dt} bitwise and")
    b = a > 0
    db = b.to("hostdev")
    _same(db & ~db.roll(1, 0), b & ~b.roll(1, 0), "bool")
    _same(db.sum(), b.sum(), "bool sum")
    assert db.any().item() is True and isinstance(db.all().item(), bool)


@check
def fallback_ops_equal_cpu():
    """The aten ops the runtime leans on, each against the same op on the CPU."""
    import torch
    import torch.nn.functional as F
    a, b = _data(5, 8, seed=7), _data(8, 3, seed=8)
    da, db = a.to("hostdev"), b.to("hostdev")
    w, bias = _data(6, 8, seed=9), _data(6, seed=10)
    emb = _data(10, 4, seed=11)
    idx = torch.tensor([[1, 2], [9, 0]])
    gi = torch.tensor([[0, 7], [1, 1], [5, 2], [3, 3], [6, 0]])
    H = lambda t: t.to("hostdev")                       # noqa: E731
    cases = [
        ("embedding", F.embedding(H(idx), H(emb)), F.embedding(idx, emb)),
        ("linear", F.linear(da, H(w), H(bias)), F.linear(a, w, bias), False),
        ("matmul", da @ db, a @ b, False),
        ("mm", torch.mm(da, db), torch.mm(a, b), False),
        ("addmm", torch.addmm(H(bias[:3]), da, db), torch.addmm(bias[:3], a, b), False),
        ("bmm", torch.bmm(da[None], db[None]), torch.bmm(a[None], b[None]), False),
        ("linear bf16", F.linear(da.bfloat16(), H(w).bfloat16()),
         F.linear(a.bfloat16(), w.bfloat16()), False),
        ("index_select", da.index_select(0, H(torch.tensor([4, 0, 4]))),
         a.index_select(0, torch.tensor([4, 0, 4]))),
        ("index device ids", da[H(torch.tensor([3, 1]))], a[torch.tensor([3, 1])]),
        ("index cpu ids", da[torch.tensor([3, 1])], a[torch.tensor([3, 1])]),
        ("index mask", da[da > 0], a[a > 0]),
        ("index 2d", da[H(torch.tensor([0, 4])), H(torch.tensor([7, 1]))],
         a[torch.tensor([0, 4]), torch.tensor([7, 1])]),
        ("cat", torch.cat([da, da * 2], 1), torch.cat([a, a * 2], 1)),
        ("stack", torch.stack([da, da]), torch.stack([a, a])),
        ("softmax", torch.softmax(da, -1), torch.softmax(a, -1)),
        ("log_softmax", F.log_softmax(da, -1), F.log_softmax(a, -1)),
        ("topk values", torch.topk(da, 3).values, torch.topk(a, 3).values),
        ("topk indices", torch.topk(da, 3).indices, torch.topk(a, 3).indices),
        ("argmax", da.argmax(-1), a.argmax(-1)),
        ("cumsum", da.cumsum(0), a.cumsum(0)),
        ("masked_fill", da.masked_fill(da > 0, 0.5), a.masked_fill(a > 0, 0.5)),
        ("where", torch.where(da > 0, da, -da), torch.where(a > 0, a, -a)),
        ("where scalar", torch.where(da > 0, da, 0.0), torch.where(a > 0, a, 0.0)),
        ("gather", da.gather(1, H(gi)), a.gather(1, gi)),
        ("scatter", torch.zeros(5, 8, device="hostdev").scatter(1, H(gi), 1.0),
         torch.zeros(5, 8).scatter(1, gi, 1.0)),
        ("scatter_add", torch.zeros(5, 8, device="hostdev").scatter_add(1, H(gi), da[:, :2]),
         torch.zeros(5, 8).scatter_add(1, gi, a[:, :2])),
        (".float()", da.bfloat16().float(), a.bfloat16().float()),
        (".to(float16)", da.to(torch.float16), a.to(torch.float16)),
        (".long()", (da * 10).long(), (a * 10).long()),
        ("sort", torch.sort(da, -1).values, torch.sort(a, -1).values),
        ("unique", torch.unique((da * 2).round()), torch.unique((a * 2).round())),
        ("nonzero", torch.nonzero(da > 0), torch.nonzero(a > 0)),
        ("layer_norm", F.layer_norm(da, (8,)), F.layer_norm(a, (8,)), False),
        ("silu", F.silu(da), F.silu(a)), ("gelu", F.gelu(da, approximate="tanh"),
                                           F.gelu(a, approximate="tanh")),
        ("sdpa", F.scaled_dot_product_attention(da[None, None], da[None, None], da[None, None],
                                                is_causal=True),
         F.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None],
                                        is_causal=True), False),
        ("mean/var", torch.stack([da.mean(-1), da.var(-1)]), torch.stack([a.mean(-1), a.var(-1)])),
        ("tril", torch.tril(da), torch.tril(a)),
        ("tril_indices", torch.tril_indices(3, 3, device="hostdev"), torch.tril_indices(3, 3)),
        ("repeat_interleave", da.repeat_interleave(2, 0), a.repeat_interleave(2, 0)),
        ("flip/roll", da.flip(0).roll(1, 1), a.flip(0).roll(1, 1)),
        ("pad", F.pad(da, (1, 2)), F.pad(a, (1, 2))),
        ("zeros_like/new_*", torch.zeros_like(da) + da.new_ones(8) + da.new_full((8,), 2.0),
         torch.zeros_like(a) + a.new_ones(8) + a.new_full((8,), 2.0)),
        ("complex view", torch.view_as_real(torch.complex(da, -da)) + 0,
         torch.view_as_real(torch.complex(a, -a)) + 0),
    ]
    for case in cases:
        name, dev, ref = case[:3]
        _same(dev, ref, name, exact=case[3] if len(case) > 3 else True)
    assert da[0].tolist() == a[0].tolist()
    assert da[1, 2].item() == a[1, 2].item()
    assert da.bfloat16()[1, 2].item() == a.bfloat16()[1, 2].item()
    assert (da > 0).sum().item() == int((a > 0).sum())
    assert torch.equal(da, da.clone()) and not torch.equal(da, da + 1)
    torch.testing.assert_close(da, da.clone())
    try:
        torch.testing.assert_close(da, da + 1)
    except AssertionError:
        pass
    else:
        raise AssertionError("assert_close passed on different hostdev tensors")


@check
def print_and_repr():
    import re
    import torch
    for t in (_data(3, 4, seed=12), torch.arange(6, dtype=torch.int32),
              torch.tensor([True, False]), _data(2, 3, seed=13).bfloat16(), _data(200, 200)):
        d = repr(t.to("hostdev"))
        assert "device='hostdev:0'" in d, d
        assert re.sub(r",\s*device='hostdev:0'", "", d) == repr(t), (d, repr(t))


@check
def inference_mode_and_autograd():
    import torch
    a, b = _data(4, 6, seed=14), _data(6, 3, seed=15)
    with torch.inference_mode():
        d = a.to("hostdev")
        y = torch.softmax(d @ b.to("hostdev"), -1)
        assert y.is_inference()
        y.mul_(2)
        _same(y, torch.softmax(a @ b, -1) * 2, "inference mode", exact=False)
    x = a.to("hostdev").requires_grad_(True)
    loss = (torch.tanh(x) @ b.to("hostdev")).square().sum()
    loss.backward()
    xc = a.clone().requires_grad_(True)
    (torch.tanh(xc) @ b).square().sum().backward()
    _same(x.grad, xc.grad, "grad", exact=False)
    with torch.no_grad():
        _same(x * 2, a * 2, "no_grad")


@check
def random_numbers():
    import torch
    torch.manual_seed(11)                    # seeds the CPU's generator and hostdev's
    d = torch.randn(4, 5, device="hostdev")
    torch.manual_seed(11)
    _same(d, torch.randn(4, 5), "same seed, same numbers as the CPU")
    state = torch.hostdev.get_rng_state()
    r1 = torch.rand(6, device="hostdev")
    torch.hostdev.set_rng_state(state)
    _same(torch.rand(6, device="hostdev"), r1.cpu(), "rng state round trip")
    g = torch.Generator(device="hostdev")
    assert g.device.type == "hostdev"
    g.manual_seed(5)
    r1 = torch.randn(8, generator=g, device="hostdev")
    g.manual_seed(5)
    _same(torch.randn(8, generator=g, device="hostdev"), r1.cpu(), "a hostdev generator")
    torch.hostdev.manual_seed(3)
    p = torch.softmax(torch.randn(4, 10, device="hostdev"), -1)
    m = torch.multinomial(p, 2)
    assert m.device.type == "hostdev" and m.shape == (4, 2)
    assert sorted(torch.randperm(9, device="hostdev").tolist()) == list(range(9))
    try:
        torch.randn(3, device="hostdev", generator=torch.Generator())
    except RuntimeError as e:
        assert "generator" in str(e) and "hostdev" in str(e), e
    else:
        raise AssertionError("a CPU generator accepted for a hostdev op")


@check
def mixing_devices_is_an_error():
    import torch
    d = _data(3, 4, seed=16).to("hostdev")
    c = _data(3, 4, seed=16)
    for name, fn in (("add", lambda: d + c), ("cat", lambda: torch.cat([d, c])),
                     ("mm", lambda: d @ c.t()), ("index_select", lambda: d.index_select(
                         0, torch.tensor([0]))),
                     ("embedding", lambda: torch.nn.functional.embedding(torch.tensor([1]), d)),
                     ("where", lambda: torch.where(d > 0, d, c))):
        try:
            fn()
        except RuntimeError as e:
            assert "Expected all tensors to be on the same device" in str(e) \
                and "hostdev" in str(e), f"{name}: {e}"
        else:
            raise AssertionError(f"{name}: a hostdev and a cpu tensor were accepted")
    _same(d + torch.tensor(2.0), c + 2, "a 0-dim cpu tensor is a scalar")
    _same(d[torch.tensor([2, 0])], c[torch.tensor([2, 0])], "cpu indices")


@check
def unsupported_is_an_error_not_a_crash():
    """What hostdev cannot hold or run fails with an error naming it."""
    import warnings
    import torch
    x = torch.randn(4, device="hostdev")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # quantized tensors are deprecated
        cases = ((lambda: torch.ops.aten._fused_dropout(x, 0.5), NotImplementedError,
                  "hostdev runs aten::_fused_dropout on its CPU kernel, and the CPU has none"),
                 (lambda: x.to_sparse(), RuntimeError, "hostdev holds dense strided tensors"),
                 (lambda: torch.quantize_per_tensor(x, 0.1, 0, torch.qint8), RuntimeError,
                  "hostdev holds dense strided tensors"))
        for fn, kind, words in cases:
            try:
                fn()
            except kind as e:
                assert words in str(e), e
            else:
                raise AssertionError(f"accepted; expected {kind.__name__}: {words}")
    # a ZeroTensor (autograd's zeros without memory) becomes real zeros
    z = torch._efficientzerotensor((3, 4), device="hostdev")
    _same(z + 1, torch.ones(3, 4), "an efficient zero tensor")


@check
def threads():
    import threading
    import torch
    a = _data(64, 64, seed=17)
    ref = (a @ a).sum(0)
    errors = []

    def work():
        try:
            for _ in range(30):
                d = a.to("hostdev")
                _same((d @ d).sum(0), ref, "threaded", exact=False)
        except Exception as e:      # reported below
            errors.append(repr(e))
    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:2]


@check
def storage_resize():
    import torch
    d = torch.arange(4., device="hostdev")
    d.untyped_storage().resize_(64)
    assert d.untyped_storage().nbytes() == 64
    _same(d, torch.arange(4.), "values kept by a storage resize")
    d.resize_(3, 5)
    assert d.shape == (3, 5) and d.untyped_storage().nbytes() >= 60
    _same(d.view(-1)[:4], torch.arange(4.), "values kept by resize_")
    e = torch.empty(0, device="hostdev")
    e.set_(d.untyped_storage(), 1, (2,), (1,))
    _same(e, torch.arange(1., 3.), "set_ on a storage")


# -- KernelForge on the device -----------------------------------------------------------

@check
def backend_chosen_by_default_and_explained():
    import re
    import torch
    import kernelforge
    from kernelforge.backends import registry
    dec = registry.select(torch.device("hostdev"))
    assert dec.backend.name == "hostdev_cpp", str(dec)
    prio = {n: p for n, p, _ in dec.candidates}
    assert prio["hostdev_cpp"] == 30 and prio["cpp"] is None, prio
    from kernelforge.backends.inductor import _has_codegen
    assert (prio["inductor"] is None) == (not _has_codegen("hostdev")), prio   # none registered
    assert all(p is None or p < 30 for n, p in prio.items() if n != "hostdev_cpp"), prio
    x, w = _data(3, 64, seed=18).to("hostdev"), _data(64, seed=19).to("hostdev")
    text = str(kernelforge.explain("rms_norm", x, w))
    for words in ("backend: hostdev_cpp (highest default priority for hostdev tensors)",
                  "hostdev memory is host memory", "CPU tensors only"):
        assert words in text, (words, text)
    assert re.search(r"hostdev_cpp +30  hostdev memory is host memory", text), text
    assert registry.select(torch.device("cpu")).backend.name == "cpp"
    try:
        kernelforge.ops.rms_norm(x, w, 1e-6, backend="cpp")
    except ValueError as e:
        assert "CPU tensors only" in str(e), e
    else:
        raise AssertionError("backend='cpp' accepted hostdev tensors")


def _both(op, *args, **kw):
    """``op`` on hostdev tensors (the default backend: hostdev_cpp) and on
    CPU tensors holding the same values (the cpp backend): the same
    generated C++ on the same bytes, so the results agree bit for bit."""
    import torch
    H = lambda v: v.to("hostdev") if isinstance(v, torch.Tensor) else v   # noqa: E731
    dev = op(*[H(a) for a in args], **{k: H(v) for k, v in kw.items()})
    cpu = op(*args, **kw)
    dev, cpu = (dev, cpu) if isinstance(dev, tuple) else ((dev,), (cpu,))
    for i, (d, c) in enumerate(zip(dev, cpu)):
        if d is not None:
            _same(d, c, f"{getattr(op, '__name__', op)} output {i} against the CPU")
    return dev


def _close64(got, ref, what, tol=2e-5):
    import torch
    torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol, msg=what)


@check
def op_rms_norm_family():
    import torch
    import kernelforge
    # sizes from the specs' own lists, whose builds the op tests may have cached
    x, r, w = _data(7, 576, seed=20), _data(7, 576, seed=21), _data(576, seed=22)
    x64, w64 = x.double(), w.double()
    (y,) = _both(kernelforge.ops.rms_norm, x, w, 1e-6)
    _close64(y, x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w64, "rms_norm")
    h, res = _both(kernelforge.ops.fused_add_rms_norm, x, r, w, 1e-6)
    s64 = x64 + r.double()
    _close64(res, s64, "fused_add_rms_norm residual")
    _close64(h, s64 * torch.rsqrt(s64.square().mean(-1, keepdim=True) + 1e-6) * w64,
             "fused_add_rms_norm")
    dx, dr = x.to("hostdev"), r.to("hostdev")
    h2, res2 = kernelforge.ops.fused_add_rms_norm(dx, dr, w.to("hostdev"), 1e-6, inplace=True)
    assert h2.data_ptr() == dx.data_ptr() and res2.data_ptr() == dr.data_ptr()
    _same(dx, h.cpu(), "fused_add_rms_norm in place")
    out = torch.empty(7, 576, device="hostdev")
    kernelforge.ops.rms_norm(x.to("hostdev"), w.to("hostdev"), 1e-6, out=out)
    _same(out, y.cpu(), "rms_norm out=")
    bf = x.bfloat16()
    (yb,) = _both(kernelforge.ops.rms_norm, bf, w.bfloat16(), 1e-6)
    _close64(yb, bf.double() * torch.rsqrt(bf.double().square().mean(-1, keepdim=True) + 1e-6)
             * w.bfloat16().double(), "rms_norm bf16", tol=2e-2)


@check
def op_activations():
    import torch
    import kernelforge
    x = _data(5, 14, seed=23)
    (y,) = _both(kernelforge.ops.silu_and_mul, x)
    a, b = x.double().chunk(2, -1)
    _close64(y, a * torch.sigmoid(a) * b, "silu_and_mul")
    (g,) = _both(kernelforge.ops.gelu_tanh_and_mul, x)
    _close64(g, torch.nn.functional.gelu(a, approximate="tanh") * b, "gelu_tanh_and_mul",
             tol=1e-4)


@check
def op_rotary_embedding():
    import torch
    import kernelforge
    D, hq, hk, T = 128, 4, 2, 6
    cache = kernelforge.rope.cos_sin_cache(D, 128, base=10000.0, dtype=torch.bfloat16)
    pos = torch.tensor([0, 1, 5, 17, 100, 127])
    q, k = _data(T, hq * D, seed=24).bfloat16(), _data(T, hk * D, seed=25).bfloat16()
    rq, rk = _both(kernelforge.ops.rotary_embedding, pos, q, k, D, cache, True)
    cos, sin = cache[pos].double().chunk(2, -1)

    def neox(t, heads):
        t = t.double().view(T, heads, D)
        x1, x2 = t[..., :D // 2], t[..., D // 2:]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).view(T, heads * D)
    _close64(rq, neox(q, hq), "rotary q", tol=2e-2)
    _close64(rk, neox(k, hk), "rotary k", tol=2e-2)
    dq, dk = q.to("hostdev"), k.to("hostdev")
    kernelforge.ops.rotary_embedding(pos.to("hostdev"), dq, dk, D, cache.to("hostdev"), True,
                                     inplace=True)
    _same(dq, rq.cpu(), "rotary in place")


@check
def op_kv_cache_and_paged_attention():
    import math
    import torch
    import kernelforge
    nb, bs, hk, group, D = 6, 16, 2, 2, 64
    hq = hk * group
    k_lens, q_lens = [20, 5, 33], [3, 1, 4]
    kc, vc = torch.zeros(nb, bs, hk, D), torch.zeros(nb, bs, hk, D)
    T = sum(k_lens)
    key, value = _data(T, hk, D, seed=26), _data(T, hk, D, seed=27)
    tables = torch.tensor([[4, 1, -1], [0, -1, -1], [2, 5, 3]], dtype=torch.int32)
    slots = torch.cat([tables[b, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
                       for b, n in enumerate(k_lens)])
    dkc, dvc = kc.to("hostdev"), vc.to("hostdev")
    kernelforge.ops.reshape_and_cache(key.to("hostdev"), value.to("hostdev"), dkc, dvc,
                                      slots.to("hostdev"))
    kernelforge.ops.reshape_and_cache(key, value, kc, vc, slots)
    _same(dkc, kc, "key cache against the CPU")
    _same(dvc, vc, "value cache against the CPU")
    ref_kc = torch.zeros(nb * bs, hk, D)
    ref_kc[slots] = key
    assert torch.equal(kc.view(nb * bs, hk, D), ref_kc), "reshape_and_cache vs a scatter"

    q = _data(sum(q_lens), hq, D, seed=28)
    lens = torch.tensor(k_lens, dtype=torch.int32)
    qsl = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    (o,) = _both(kernelforge.ops.paged_attention, q, kc, vc, tables, lens, qsl)
    ref = torch.zeros(sum(q_lens), hq, D, dtype=torch.float64)
    for b in range(3):
        s = slots[sum(k_lens[:b]):sum(k_lens[:b + 1])]
        K = kc.view(-1, hk, D)[s].double().repeat_interleave(group, 1)
        V = vc.view(-1, hk, D)[s].double().repeat_interleave(group, 1)
        Q = q[qsl[b]:qsl[b + 1]].double()
        att = torch.einsum("qhd,khd->hqk", Q, K) / math.sqrt(D)
        ql, kl = q_lens[b], k_lens[b]
        mask = torch.arange(kl)[None, :] > (kl - ql + torch.arange(ql))[:, None]
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        ref[qsl[b]:qsl[b + 1]] = torch.einsum("hqk,khd->qhd", att, V)
    _close64(o, ref, "paged_attention", tol=1e-4)


@check
def op_sampling():
    import torch
    import kernelforge
    B, V = 4, 1000
    logits = _data(B, V, seed=29) * 3
    (greedy,) = _both(kernelforge.ops.sample, logits, temperature=0.0)
    assert greedy.cpu().tolist() == logits.argmax(-1).tolist()
    (tok,) = _both(kernelforge.ops.sample, logits, temperature=torch.tensor([0.0, 0.7, 1.0, 1.3]),
                   top_k=20, top_p=0.9, seeds=torch.tensor([1, 2, 3, 4]), offsets=0)
    assert tok.dtype == torch.int64 and tok[0].item() == logits[0].argmax().item()
    top20 = logits.topk(20, -1).indices
    assert all(int(t) in top20[i].tolist() for i, t in enumerate(tok.cpu())), "top_k ignored"
    outs = _both(kernelforge.ops.sample, logits, temperature=0.0, logprobs=3)
    lp = torch.log_softmax(logits.double(), -1)
    _close64(outs[1], lp.gather(1, logits.argmax(-1, keepdim=True))[:, 0], "token logprobs",
             tol=1e-4)
    _close64(outs[3], lp.topk(3, -1).values, "top logprobs", tol=1e-4)
    prompt = torch.tensor([[1, 2, -1], [3, 3, 7], [0, -1, -1], [299, 5, 5]])
    output = torch.tensor([[2, 2], [7, -1], [-1, -1], [5, 8]])
    (pen,) = _both(kernelforge.ops.apply_penalties, logits, prompt, output,
                   repetition_penalty=1.3, frequency_penalty=0.25, presence_penalty=0.5)
    ref = logits.double().clone()
    for b in range(B):
        seen = set(prompt[b].tolist()) | set(output[b].tolist())
        for v in seen - {-1}:
            ref[b, v] = ref[b, v] / 1.3 if ref[b, v] > 0 else ref[b, v] * 1.3
        for v in set(output[b].tolist()) - {-1}:
            ref[b, v] -= 0.25 * output[b].tolist().count(v) + 0.5
    _close64(pen, ref, "apply_penalties", tol=1e-5)
    vals, ids = _both(kernelforge.ops.topk_softmax, logits[:, :16], 2)
    p = logits[:, :16].double().softmax(-1).topk(2, -1)
    _close64(vals, p.values, "topk_softmax values")
    assert torch.equal(ids.cpu().long(), p.indices)


@check
def conformance_in_process():
    """conformance.run on the device: the explicit backend, and without one
    the default for hostdev."""
    from kernelforge import conformance
    r = conformance.run("hostdev_cpp", "hostdev", ["silu_and_mul"], examples=2)
    assert r["level"] == 1 and r["device"] == "hostdev", conformance.table(r)
    assert conformance.run(None, "hostdev", ["silu_and_mul"], examples=1)["backend"] == \
        "hostdev_cpp"


@check
def eager_backend_runs_on_the_device():
    import torch
    import kernelforge
    x, w = _data(3, 64, seed=30), _data(64, seed=31)
    y = kernelforge.ops.rms_norm(x.to("hostdev"), w.to("hostdev"), 1e-6, backend="eager")
    x64 = x.double()
    _close64(y, x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w.double(),
             "rms_norm on eager")


def child_main() -> None:
    """Run every check, report ``MARK`` + JSON {check: None or its traceback}."""
    import faulthandler
    faulthandler.dump_traceback_later(CHILD_TIMEOUT - 20, exit=True)
    results = {}
    try:
        entry_point_loads_without_the_device()
        results["entry_point_loads_without_the_device"] = None
    except Exception:
        results["entry_point_loads_without_the_device"] = traceback.format_exc()[-3000:]
    import kf_hostdev  # noqa: F401  (registers the device for the checks below)
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()[-3000:]
    print(MARK + json.dumps(results), flush=True)


# -- the tests (in the pytest process) ---------------------------------------------------

def test_device_and_backend_checks():
    """Every check above, in one child process (one test, so that pytest-xdist
    never starts the child twice); a failure lists each failing check."""
    outcomes = run_child_checks(os.path.abspath(__file__), mark=MARK, env=_env(), cwd=ROOT,
                                timeout=CHILD_TIMEOUT, what="the hostdev checks")
    expected = ["entry_point_loads_without_the_device", *CHECKS]
    assert sorted(outcomes) == sorted(expected)
    fail_on_failed(outcomes, "hostdev checks")


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-X", "faulthandler", "-m", "kernelforge.cli", *args],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)


def test_conformance_l1_on_the_device():
    """`kernelforge conformance --device hostdev`: the device is imported
    through its `kernelforge.devices` entry point, and the default backend for
    hostdev (hostdev_cpp) passes every check of five ops on the device."""
    res = _cli("conformance", "--device", "hostdev", "--examples", "5",
               "--ops", "rms_norm,silu_and_mul,rotary_embedding,paged_attention,sample")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "backend hostdev_cpp (kernelforge-hostdev) on hostdev" in res.stdout, res.stdout
    assert res.stdout.count(" L1\n") == 5 and "verdict: L1" in res.stdout, res.stdout


def test_conformance_errors_without_the_device():
    """A device no plug-in announces: conformance says how to get it; hostdev_cpp
    refuses CPU tensors; a failing --import names the module. (In this process
    hostdev is never imported: that would rename PrivateUse1 for the worker.)"""
    from kernelforge import conformance
    with pytest.raises(ValueError, match="nodevice is not a registered torch device: import "
                                         r"its plug-in, e.g. --import MODULE.*\['hostdev'\]"):
        conformance.run(None, "nodevice", ["rms_norm"], examples=1)
    with pytest.raises(ValueError, match="hostdev_cpp.*cannot run on cpu: hostdev tensors only"):
        conformance.run("hostdev_cpp", None, ["rms_norm"], examples=1)
    with pytest.raises(ValueError, match="--import no_such_plugin_module failed"):
        conformance.run(None, "cpu", ["rms_norm"], examples=1, imports=["no_such_plugin_module"])


def test_privateuse1_taken_by_another_plugin():
    """One process has one PrivateUse1 device: kf_hostdev refuses, naming the other."""
    code = ("import torch\ntorch.utils.rename_privateuse1_backend('otherdev')\n"
            "try:\n    import kf_hostdev\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                         text=True, cwd=ROOT, env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "refused:" in res.stdout and "'otherdev'" in res.stdout, res.stdout


if __name__ == "__main__" and "--child" in sys.argv:
    child_main()
