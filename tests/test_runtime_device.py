"""The runtime's ``device`` option: resolved and checked once
(``kernelforge.devices``), carried by every tensor the engine makes, and the
CPU-only parts kept to CPUs. The out-of-tree device's end-to-end case is in
test_hostdev_runtime.py."""
import subprocess
import sys

import pytest
import torch

from kernelforge import devices
from kernelforge.runtime import LLM, SamplingParams
from kernelforge.runtime.decode_graphs import DecodeGraphs

from test_runtime_errors import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-device"))


def test_default_device_is_cuda_when_torch_has_it_else_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.default_device().type == want
    assert devices.resolve(None).type == want


@pytest.mark.parametrize("bad, words", [
    ("nosuchdevice", ["device", "'nosuchdevice'", "not a device torch knows"]),
    ("meta", ["device", "meta", "hold no data"]),
    (3, ["device must be a device name", "int 3"]),
    (["cpu"], ["device must be a device name", "list"]),
])
def test_bad_device_names_the_argument(bad, words):
    with pytest.raises(ValueError) as e:
        devices.resolve(bad)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_a_gpu_says_so_before_loading(tmp_path):
    # a missing model directory would fail later: the device is checked first
    with pytest.raises(ValueError, match=r"device: 'cuda:1' was requested but "
                                         r"torch.cuda.is_available\(\) is False"):
        LLM(tmp_path / "missing", device="cuda:1")


def test_cpu_index_and_spelling_resolve_to_the_cpu():
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve(torch.device("cpu")) == torch.device("cpu")


def test_cpu_engine_puts_every_tensor_on_the_cpu_and_keeps_cpu_only_parts(tiny_dir):
    llm = LLM(tiny_dir, backend="eager", device="cpu", num_blocks=64, max_num_seqs=4)
    assert llm.device == torch.device("cpu") and llm.model.device == llm.device
    assert type(llm.graphs) is DecodeGraphs            # the recorded replay: CPUs only
    assert llm.model.huge_pages is True                # huge pages: CPUs only
    k, v = llm.kv_caches[0]
    assert k.device.type == v.device.type == "cpu"
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=6))
    ref = LLM(tiny_dir, backend="eager", num_blocks=64, max_num_seqs=4,
              enforce_eager=True).generate(["hello"], SamplingParams(temperature=0, max_tokens=6))
    assert out[0].token_ids == ref[0].token_ids and len(ref[0].token_ids) == 6


def test_tensors_follow_the_model_device(tiny_dir):
    """Every tensor a step builds for the model is on ``llm.device``."""
    llm = LLM(tiny_dir, backend="eager", device="cpu", num_blocks=64, max_num_seqs=4,
              enforce_eager=True)
    seq = llm.add_request("abc", SamplingParams(max_tokens=1))
    llm.scheduler.schedule()           # gives it blocks; prepared below
    ids, pos, meta, rows = llm._prepare([(seq, seq.num_tokens)])
    for t in (ids, pos, rows, meta.slot_mapping, meta.block_tables, meta.seq_lens,
              meta.query_start_loc):
        assert t.device == llm.device


@pytest.mark.parametrize("cmd, prefix", [(["generate", "hi", "--max-tokens", "1"], "kernelforge"),
                                         (["serve", "--port", "0"], "kernelforge serve")])
def test_cli_rejects_an_unknown_device(cmd, prefix):
    res = subprocess.run([sys.executable, "-m", "kernelforge.cli", *cmd,
                          "--device", "nosuchdevice"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{prefix}: device: 'nosuchdevice' is not a device torch knows" in res.stderr
    assert "Traceback" not in res.stderr
