"""tools/gpu_bench.py's attention cases (tools/gpu_attention.py), dry-run
on this CPU at tiny sizes through the Triton interpreter: the GPU script is
only run on a lent GPU with minutes of device time, so its Python (the
cases, their correctness checks, the launch-variant patches of
tools/gpu_variants.py) is exercised here first. Timing is not: every case
gets a dummy time."""
import sys
from pathlib import Path

import pytest
import torch

import kernelforge
from kernelforge.tolerance import assert_close
from conftest import DEVICE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpu_attention(monkeypatch):
    for p in ("tools", "bench"):
        monkeypatch.syspath_prepend(str(ROOT / p))
    import gpu_attention as gb
    monkeypatch.setattr(gb, "ATTN_PREFILL_S", 40)
    monkeypatch.setattr(gb, "ATTN_PREFILL_H", 2)
    monkeypatch.setattr(gb, "ATTN_HEAD", 64)
    monkeypatch.setattr(gb, "ATTN_DECODE_B", 2)
    monkeypatch.setattr(gb, "ATTN_DECODE_CTX", (40,))
    monkeypatch.setattr(gb, "ATTN_DECODE_HQ", 4)
    monkeypatch.setattr(gb, "ATTN_DECODE_HKV", 2)
    # one variant of each kind the patches handle: key chunk + stages, warps, splits
    monkeypatch.setattr(gb, "PREFILL_VARIANTS", (dict(kb=128, stages=2), dict(bq=64, w=4)))
    monkeypatch.setattr(gb, "DECODE_VARIANTS", (dict(splits=1, kb=32), dict(splits=2), dict(w=8)))
    yield gb
    sys.modules.pop("gpu_attention", None)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the real script runs on the GPU")
def test_attention_cases_run_and_check(gpu_attention):
    rows, failures = [], []

    def run_case(name, fn, refs, dtype, nbytes, goal=None, check=None, graph=False):
        try:
            got = fn()
            got = got if isinstance(got, tuple) else (got,)
            for i, (a, ref) in enumerate(zip(got, refs)):
                if check is not None:
                    check(i, a, ref, name)
                else:
                    assert_close(a, ref, dtype, name)
        except Exception as e:  # noqa: BLE001  reported below with the case name
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            rows.append({"case": name, "ms": float("nan"), "gbps": float("nan"), "note": ""})
            return
        rows.append({"case": name, "ms": 1.0, "gbps": 1.0, "note": ""})

    groups, goals = gpu_attention.attention_cases(kernelforge, run_case, rows, DEVICE,
                                                  torch.Generator().manual_seed(0))
    assert not failures, failures
    names = {r["case"] for r in rows}
    for want in ("attention prefill S=40 bf16 | kf triton",
                 "attention prefill S=40 bf16 | kf triton no check",
                 "attention prefill S=40 bf16 | kf triton exact p",
                 "paged decode B=2 ctx=40 bf16 | kf triton no check exact p",
                 "attention prefill S=40 bf16 | kf variant kb=128 stages=2",
                 "attention prefill S=40 bf16 | kf variant bq=64 w=4",
                 "paged decode B=2 ctx=40 bf16 | kf variant splits=2"):
        assert want in names, sorted(names)
    assert any("goal >= 1x" in line for line in goals), goals
