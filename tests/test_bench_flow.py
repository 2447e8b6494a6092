"""The benchmark regression flow of docs/benchmarks.md, end to end on the
tiny ``smoke`` cases of bench/:

1. ``--benchmark-autosave`` stores a JSON run;
2. ``--benchmark-compare --benchmark-compare-fail=median:<pct>`` against it
   passes (a huge threshold here: timings on a shared 2-core machine are
   noise, and this test checks the flow, not the machine);
3. the same comparison fails (non-zero exit) against a stored run whose
   medians were made absurdly small, so a real regression would be caught.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_CASES = {"test_rmsnorm[smoke-rms_norm-64x576-fp32-kf_inductor]",
               "test_rmsnorm[smoke-rms_norm-64x576-fp32-kf_eager]"}


def _bench(storage: Path, *extra: str) -> subprocess.CompletedProcess:
    # a clean pytest: no inherited options, and no xdist worker markers (with them
    # pytest-benchmark believes it runs under xdist and disables itself)
    env = {k: v for k, v in os.environ.items()
           if k != "PYTEST_ADDOPTS" and not k.startswith("PYTEST_XDIST")}
    env["KERNELFORGE_CACHE_DIR"] = str(storage.parent / "kf-cache")   # shared by the 3 runs
    cmd = [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-k", "smoke",
           "-p", "no:cacheprovider", f"--benchmark-storage={storage}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _saved(storage: Path) -> list:
    return sorted(storage.rglob("*.json"))


def _explain(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-2000:]}"


@pytest.mark.slow
def test_autosave_compare_and_fail(tmp_path):
    storage = tmp_path / "benchmarks"

    # 1. save a run
    first = _bench(storage, "--benchmark-autosave")
    assert first.returncode == 0, _explain(first)
    saved = _saved(storage)
    assert len(saved) == 1, f"expected one saved run under {storage}, found {saved}"
    data = json.loads(saved[0].read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert names == SMOKE_CASES
    for b in data["benchmarks"]:
        assert b["stats"]["median"] > 0
        assert {"gbps", "bytes", "fraction_of_copy_bw"} <= set(b["extra_info"])

    # 2. compare against it: the flow passes (threshold far above any noise)
    second = _bench(storage, "--benchmark-compare", "--benchmark-compare-fail=median:1000%")
    assert second.returncode == 0, _explain(second)
    assert "Performance has regressed" not in second.stdout + second.stderr
    assert _saved(storage) == saved, "a compare-only run must not save a new run"

    # 3. a stored baseline no real run can match: the same flow must fail
    for b in data["benchmarks"]:
        b["stats"]["median"] = 1e-12
    saved[0].write_text(json.dumps(data))
    third = _bench(storage, "--benchmark-compare", "--benchmark-compare-fail=median:10%")
    assert third.returncode != 0, _explain(third)
    assert "Performance has regressed" in third.stdout + third.stderr, _explain(third)
