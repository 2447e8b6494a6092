"""Hostile model files: zero or bad shape fields, deeply nested or non-object
config.json, and files that are not regular files (a FIFO, a device) fail
fast with a ValueError or FileNotFoundError that names the file or field.

The models here are a config.json and a one-tensor safetensors file (the
loader does not check tensor names), or a metadata-only GGUF, so the tests
need no model and run in well under a second.
"""
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from kernelforge.runtime import config as cfg_mod
from kernelforge.runtime.config import ModelConfig
from kernelforge.runtime.loader import load, load_gguf, load_hf_dir

HF = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
          max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
SHAPE = dict(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
             num_heads=2, num_kv_heads=1, head_dim=32, rms_eps=1e-6, rope_theta=1e4,
             max_position=64)


def _hf_dir(path, config=HF, tokenizer=False):
    """config.json (a dict, or raw text) and a one-tensor model.safetensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (path / "config.json").write_text(text)
    save_file({"x": torch.zeros(2)}, str(path / "model.safetensors"))
    return path


# A watchdog: after a delay it opens the FIFOs for writing, over and over, so a load
# blocked opening one (as a reader) gets a writer that closes at once, reads EOF and
# ends. The load itself cannot be interrupted from Python: safetensors' open holds the GIL.
_UNBLOCK = """
import os, sys, time
time.sleep(float(sys.argv[1]))
while True:
    for f in sys.argv[2:]:
        try:
            os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:             # no reader waiting on this one
            pass
    time.sleep(0.05)
