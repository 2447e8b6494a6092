"""Shared test set-up: hypothesis profiles, one kernel cache for the whole
session (so each specialisation compiles once per run), the device."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

# One generated-source cache for the session, outside the user's own.
if "KERNELFORGE_CACHE_DIR" not in os.environ:
    os.environ["KERNELFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernelforge-test-cache-")
    # removed at exit: a run's generated sources and libraries (tens of MB) are its own
    atexit.register(shutil.rmtree, os.environ["KERNELFORGE_CACHE_DIR"], ignore_errors=True)
# Under pytest-xdist (make test: -n 2 on a 2-core machine) each worker computes on one
# thread, and so do the processes tests start: two workers of two threads each
# oversubscribe the cores and the spinning OpenMP threads tripled the model tests' time.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
# Small Triton chunks, so the interpreter exercises chunked loops on small rows.
os.environ.setdefault("KERNELFORGE_TRITON_MAX_BLOCK", "1024")

settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# tools/gpu_check.sh: native Triton compiles each new shape, so fewer examples
settings.register_profile(
    "gpu", max_examples=8, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: the backends the op tests run on: ``--kf-backend`` (pytest_configure sets it),
#: else every built-in backend that runs on DEVICE (a plug-in: --kf-backend=NAME)
BACKENDS: tuple = ()


def pytest_addoption(parser):
    parser.addoption("--kf-backend", action="append", default=None, metavar="NAME",
                     help="run the op tests on this backend only (repeat the flag or "
                          "comma-separate names); default: every built-in backend that runs "
                          "on this device")


def pytest_configure(config):
    global BACKENDS
    from kernelforge.backends import registry
    known = registry.backends()
    chosen = [b for v in (config.getoption("--kf-backend") or []) for b in v.split(",") if b]
    unknown = [b for b in chosen if b not in known]
    if unknown:
        raise pytest.UsageError(f"--kf-backend: unknown backend(s) {unknown}; registered: "
                                f"{sorted(known)}")
    BACKENDS = tuple(chosen) or tuple(n for n, b in known.items()
                                      if registry.builtin(n) and b.can_run(DEVICE)[0])


@pytest.fixture
def device():
    return DEVICE
