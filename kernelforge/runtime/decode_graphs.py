"""Decode steps replayed from captured graphs (``kernelforge.graph``), vLLM's
CUDA-graph mode for any device.

A step whose rows are all decode rows (one new token per sequence) has the
same shapes every time for a given batch size, so its forward is captured
once per size and replayed: the ~300 op calls of a step stop costing their
Python (checks, dispatch, argument packing: a large share of a batch-1 token
on a CPU; docs/runtime.md, "Decode graphs"). Batches are padded up to the
next captured size (1, 2, 4, then multiples of 8, as vLLM does); padding rows
write nothing (slot -1) and their logits are dropped. Prefill and mixed steps
run op by op, uncaptured.

The graphs read fixed input tensors, filled here before each replay; the
block tables are as wide as the longest sequence allowed, and a row's entries
are rewritten only when its table changed.
"""
from __future__ import annotations

import torch

from kernelforge import graph

from .model import AttnMetadata


def capture_sizes(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, then multiples of 8,
    then ``max_batch`` itself."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


class DecodeGraphs:
    """Captured decode forwards of ``model``, one per batch size, made on first use.

    Args:
        model: the ``LlamaModel``; kv_caches: its caches (the graphs write them).
        max_batch: most rows a step can have (``max_num_seqs``).
        block_size, num_blocks: the paged cache's.
        max_model_len: longest sequence; sets the block tables' width.
        checks: range-check positions and block ids (in Python, per step)
            instead of the ops' host checks, which a graph cannot run.

    A subclass captures another kind of graph over the same inputs by
    overriding ``capture`` and ``replay`` (``cuda_graphs.py``).
    """

    def __init__(self, model, kv_caches: list, max_batch: int, block_size: int,
                 num_blocks: int, max_model_len: int, checks: bool = True):
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_model_len, self.checks = max_model_len, checks
        self.sizes = capture_sizes(max_batch)
        width = -(-max_model_len // block_size)
        dev = model.device
        self.tokens = torch.zeros(3, max_batch, dtype=torch.int64, device=dev)  # ids, pos, slots
        self.tables = torch.zeros(max_batch, width, dtype=torch.int32, device=dev)
        self.lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.starts = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)  # one row each
        self._written: list = [None] * max_batch     # each table row's entries as last written
        self.graphs: dict = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _graph(self, size: int):
        g = self.graphs.get(size)
        if g is None:
            ids, pos, slots = self.tokens[:, :size]
            meta = AttnMetadata(slot_mapping=slots, block_tables=self.tables[:size],
                                seq_lens=self.lens[:size], query_start_loc=self.starts[:size + 1])
            g = self.graphs[size] = self.capture(
                lambda: self.model.forward(ids, pos, meta, self.kv_caches, checks=False,
                                           float_logits=False))
        return g

    def capture(self, forward):
        """A graph of ``forward()`` (the step on the current inputs; runs it)."""
        with torch.inference_mode():
            return graph.capture(forward)

    def replay(self, g) -> torch.Tensor:
        """Run graph ``g`` on the inputs' current contents; its logits."""
        return g.replay()

    def run(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]
            ) -> torch.Tensor:
        """Logits [n, vocab] (the model's dtype) of one decode step: row i is token
        ``tokens[i]`` at ``positions[i]`` of the sequence whose blocks are
        ``block_tables[i]``. The result is the graph's output tensor: valid
        until the next call."""
        n = len(tokens)
        size = next(s for s in self.sizes if s >= n)
        bs = self.block_size
        if self.checks:
            self._check(positions, block_tables)
        slots = [bt[p // bs] * bs + p % bs for p, bt in zip(positions, block_tables)]
        pad = size - n          # padding rows: token 0 at position 0, written nowhere
        self.tokens[:, :size] = torch.tensor([tokens + [0] * pad, positions + [0] * pad,
                                              slots + [-1] * pad])
        self.lens[:size] = torch.tensor([p + 1 for p in positions] + [1] * pad,
                                        dtype=torch.int32)
        written = self._written
        for i, bt in enumerate(block_tables):
            if written[i] != bt:
                self.tables[i, :len(bt)] = torch.tensor(bt, dtype=torch.int32)
                written[i] = list(bt)
        return self.replay(self._graph(size))[:n]

    def _check(self, positions: list[int], block_tables: list[list[int]]) -> None:
        bs, nb = self.block_size, self.num_blocks
        for i, (p, bt) in enumerate(zip(positions, block_tables)):
            if not 0 <= p < self.max_model_len:
                raise ValueError(f"decode row {i}: position {p} outside [0, "
                                 f"{self.max_model_len}) (max_model_len)")
            used = bt[:p // bs + 1]
            if len(used) <= p // bs or not all(0 <= b < nb for b in used):
                raise ValueError(f"decode row {i}: block table {bt} does not hold position "
                                 f"{p} in {nb} blocks of {bs}")
