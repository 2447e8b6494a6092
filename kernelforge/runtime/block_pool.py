"""The paged KV cache's block allocator, with prefix caching.

Blocks are reference counted. A block whose tokens are all computed can be
registered under a hash of its tokens and of every token before it (a chain:
block j's key covers tokens [0, (j + 1) * block_size)); a later sequence
whose prompt starts with the same tokens reuses it instead of computing
them again. A block nobody references is free; if it is registered it keeps
its contents and its key until it is handed out again (least recently
freed first), so ``num_free`` counts cached blocks too.
"""
from __future__ import annotations

from collections import OrderedDict


def block_hashes(token_ids: list[int], block_size: int, n_blocks: int) -> list[int]:
    """Chained keys of the first ``n_blocks`` full blocks of ``token_ids``."""
    out, h = [], None
    for j in range(n_blocks):
        h = hash((h, tuple(token_ids[j * block_size:(j + 1) * block_size])))
        out.append(h)
    return out


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref: dict[int, int] = {}
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Registered blocks (in use or free)."""
        return len(self._hash_of)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {n} blocks asked, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)       # least recently freed
            h = self._hash_of.pop(b, None)              # its old contents are overwritten
            if h is not None:
                del self._by_hash[h]
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._ref.get(b, 0) < 1:
                raise RuntimeError(f"block {b} freed twice or never allocated")
            self._ref[b] -= 1
            if not self._ref[b]:
                del self._ref[b]
                self._free[b] = None

    def match(self, hashes: list[int]) -> list[int]:
        """Take a reference on the cached blocks of the longest prefix of ``hashes``."""
        out = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            if b in self._free:
                del self._free[b]
            self._ref[b] = self._ref.get(b, 0) + 1
            out.append(b)
        return out

    def register(self, block: int, h: int) -> None:
        """``block`` (referenced, its tokens computed) holds the tokens keyed ``h``."""
        if h in self._by_hash or block in self._hash_of:
            return                                      # an equal block is cached already
        self._by_hash[h] = block
        self._hash_of[block] = h
