"""A Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) on KernelForge ops.

RMSNorm, rotary embeddings, the KV-cache write and paged attention are
``kernelforge.ops``; the projections are torch matmuls. One forward runs a
flat batch of tokens from many sequences (vLLM's layout), so prefill chunks and
decode rows share a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kernelforge import devices, ops, rope
from kernelforge.kernels.attention import HEAD_SIZES

from . import hugepages
from .config import ModelConfig
from .quant import Int4Linear, Int8Linear, Q4_1Weight, RowSplitLinear, as_q4_1, tensor_bytes

#: values of LlamaModel(quantization=...)
QUANTIZATIONS = (None, "int4", "int8")


@dataclass
class AttnMetadata:
    """Where a step's tokens go and what they attend to (vLLM's convention)."""
    slot_mapping: torch.Tensor      # int64 [T]: block * block_size + row of each token
    block_tables: torch.Tensor      # int32 [B, max_blocks]
    seq_lens: torch.Tensor          # int32 [B]: context length, the step's tokens included
    query_start_loc: torch.Tensor   # int32 [B+1]: each sequence's first row in the batch


def _take_raw(w: dict, name: str, shape: tuple):
    """Pop ``name`` from ``w`` as loaded (a tensor or a Q4_1Weight), checked
    against the shape the config implies."""
    t = w.pop(name, None)
    if t is None:
        raise ValueError(f"weight {name} is missing")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"weight {name} has shape {tuple(t.shape)}; the config implies "
                         f"{tuple(shape)}")
    return t


def _dense(t, dtype, device=None) -> torch.Tensor:
    """A loaded weight as a contiguous ``dtype`` tensor on ``device`` (default:
    where it is; Q4_1 blocks dequantized)."""
    if isinstance(t, Q4_1Weight):
        t = t.dequantize()
    return t.to(device=device, dtype=dtype).contiguous()


def _take(w: dict, name: str, shape: tuple, dtype, device=None) -> torch.Tensor:
    """Pop ``name`` from ``w``, checked against the shape the config implies,
    as a dense ``dtype`` tensor on ``device``."""
    return _dense(_take_raw(w, name, shape), dtype, device)


def linear(x: torch.Tensor, w, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T + bias``.

    Args:
        x: activations [T, K] in the model dtype.
        w: a dense [N, K] tensor, or a quantized layer (``quant.Int4Linear`` /
            ``Int8Linear``), which holds its own bias.
        bias: [N] or None; for a dense ``w`` only (a quantized layer's is None).
    Returns:
        [T, N] in the model dtype.
    """
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if bias is not None:        # would be dropped silently: the layer adds its own
        raise ValueError("linear: a quantized layer holds its own bias; got a separate one")
    return w(x)


def _tensors(*items) -> list:
    """The tensors behind weights, quantized layers and None (skipped)."""
    out = []
    for it in items:
        if isinstance(it, torch.Tensor):
            out.append(it)
        elif it is not None:
            out += it.tensors()
    return out


