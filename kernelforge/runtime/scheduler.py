"""Continuous batching: which tokens of which sequences run in the next forward.

Each step takes up to ``max_num_batched_tokens`` tokens: first the running
sequences, oldest first (one token for a decode row, the next chunk for a
prefill that did not fit in one step), then new sequences from the waiting
queue (their prompt chunked to what is left of the budget). Blocks are taken
from the pool as a sequence's tokens need them; when the pool runs dry the
newest running sequence is preempted: its blocks are freed and it goes back
to the front of the queue, to be recomputed (prompt and output so far) later.
With prefix caching a starting sequence first takes the cached blocks of its
longest cached prefix (block_pool.py) and computes only the rest.
"""
from __future__ import annotations

from collections import deque

from .block_pool import BlockPool, block_hashes
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix_caching: bool = True):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0          # prompt tokens served from cached blocks

    def _reuse_cached_prefix(self, seq: Sequence) -> None:
        """A sequence about to start takes the cached blocks of its longest
        cached prefix of full blocks (at least one token is left to compute:
        its logits are needed)."""
        if not self.prefix_caching or seq.block_table or seq.num_computed:
            return
        bs = self.pool.block_size
        blocks = self.pool.match(block_hashes(seq.token_ids, bs, (seq.num_tokens - 1) // bs))
        seq.block_table = blocks
        seq.num_computed = len(blocks) * bs

    def cache_full_blocks(self, seq: Sequence, before: int) -> None:
        """After a forward took ``seq`` from ``before`` to ``seq.num_computed``
        tokens: register the blocks it filled."""
        if not self.prefix_caching:
            return
        bs = self.pool.block_size
        first, last = before // bs, seq.num_computed // bs
        if last > first:
            hashes = block_hashes(seq.token_ids, bs, last)
            for j in range(first, last):
                self.pool.register(seq.block_table[j], hashes[j])

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` the blocks for its first ``num_tokens`` tokens, if the pool can."""
        need = self.pool.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of its next tokens to compute)] for one forward."""
        budget = self.max_num_batched_tokens
        out: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._reserve(seq, seq.num_computed + n):
                victim = self.running[-1]         # the newest; never one scheduled already
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            out.append((seq, n))
            budget -= n
            i += 1
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            self._reuse_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n):
                self._release(seq)              # stays waiting, holding nothing
                break
            # counted on admission only: a head that waits matches again each step
            self.num_cached_tokens += seq.num_computed
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append((seq, n))
            budget -= n
        return out
