"""The model shape a runtime needs, read from a Hugging Face config.json or a
GGUF file's metadata."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

#: Hugging Face model_type / GGUF general.architecture values this runtime runs
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_position: int
    rope_scaling: Optional[dict] = None        # HF rope_scaling / rope_parameters (minus theta)
    rotary_dim: Optional[int] = None           # None: the whole head
    tie_embeddings: bool = False
    qkv_bias: bool = False
    eos_token_ids: list = field(default_factory=list)
    bos_token_id: Optional[int] = None
    # how the file stores the layer matrices: the GGUF type most of the blk.*
    # matrices have ("Q4_1", "Q8_0", "F16"...); None for Hugging Face files
    weight_type: Optional[str] = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position"):
            setattr(self, name, _int_at_least(name, getattr(self, name)))
        for name in ("rms_eps", "rope_theta"):
            setattr(self, name, _positive_finite(name, getattr(self, name)))
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        rd = self.rotary_dim
        if (isinstance(rd, bool) or not isinstance(rd, numbers.Integral)
                or not 2 <= rd <= self.head_dim or rd % 2):
            raise ValueError(f"rotary_dim must be an even int in [2, head_dim={self.head_dim}]; "
                             f"got {rd!r}")
        self.rotary_dim = int(rd)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")


def _int_at_least(name: str, v, lo: int = 1) -> int:
    """``v`` as an int, if it is one (bools are not) and is >= ``lo``; else ValueError."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    return int(v)


def _positive_finite(name: str, v) -> float:
    """``v`` as a float, if it is a finite real number > 0; else ValueError."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {v!r}")
    return float(v)


def _ids(v) -> list:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def from_hf_dict(d: dict) -> ModelConfig:
    """A ModelConfig from a parsed Hugging Face config.json."""
    arch = d.get("model_type", "llama")
    if arch not in LLAMA_FAMILY:
        raise ValueError(f"unsupported model_type {arch!r}; supported: {LLAMA_FAMILY}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r} (SwiGLU needs silu)")
    # checked under config.json's own key names, and before hidden_size // heads
    heads = _int_at_least("num_attention_heads", d["num_attention_heads"])
    hidden = _int_at_least("hidden_size", d["hidden_size"])
    kv_heads = d.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _int_at_least("num_key_value_heads", kv_heads)
    head_dim = d.get("head_dim")
    head_dim = hidden // heads if head_dim is None else _int_at_least("head_dim", head_dim)
    for key in ("vocab_size", "intermediate_size", "num_hidden_layers"):
        _int_at_least(key, d[key])
    max_pos = _int_at_least("max_position_embeddings", d.get("max_position_embeddings", 2048))
    eps = _positive_finite("rms_norm_eps", d.get("rms_norm_eps", 1e-6))
    # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta + rope_scaling
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = _positive_finite("rope_theta", rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
    partial = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if kind in (None, "default") else rope
    bias = d.get("attention_bias", arch == "qwen2")
    return ModelConfig(
        arch=arch, vocab_size=d["vocab_size"], hidden_size=hidden,
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, rms_eps=eps, rope_theta=theta,
        max_position=max_pos, rope_scaling=scaling,
        rotary_dim=int(head_dim * partial), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=bool(bias), eos_token_ids=_ids(d.get("eos_token_id")),
        bos_token_id=d.get("bos_token_id"))


def _gguf_rope_scaling(meta: dict, arch: str) -> Optional[dict]:
    """llama.cpp's rope.scaling.* keys as a Hugging Face rope_scaling dict."""
    p = f"{arch}.rope.scaling."
    kind = meta.get(p + "type")
    if kind in (None, "none"):
        return None
    factor = float(meta.get(p + "factor", 1.0))
    orig = meta.get(p + "original_context_length")
    out = {"rope_type": kind, "factor": factor}
    if orig is not None:
        out["original_max_position_embeddings"] = int(orig)
    if kind == "yarn":
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if p + key in meta:
                out[hf] = float(meta[p + key])
    elif kind not in ("linear", "yarn"):
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")
    return out


def from_gguf_metadata(meta: dict, tensor_names: set) -> ModelConfig:
    """A ModelConfig from GGUF metadata (llama.cpp key names)."""
    arch = meta["general.architecture"]
    if arch not in LLAMA_FAMILY:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {LLAMA_FAMILY}")

    def key(name, default=None):
        v = meta.get(f"{arch}.{name}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}")
        return v

    def count(name, default=None):
        # checked under the GGUF key's own name, and before hidden // heads
        return _int_at_least(f"{arch}.{name}", key(name, default))

    def positive(name, default=None):
        return _positive_finite(f"{arch}.{name}", key(name, default))

    heads, hidden = count("attention.head_count"), count("embedding_length")
    head_dim = count("attention.key_length", hidden // heads)
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    eos = _ids(meta.get("tokenizer.ggml.eos_token_id"))
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    return ModelConfig(
        arch=arch, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=count("feed_forward_length"), num_layers=count("block_count"),
        num_heads=heads, num_kv_heads=count("attention.head_count_kv", heads),
        head_dim=head_dim, rms_eps=positive("attention.layer_norm_rms_epsilon"),
        rope_theta=positive("rope.freq_base", 10000.0),
        max_position=count("context_length", 2048),
        rope_scaling=_gguf_rope_scaling(meta, arch),
        rotary_dim=meta.get(f"{arch}.rope.dimension_count", head_dim),
        # llama.cpp writes output.weight only when it is not the embedding matrix
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names, eos_token_ids=eos,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"))
