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


def test_cached_tokens_count_admissions_not_tries():
    """A waiting head whose cached prefix matches but whose remaining blocks do not
    fit is matched and released again on every step; only its admission counts."""
    from kernelforge.runtime.sampling_params import SamplingParams
    from kernelforge.runtime.scheduler import Scheduler
    from kernelforge.runtime.sequence import Sequence

    sched = Scheduler(BlockPool(4, 4), max_num_seqs=4, max_num_batched_tokens=64)

    def step():
        # what LLM.step does around the model: computed tokens, full blocks cached,
        # one new token for each sequence whose prompt and outputs are all computed
        out = sched.schedule()
        for seq, n in out:
            seq.num_computed += n
            sched.cache_full_blocks(seq, seq.num_computed - n)
            if seq.num_computed == seq.num_tokens:
                seq.output_ids.append(200)
        return out

    a = Sequence(list(range(9)), SamplingParams())          # 3 blocks of the pool's 4
    sched.add(a)
    step()
    b = Sequence(list(range(8)) + list(range(100, 108)), SamplingParams())  # 2 blocks cached
    sched.add(b)
    for _ in range(3):                                      # a decodes; b waits at the head
        assert [s for s, _ in step()] == [a]                # b's 2 uncached blocks: 1 free
    assert sched.waiting[0] is b and not b.block_table and sched.num_cached_tokens == 0
    sched.finish(a, "length")
    assert step() == [(b, 8)]                               # computes only the uncached half
    assert sched.num_cached_tokens == 8 <= len(a.prompt_ids) + len(b.prompt_ids)