"""


def _raises_quickly(fn, fifos, timeout=10.0):
    """The exception ``fn()`` raises; the test fails if it raises nothing or takes
    ``timeout`` seconds (it was blocked on a FIFO until the watchdog let it go)."""
    watchdog = subprocess.Popen([sys.executable, "-S", "-c", _UNBLOCK, str(timeout),
                                 *map(str, fifos)])
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:              # noqa: BLE001 - handed to the test to check
        exc = e
    else:
        exc = None
    finally:
        watchdog.kill()
        watchdog.wait()
    took = time.monotonic() - t0
    assert took < timeout, f"loading blocked on a FIFO for {took:.0f} s (then raised {exc!r})"
    assert exc is not None, "loading a FIFO raised nothing"
    return exc


# -- shape fields ---------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["num_attention_heads", "num_key_value_heads"])
def test_zero_heads_in_config_json_name_the_field(tmp_path, field):
    d = _hf_dir(tmp_path, dict(HF, **{field: 0}))
    with pytest.raises(ValueError, match=rf"config\.json is not a usable model config: "
                                         rf"ValueError: {field} must be an int >= 1; got 0"):
        load_hf_dir(d)


@pytest.mark.parametrize("key, value, expect", [
    ("num_attention_heads", 0, "an int >= 1"), ("num_attention_heads", -2, "an int >= 1"),
    ("num_attention_heads", "2", "an int >= 1"), ("num_attention_heads", True, "an int >= 1"),
    ("num_attention_heads", 2.0, "an int >= 1"), ("num_key_value_heads", 0, "an int >= 1"),
    ("hidden_size", 0, "an int >= 1"), ("head_dim", 0, "an int >= 1"),
    ("vocab_size", 0, "an int >= 1"), ("intermediate_size", -1, "an int >= 1"),
    ("num_hidden_layers", 0, "an int >= 1"), ("max_position_embeddings", 0, "an int >= 1"),
    ("rms_norm_eps", 0.0, "a finite number > 0"), ("rms_norm_eps", math.nan, "a finite number > 0"),
    ("rope_theta", -1.0, "a finite number > 0"), ("rope_theta", math.inf, "a finite number > 0"),
])
def test_bad_hf_shape_fields_are_named(key, value, expect):
    message = f"{key} must be {expect}; got {value!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cfg_mod.from_hf_dict(dict(HF, **{key: value}))


def test_hf_head_dim_absent_or_null_is_derived():
    assert cfg_mod.from_hf_dict(dict(HF)).head_dim == 32
    assert cfg_mod.from_hf_dict(dict(HF, head_dim=None)).head_dim == 32
    assert cfg_mod.from_hf_dict(dict(HF, num_key_value_heads=None)).num_kv_heads == 2


@pytest.mark.parametrize("field, value", [
    (f, v) for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position")
    for v in (0, -1, 1.5, None)
] + [(f, v) for f in ("rms_eps", "rope_theta") for v in (0.0, -1e-6, math.nan, math.inf, None)]
  + [("rotary_dim", v) for v in (0, 3, 34)])
def test_model_config_checks_every_shape_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*; got {value!r}$"):
        ModelConfig(**dict(SHAPE, **{field: value}))


def _gguf_meta(**over):
    meta = {"general.architecture": "llama", "llama.vocab_size": 64,
            "llama.embedding_length": 64, "llama.feed_forward_length": 128,
            "llama.block_count": 1, "llama.attention.head_count": 2,
            "llama.attention.head_count_kv": 1, "llama.context_length": 64,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}
    meta.update(over)
    return meta


@pytest.mark.parametrize("key", ["llama.attention.head_count", "llama.attention.head_count_kv",
                                 "llama.embedding_length", "llama.attention.key_length",
                                 "llama.block_count", "llama.feed_forward_length"])
def test_zero_counts_in_gguf_metadata_name_the_key(key):
    assert cfg_mod.from_gguf_metadata(_gguf_meta(), set()).head_dim == 32
    with pytest.raises(ValueError, match=rf"^{key} must be an int >= 1; got 0$"):
        cfg_mod.from_gguf_metadata(_gguf_meta(**{key: 0}), set())


def test_gguf_file_with_zero_heads_names_file_and_key(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "zero.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_vocab_size(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_head_count(0)
    w.add_head_count_kv(0)
    w.add_layer_norm_rms_eps(1e-5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"zero\.gguf has unusable model metadata: llama\."
                                         r"attention\.head_count must be an int >= 1; got 0"):
        load_gguf(path)


# -- config.json that is not a flat JSON object -----------------------------------------------

@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"a": ' * 100_000 + "1" + "}" * 100_000],
                         ids=["list", "dict"])
def test_deeply_nested_config_json_names_the_file(tmp_path, text):
    d = _hf_dir(tmp_path, text)
    with pytest.raises(ValueError, match=r"config\.json is not a usable model config: "
                                         r"its JSON nests too deeply"):
        load_hf_dir(d)


@pytest.mark.parametrize("text, where, kind", [
    ("[1, 2]", "it", "list"), ("3", "it", "int"), ("null", "it", "NoneType"),
    ('"llama"', "it", "str"), ('{"text_config": [1]}', "its text_config", "list"),
])
def test_config_json_that_is_not_an_object(tmp_path, text, where, kind):
    d = _hf_dir(tmp_path, text)
    with pytest.raises(ValueError, match=rf"config\.json is not a usable model config: "
                                         rf"{where} must be a JSON object; got {kind}"):
        load_hf_dir(d)


# -- files that are not regular files -----------------------------------------------------------

@pytest.mark.parametrize("name, what", [("model.safetensors", "safetensors file"),
                                        ("config.json", "model config"),
                                        ("tokenizer.json", "tokenizer file")])
def test_fifo_in_hf_dir_is_refused_not_opened(tmp_path, name, what):
    d = _hf_dir(tmp_path / "m")
    (d / name).unlink(missing_ok=True)
    os.mkfifo(d / name)
    e = _raises_quickly(lambda: load(d), [d / name])
    assert isinstance(e, ValueError), repr(e)
    assert str(e) == f"{what} {d / name} must be a regular file; it is a FIFO"


def test_fifo_as_gguf_file_is_refused_not_opened(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for fn in (lambda: load(fifo), lambda: load_gguf(fifo)):
        e = _raises_quickly(fn, [fifo])
        assert isinstance(e, ValueError), repr(e)
        assert str(e) == f"model file {fifo} must be a regular file; it is a FIFO"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_links_to_devices_and_directories_are_refused(tmp_path):
    d = _hf_dir(tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"safetensors file .*model\.safetensors must be a "
                                         r"regular file; it is a character device"):
        load_hf_dir(d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    with pytest.raises(ValueError, match="it is a directory"):
        load_hf_dir(d)
    (tmp_path / "zero.gguf").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="zero.gguf must be a regular file; "
                                         "it is a character device"):
        load(tmp_path / "zero.gguf")


def test_dangling_links_are_missing_files(tmp_path):
    d = _hf_dir(tmp_path / "m")
    (d / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer file at .*tokenizer\.json"):
        load_hf_dir(d)
    (d / "config.json").unlink()
    (d / "config.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(FileNotFoundError, match=r"no model config at .*config\.json"):
        load_hf_dir(d)
