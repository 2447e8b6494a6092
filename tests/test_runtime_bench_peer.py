"""The paired runtime benchmark's plumbing (bench/runtime_peers.py:
``VllmServer``, ``paired_rounds``) against a stand-in for vLLM's process: a
script that speaks ``bench/vllm_peer.py serve``'s protocol and records what it
was asked, so the protocol, the alternation and the error paths are checked
without vLLM (the real one runs in bench/test_runtime_bench.py where
installed)."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

# bench/ is a directory of scripts, not a package: load the module from its file
_SPEC = importlib.util.spec_from_file_location(
    "runtime_peers", Path(__file__).resolve().parent.parent / "bench" / "runtime_peers.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

STAND_IN = r'''#!{python}
# argv: vllm_peer.py HF_DIR PROMPTS.json NEW serve, as VllmServer runs it
import json, os, sys, time
log = open(os.environ["KF_TEST_PEER_LOG"], "a")
log.write(json.dumps({{"argv": sys.argv[1:], "prompts": json.load(open(sys.argv[3])),
                      "reserved": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")}}) + "\n")
log.flush()
if os.environ.get("KF_TEST_PEER_FAIL"):
    print("INFO a log line first"); sys.stderr.write("model failed to load\n"); sys.exit(3)
print("INFO vLLM-like log line on stdout")
print(json.dumps({{"ready": True, "first_ids": [1, 2, 3]}}), flush=True)
for line in sys.stdin:
    if line.strip() == "quit":
        break
    log.write("run\n"); log.flush()
    time.sleep(0.01)
    print(json.dumps({{"s": 0.25}}), flush=True)
log.write("quit\n")
'''


@pytest.fixture
def peer(tmp_path, monkeypatch):
    script = tmp_path / "python-stand-in"
    script.write_text(STAND_IN.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "peer.log"
    monkeypatch.setenv("KF_VLLM_PYTHON", str(script))
    monkeypatch.setenv("KF_TEST_PEER_LOG", str(log))
    monkeypatch.setattr(bench, "hf_dir_from_gguf", lambda path: tmp_path / "hf-dir")
    return log


def _log(log) -> list:
    return [json.loads(x) if x.startswith("{") else x.strip()
            for x in log.read_text().splitlines()]


@pytest.mark.parametrize("reserved", [None, 0])
def test_server_protocol_and_paired_rounds_alternate(peer, reserved):
    order = []
    with bench.VllmServer("model.gguf", ["a", "b"], 7, reserved_cpus=reserved) as v:
        assert v.first_ids == [1, 2, 3]
        real = v.time_generate
        v.time_generate = lambda: (order.append("v"), real())[1]
        pairs = bench.paired_rounds(lambda: order.append("k"), v, 4)
        proc = v.proc
    assert proc.poll() is not None                     # the process ended with the block
    assert [v for _, v in pairs] == [0.25] * 4         # vLLM's own timing, passed through
    assert all(k >= 0 for k, _ in pairs)
    assert order == ["k", "v", "v", "k", "k", "v", "v", "k"]   # who goes first alternates
    entries = _log(peer)
    start = entries[0]
    script, model_dir, prompts_file, *rest = start["argv"]
    assert script.endswith("vllm_peer.py") and model_dir.endswith("hf-dir")
    assert rest == ["7", "serve"] and start["prompts"] == ["a", "b"]
    assert start["reserved"] == (None if reserved is None else "0")
    assert entries[1:] == ["run"] * 4 + ["quit"]
    assert not os.path.exists(prompts_file)          # its temporary directory is gone


def test_server_that_dies_reports_its_stderr(peer, monkeypatch):
    monkeypatch.setenv("KF_TEST_PEER_FAIL", "1")
    with pytest.raises(RuntimeError, match=r"exited \(code 3\)[\s\S]*model failed to load"):
        bench.VllmServer("model.gguf", ["a"], 4)


def test_server_without_vllm_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("KF_VLLM_PYTHON", str(tmp_path / "missing-python"))
    with pytest.raises(FileNotFoundError, match="install_vllm_peer.sh"):
        bench.VllmServer("model.gguf", ["a"], 4)