class _Layer:
    """One decoder layer's weights. The matrices are dense ``dtype`` tensors, or
    with ``quantization`` Int4Linear / Int8Linear layers (RowSplitLinear ones
    with a dense copy when ``dense_from_rows`` is set; a qkv bias then lives in
    the qkv layer and ``qkv_bias`` is None); norms and biases stay ``dtype``."""

    def __init__(self, w: dict, p: str, c: ModelConfig, dtype,
                 quantization: Optional[str] = None, device=None,
                 dense_from_rows: Optional[int] = None, dense_dtype=None):
        H, q, kv, inter = (c.hidden_size, c.num_heads * c.head_dim,
                           c.num_kv_heads * c.head_dim, c.intermediate_size)

        def get(name, *shape):
            return _take(w, p + name, shape, dtype, device)

        def matrix(names, rows, cols, bias=None):
            """The row concatenation of weights ``names`` ([rows_i, cols] each):
            dense, or a quantized layer holding ``bias``. The Q4_1 blocks run
            along cols, so concatenating q, d and m row-wise fuses the quantized
            matrices exactly as the dense ones."""
            if quantization is None:
                ts = [get(n, r, cols) for n, r in zip(names, rows)]
                return ts[0] if len(ts) == 1 else torch.cat(ts)    # no copy of a single one
            parts = [_take_raw(w, p + n, (r, cols)) for n, r in zip(names, rows)]
            if quantization == "int4":
                layer = Int4Linear(Q4_1Weight.cat([as_q4_1(t) for t in parts]), bias)
            else:
                layer = Int8Linear(torch.cat([_dense(t, torch.float32) for t in parts]), bias)
            if dense_from_rows is None:
                return layer
            return RowSplitLinear(layer, torch.cat([_dense(t, dense_dtype) for t in parts]),
                                  dense_from_rows)

        self.input_norm = get("input_layernorm.weight", H)
        self.post_norm = get("post_attention_layernorm.weight", H)
        self.qkv_bias = None
        if c.qkv_bias:
            self.qkv_bias = torch.cat([get(f"self_attn.{n}_proj.bias", d)
                                       for n, d in zip("qkv", (q, kv, kv))])
        # q, k, v in one matmul; gate and up in another
        self.qkv = matrix([f"self_attn.{n}_proj.weight" for n in "qkv"], (q, kv, kv), H,
                          self.qkv_bias)
        if quantization is not None:
            self.qkv_bias = None            # held by the Int4Linear
        self.o = matrix(["self_attn.o_proj.weight"], (H,), q)
        self.gate_up = matrix(["mlp.gate_proj.weight", "mlp.up_proj.weight"], (inter, inter), H)
        self.down = matrix(["mlp.down_proj.weight"], (H,), inter)

    def tensors(self) -> list:
        return _tensors(self.input_norm, self.post_norm, self.qkv, self.qkv_bias, self.o,
                        self.gate_up, self.down)


def kv_bytes_per_block(config: ModelConfig, dtype: torch.dtype, block_size: int = 16) -> int:
    """Bytes of one KV-cache block over all layers: a key and a value tensor of
    [block_size, num_kv_heads, head_dim] per layer, as ``allocate_kv_cache`` makes them
    (a function of the config, so the pool can be sized before the model is built)."""
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim \
        * dtype.itemsize


