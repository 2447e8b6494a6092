"""The engine's sampler (kernelforge/runtime/sampler.py) takes the model's
logits in its own dtype: a bf16 model's logits are not widened to fp32 in
the forward. Whatever it computes on them must match the same logits widened
first (bf16 values are exact in fp32): greedy rows, penalties (applied in
fp32, not rounded back to bf16), seeded sampling and logprobs."""
import copy

import pytest
import torch

from kernelforge.runtime import SamplingParams
from kernelforge.runtime.sampler import sample
from kernelforge.runtime.sequence import Sequence

V = 500


def _seqs(params):
    g = torch.Generator().manual_seed(3)
    out = []
    for i, p in enumerate(params):
        s = Sequence(torch.randint(0, V, (5 + i,), generator=g).tolist(), p)
        s.output_ids = torch.randint(0, V, (i,), generator=g).tolist()
        out.append(s)
    return out


PARAMS = {
    "greedy": [SamplingParams(temperature=0)] * 4,
    "penalties": [SamplingParams(temperature=0, repetition_penalty=1.3,
                                 frequency_penalty=0.4, presence_penalty=0.7)] * 4,
    "seeded": [SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=7 + i)
               for i in range(4)],
    "logprobs": [SamplingParams(temperature=0, logprobs=3)] * 4,
}


@pytest.mark.parametrize("case", sorted(PARAMS))
def test_bf16_logits_sample_as_their_float32_widening(case):
    g = torch.Generator().manual_seed(11)
    # a tie between bf16 values in row 0: both widenings keep it, the first wins
    logits = (torch.randn(4, V, generator=g) * 3).bfloat16()
    logits[0, 17] = logits[0, 300] = logits[0].max() + 1
    a = _seqs(PARAMS[case])
    for i in (1, 2, 3):       # rows 1-3 favour a prompt token: the penalties move them
        logits[i, a[i].prompt_ids[0]] = logits[i].max() + 0.5
    b = copy.deepcopy(a)
    got = sample(logits, a)
    want = sample(logits.float(), b)
    assert got == want
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    if case in ("greedy", "logprobs"):
        assert got[0] == 17 and got == logits.float().argmax(-1).tolist()
    if case == "penalties":    # the penalties changed something (the test can fail)
        assert got != sample(logits, _seqs(PARAMS["greedy"]))
