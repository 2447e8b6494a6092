"""The KV block pool: reference counts, prefix-cache keys, eviction order."""
import pytest

from kernelforge.runtime.block_pool import BlockPool, block_hashes


def test_hashes_chain_over_every_earlier_token():
    a = block_hashes(list(range(48)), 16, 3)
    b = block_hashes([99] + list(range(1, 48)), 16, 3)
    assert len(a) == 3 and all(x != y for x, y in zip(a, b))   # one token changes every key
    assert block_hashes(list(range(48)), 16, 2) == a[:2]


def test_match_register_free_and_evict():
    pool = BlockPool(4, 16)
    blocks = pool.allocate(2)
    hs = block_hashes(list(range(32)), 16, 2)
    for b, h in zip(blocks, hs):
        pool.register(b, h)
    assert pool.match(hs) == blocks and pool.num_free == 2     # shared: two references each
    pool.free(blocks)
    pool.free(blocks)
    assert pool.num_free == 4 and pool.num_cached == 2          # free but still cached
    assert pool.match(hs[:1]) == blocks[:1]                     # taken back out of the free list
    pool.free(blocks[:1])
    got = pool.allocate(4)                                      # evicts: keys dropped
    assert sorted(got) == [0, 1, 2, 3] and pool.num_cached == 0
    assert pool.match(hs) == []
    pool.free(got)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(got[:1])
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(5)