class LlamaModel:
    """Weights plus the forward pass. ``weights`` uses Hugging Face names and layout.

    Args:
        config: the model shape.
        weights: {hf_name: tensor}; consumed (entries are popped).
        dtype: torch.float32 or torch.bfloat16 (weights, activations and KV cache).
        backend: the KernelForge backend for every op (None: chosen per device).
        rope_interleaved: rotate pairs (2i, 2i+1) (GPT-J style) instead of
            (i, i + d/2); right for llama-arch GGUF q/k rows left permuted.
        max_model_len: positions the rotary cache covers.
        checks: let the ops verify positions, slots and block tables (host syncs).
        quantization: None (dense ``dtype`` weights), "int4" or "int8":
            weight-only quantization for CPU decode (dtype float32 or bfloat16;
            the kernels compute on bf16 activations). With "int4" the layer
            matrices become ``quant.Int4Linear`` (GGUF Q4_1/Q4_0 blocks exactly,
            when the weights hold ``Q4_1Weight``s, ``load(..., keep_quantized=True)``;
            other weights quantized with Q4_1's scheme), with "int8"
            ``quant.Int8Linear`` (per-row absmax); the lm_head an Int8Linear
            either way; the embedding table, norms, biases and rotary table
            stay as without quantization.
        dense_from_rows: with ``quantization``, also keep a dense ``dtype`` copy
            of each quantized matrix, used for inputs of at least this many
            rows (``quant.RowSplitLinear``); None: quantized only.
        dense_dtype: the dtype of those copies (default ``dtype``).
        huge_pages: the dense weights (and ``allocate_kv_cache``'s caches) on
            2 MB pages where the OS gives them (``hugepages.py``); CPU only
            (ignored on another device).
        device: where the weights, the rotary table and the KV cache live and
            the forward runs (``device.resolve``; default: the best available).
            ``quantization`` is CPU only.
    """

    def __init__(self, config: ModelConfig, weights: dict, *, dtype=torch.float32,
                 backend: Optional[str] = None, rope_interleaved: bool = False,
                 max_model_len: Optional[int] = None, checks: bool = True,
                 quantization: Optional[str] = None, huge_pages: bool = True,
                 device=None, dense_from_rows: Optional[int] = None, dense_dtype=None):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        if quantization is not None and dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"quantization={quantization!r} needs dtype torch.bfloat16 or "
                             f"torch.float32 (torch's int4/int8 CPU kernels compute on bf16 "
                             f"activations), got {dtype}")
        if dense_from_rows is not None and (quantization is None or not isinstance(
                dense_from_rows, int) or isinstance(dense_from_rows, bool) or dense_from_rows < 1):
            raise ValueError(f"dense_from_rows must be an int >= 1 with a quantization, got "
                             f"{dense_from_rows!r} (quantization={quantization!r})")
        self.device = dev = devices.resolve(device)
        if quantization is not None and dev.type != "cpu":
            raise ValueError(f"quantization={quantization!r} runs torch's int4/int8 CPU kernels: "
                             f"it needs device 'cpu', got {str(dev)!r}")
        huge_pages = huge_pages and dev.type == "cpu"
        self.quantization, self.huge_pages = quantization, huge_pages
        c = self.config = config
        if c.head_dim not in HEAD_SIZES:       # found here, not in the first forward
            raise ValueError(f"head_dim {c.head_dim} is not one the attention ops support "
                             f"{HEAD_SIZES}")
        self.dtype, self.backend, self.checks = dtype, backend, checks
        self.is_neox = not rope_interleaved
        self.max_model_len = max_model_len or c.max_position
        w = weights          # popped as consumed: each source tensor is freed once copied
        V, H = c.vocab_size, c.hidden_size
        embed = _take_raw(w, "model.embed_tokens.weight", (V, H))
        self.embed = _dense(embed, dtype, dev)
        self.norm = _take(w, "model.norm.weight", (H,), dtype, dev)
        dense_dtype = dense_dtype or dtype
        self.layers = [_Layer(w, f"model.layers.{i}.", c, dtype, quantization, dev,
                              dense_from_rows, dense_dtype) for i in range(c.num_layers)]
        tied = c.tie_embeddings or "lm_head.weight" not in w
        if tied:
            w.pop("lm_head.weight", None)
        if quantization is None:
            self.lm_head = self.embed if tied else _take(w, "lm_head.weight", (V, H), dtype, dev)
        else:
            # the embedding is a row lookup (one row per token read): it keeps the
            # dense table; the head reads all V x H weights per token, so it is
            # requantized from the float (dequantized) weights to per-row int8.
            # int8, not int4, although int4 is faster: the gain is a small part
            # of a token, and an int4 head (Q8_0 rounded to 4 bits) moved the
            # likely tokens' log-softmax far more and flipped top-1 on a chat
            # prompt (docs/runtime.md, "Weight-only int4")
            src = embed if tied else _take_raw(w, "lm_head.weight", (V, H))
            self.lm_head = Int8Linear(src.dequantize() if isinstance(src, Q4_1Weight) else src)
            if dense_from_rows is not None:       # a tied head's dense copy is the table
                dense = (self.embed if tied and self.embed.dtype == dense_dtype
                         else _dense(src, dense_dtype, dev))
                self.lm_head = RowSplitLinear(self.lm_head, dense, dense_from_rows)
            del src
        del embed
        self.cos_sin = self._rope_cache(w.pop("rope_freqs", None)).to(dev)
        w = {k: v for k, v in w.items() if not k.endswith("rotary_emb.inv_freq")}
        if w:
            raise ValueError(f"unused weights: {sorted(w)[:5]}...")
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        if huge_pages:
            self._move_to_huge_pages()

    def _move_to_huge_pages(self) -> None:
        """The dense weights into one buffer on 2 MB pages (hugepages.py: each
        step streams them all, and its matmuls run a little faster on them:
        docs/runtime.md, "Measured: 32 prompts paired with vLLM").
        Quantized layers keep their own storage."""
        names = ("input_norm", "post_norm", "qkv", "qkv_bias", "o", "gate_up", "down")
        slots = [(self, "embed"), (self, "norm"), (self, "lm_head")] + \
            [(layer, n) for layer in self.layers for n in names]
        hugepages.move_attributes([(o, n) for o, n in slots
                                   if isinstance(getattr(o, n), torch.Tensor)])

    def _rope_cache(self, freq_factors: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.config
        if freq_factors is None:
            return rope.cos_sin_cache(c.rotary_dim, self.max_model_len, c.rope_theta,
                                      c.rope_scaling)
        # llama.cpp stores llama3 scaling as per-frequency divisors (rope_freqs.weight)
        inv, _ = rope.inv_freq_and_attention_factor(c.rotary_dim, c.rope_theta, None,
                                                    self.max_model_len)
        freqs = torch.outer(torch.arange(self.max_model_len, dtype=torch.float32),
                            inv / freq_factors.float())
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def weight_bytes(self) -> int:
        """Bytes of the tensors the model holds (weights and the rotary table;
        a tied head counted once)."""
        ts = _tensors(self.embed, self.norm, self.lm_head, self.cos_sin)
        ts += [t for layer in self.layers for t in layer.tensors()]
        return tensor_bytes(ts)

    def weight_bytes_read(self, rows: int = 1) -> int:
        """Bytes of weights one step of ``rows`` rows reads from memory: every
        matrix once (a quantized layer's copy for that many rows), the norms,
        and ``rows`` rows of the embedding table. The numerator of a decode
        step's memory roofline (bench/test_runtime_bench.py)."""
        def read(m):
            if isinstance(m, RowSplitLinear):
                m = m.dense if rows >= m.dense_from_rows else m.quantized
            return _tensors(m)
        ts = read(self.norm) + read(self.lm_head)
        for layer in self.layers:
            ts += [t for m in (layer.input_norm, layer.post_norm, layer.qkv, layer.qkv_bias,
                               layer.o, layer.gate_up, layer.down) for t in read(m)]
        head_is_table = any(t.data_ptr() == self.embed.data_ptr() for t in read(self.lm_head))
        rows_read = 0 if head_is_table else rows * self.embed[0].nbytes
        return tensor_bytes(ts) + rows_read

    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16) -> list:
        """One (key_cache, value_cache) pair per layer, [num_blocks, block_size, Hkv, D]."""
        c = self.config
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        if not self.huge_pages:
            return [tuple(torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(2)) for _ in range(c.num_layers)]
        caches = hugepages.zeros(shape, self.dtype, 2 * c.num_layers)
        return list(zip(caches[0::2], caches[1::2]))

    def kv_bytes_per_block(self, block_size: int = 16) -> int:
        return kv_bytes_per_block(self.config, self.dtype, block_size)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata,
                kv_caches: list, logits_indices: Optional[torch.Tensor] = None,
                checks: Optional[bool] = None, float_logits: bool = True) -> torch.Tensor:
        """Logits for the rows ``logits_indices`` (default: every row).

        input_ids, positions: int64 [T]; meta: the step's paging; kv_caches: from
        ``allocate_kv_cache``, written in place; checks: overrides the model's
        ``checks`` for this call (a captured graph runs without the ops' host
        checks: its runner checks the values instead); float_logits: float32
        logits (default), else the model's dtype (the engine: its sampler
        widens them only where it computes on them, sampler.py).
        """
        c, be = self.config, self.backend
        checks = self.checks if checks is None else checks
        T = input_ids.shape[0]
        h = F.embedding(input_ids, self.embed)
        residual = None
        # each row's key range and the table checks are the same in every
        # layer: derived once per step (the op checks the tables on first use)
        plan = ops.paged_attention_plan(meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                        check_tables=checks)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            # every layer gets the same positions, slots and tables and caches of
            # one shape: checking them in the first layer checks them for all
            chk = checks and i == 0
            if residual is None:
                residual = h
                h = ops.rms_norm(h, layer.input_norm, c.rms_eps, backend=be)
            else:
                h, residual = ops.fused_add_rms_norm(h, residual, layer.input_norm, c.rms_eps,
                                                     backend=be)
            qkv = linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = ops.rotary_embedding(positions, q, k, c.head_dim, self.cos_sin, self.is_neox,
                                        check_positions=chk, backend=be)
            k = k.view(T, c.num_kv_heads, c.head_dim)
            v = v.view(T, c.num_kv_heads, c.head_dim)   # a strided row view of qkv
            ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping,
                                  check_slots=chk, backend=be)
            o = ops.paged_attention(q.view(T, c.num_heads, c.head_dim), k_cache, v_cache,
                                    meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                    check_tables=checks, plan=plan, backend=be)
            h = linear(o.reshape(T, self.q_size), layer.o)
            h, residual = ops.fused_add_rms_norm(h, residual, layer.post_norm, c.rms_eps,
                                                 backend=be)
            h = linear(ops.silu_and_mul(linear(h, layer.gate_up), backend=be), layer.down)
        if logits_indices is not None:
            h, residual = h[logits_indices], residual[logits_indices]
        h, _ = ops.fused_add_rms_norm(h, residual, self.norm, c.rms_eps, backend=be)
        logits = linear(h, self.lm_head)
        return logits.float() if float_logits else logits
