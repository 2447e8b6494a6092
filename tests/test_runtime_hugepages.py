"""kernelforge.runtime.hugepages: the buffers the model's weights and KV caches
live in (2 MB aligned and advised for transparent huge pages where Linux
offers them), and the moves into them."""
from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch

from kernelforge.runtime import hugepages

MB = 1 << 20
THP = hugepages.thp_mode() in ("always", "madvise")


def _mapping(ptr: int) -> dict:
    """The /proc/self/smaps fields of the mapping holding address ``ptr``."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                if inside:
                    break
                inside = lo <= ptr < hi
            elif inside:
                fields[head.rstrip(":")] = line.split()[1]
    return fields


def test_thp_mode_is_read():
    assert hugepages.thp_mode() in ("always", "madvise", "never", "unavailable")


@pytest.mark.parametrize("nbytes", [1, 2 * MB - 1, 2 * MB, 5 * MB + 3])
def test_empty_and_zeroed(nbytes):
    t = hugepages.empty(nbytes)
    assert t.dtype == torch.uint8 and t.shape == (nbytes,) and t.is_contiguous()
    z = hugepages.empty(nbytes, zeroed=True)
    assert int(z.count_nonzero()) == 0
    t.fill_(7)                                  # the whole range is writable
    assert int(t.sum()) == 7 * nbytes
    if THP and nbytes >= hugepages.HUGE_PAGE:
        assert t.data_ptr() % hugepages.HUGE_PAGE == 0


@pytest.mark.skipif(not THP or not sys.platform.startswith("linux"),
                    reason=f"transparent huge pages are {hugepages.thp_mode()} here")
def test_buffer_is_eligible_for_huge_pages():
    """The kernel reports the buffer's mapping as THP-eligible (a shared
    anonymous mapping, or one advised after its first touch, is not). Whether
    it then finds free 2 MB pages depends on the machine, so that is not asserted."""
    t = hugepages.empty(8 * MB)
    t.fill_(1)
    fields = _mapping(t.data_ptr())
    assert fields.get("THPeligible") == "1", fields


def test_zeros_are_separate_zero_tensors():
    shape, n = (40, 16, 3, 64), 5
    ts = hugepages.zeros(shape, torch.bfloat16, n)
    assert len(ts) == n
    for t in ts:
        assert t.shape == shape and t.dtype == torch.bfloat16 and t.is_contiguous()
        assert int(t.count_nonzero()) == 0
        assert t.data_ptr() % 64 == 0
    ts[2].fill_(1.5)                            # no overlap with its neighbours
    assert [int(t.count_nonzero()) for t in ts] == [0, 0, ts[2].numel(), 0, 0]


class _Holder:
    pass


def test_move_attributes_copies_values_keeps_ties_and_frees_sources():
    g = torch.Generator().manual_seed(0)
    a, b = _Holder(), _Holder()
    a.big = torch.randn(1500, 701, generator=g).bfloat16()    # > 2 MB in all; odd sizes
    a.small = torch.randn(3, generator=g)
    a.ints = torch.arange(11, dtype=torch.int32)
    b.tied = a.big                                            # one tensor at two slots
    b.t = torch.randn(5, 7, generator=g).t()                  # not contiguous
    want = {k: v.clone() for k, v in (("big", a.big), ("small", a.small), ("ints", a.ints),
                                      ("t", b.t))}
    gone = weakref.ref(a.small)
    hugepages.move_attributes([(a, "big"), (a, "small"), (a, "ints"), (b, "tied"), (b, "t")])
    gc.collect()
    assert gone() is None                      # the source freed once moved
    assert b.tied is a.big                     # one copy for the tied pair
    for k, obj in (("big", a), ("small", a), ("ints", a), ("t", b)):
        t = getattr(obj, k)
        assert t.dtype == want[k].dtype and t.shape == want[k].shape and t.is_contiguous()
        assert torch.equal(t, want[k])
        assert t.data_ptr() % 64 == 0
    # all in one buffer
    assert len({t.untyped_storage().data_ptr() for t in (a.big, a.small, a.ints, b.t)}) == 1


def test_model_on_huge_pages_computes_the_same_logits(tmp_path):
    """The same checkpoint, weights and caches moved or not: the same logits,
    bit for bit (only where the bytes live changes)."""
    from test_runtime_errors import write_tiny_llama

    from kernelforge.runtime import loader
    from kernelforge.runtime.model import AttnMetadata, LlamaModel

    path = write_tiny_llama(tmp_path, seed=5)
    outs = []
    for huge in (True, False):
        config, weights, _ = loader.load(path)
        model = LlamaModel(config, weights, backend="eager", huge_pages=huge)
        caches = model.allocate_kv_cache(4, 16)
        ids = torch.tensor([3, 17, 42, 9, 100], dtype=torch.int64)
        meta = AttnMetadata(slot_mapping=torch.arange(5), block_tables=torch.tensor([[0]],
                            dtype=torch.int32), seq_lens=torch.tensor([5], dtype=torch.int32),
                            query_start_loc=torch.tensor([0, 5], dtype=torch.int32))
        outs.append(model.forward(ids, torch.arange(5), meta, caches))
        assert model.weight_bytes() == sum(t.numel() * t.element_size() for t in
                                           {id(t): t for t in _model_tensors(model)}.values())
    assert torch.equal(outs[0], outs[1])


def _model_tensors(model):
    ts = [model.embed, model.norm, model.lm_head, model.cos_sin]
    for layer in model.layers:
        ts += layer.tensors()
    return ts
