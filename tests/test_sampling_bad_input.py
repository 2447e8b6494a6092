"""Bad arguments to sample and apply_penalties: an OpArgError naming the
argument, or (validate=False, bad rows) the documented token -1."""
import pytest
import torch

import kernelforge
from kernelforge.checks import OpArgError

ops = kernelforge.ops
X = torch.randn(3, 50)


@pytest.mark.parametrize("kw, arg", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=torch.tensor([1.0, -1.0, 1.0])), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_p=torch.tensor([0.5, 0.5, -0.1])), "top_p"),
    (dict(temperature=1.0, min_p=-0.1), "min_p"),
    (dict(temperature=1.0, min_p=1.01), "min_p"),
    (dict(temperature=torch.ones(2)), "temperature"),
    (dict(temperature=1.0, top_k=torch.ones(4, dtype=torch.int64)), "top_k"),
    (dict(temperature=1.0, top_k=2.5), "top_k"),
    (dict(temperature=1.0, top_k=torch.ones(3)), "top_k"),
    (dict(temperature=1.0, seeds=torch.ones(3, 1, dtype=torch.int64)), "seeds"),
    (dict(temperature=1.0, offsets=torch.zeros(5, dtype=torch.int64)), "offsets"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=1.0, logprobs=-1), "logprobs"),
    (dict(temperature=1.0, logprobs=51), "logprobs"),
])
def test_bad_parameters_name_the_argument(kw, arg):
    with pytest.raises(OpArgError, match=f"`{arg}`"):
        ops.sample(X, backend="eager", **kw)


@pytest.mark.parametrize("logits", [
    torch.randn(50), torch.randn(2, 3, 50), torch.randn(3, 50).double(),
    torch.randn(50, 3).t(), torch.empty(3, 0), [[0.0, 1.0]],
])
def test_bad_logits(logits):
    with pytest.raises(OpArgError, match="`logits`"):
        ops.sample(logits, temperature=1.0, backend="eager")


@pytest.mark.parametrize("backend", ["eager", "triton", "cpp"])
@pytest.mark.parametrize("what", ["nan", "all_neg_inf", "pos_inf"])
def test_bad_rows(backend, what):
    x = torch.randn(3, 50)
    if what == "nan":
        x[1, 7] = float("nan")
    elif what == "all_neg_inf":
        x[1] = float("-inf")
    else:
        x[1, 3] = float("inf")
    with pytest.raises(OpArgError, match="`logits`.*row 1"):
        ops.sample(x, temperature=1.0, backend=backend)
    tok, lp, _, _ = ops.sample(x, temperature=torch.tensor([1.0, 0.0, 1.0]), validate=False,
                               logprobs=0, backend=backend)
    assert tok[1] == -1 and torch.isnan(lp[1])
    assert 0 <= tok[0] < 50 and 0 <= tok[2] < 50        # other rows unaffected


def test_neg_inf_entries_are_never_drawn():
    x = torch.full((2000, 10), float("-inf"))
    x[:, 4] = 0.0
    x[:, 8] = 0.5
    tok = ops.sample(x, temperature=5.0, seeds=torch.arange(2000), backend="eager")
    assert set(tok.tolist()) == {4, 8}


def test_empty_batch():
    assert ops.sample(torch.empty(0, 10), temperature=1.0, backend="eager").shape == (0,)


@pytest.mark.parametrize("kw, arg", [
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=torch.ones(2)), "repetition_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(presence_penalty=float("inf")), "presence_penalty"),
])
def test_bad_penalties(kw, arg):
    ids = torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(OpArgError, match=f"`{arg}`"):
        ops.apply_penalties(X, ids, ids, **kw)


@pytest.mark.parametrize("name, ids", [
    ("prompt_tokens", torch.tensor([[0], [50], [1]])),
    ("prompt_tokens", torch.tensor([[0], [-2], [1]])),
    ("prompt_tokens", torch.zeros(2, 1, dtype=torch.int64)),
    ("prompt_tokens", torch.zeros(3, 1)),
])
def test_bad_token_ids(name, ids):
    ok = torch.zeros(3, 1, dtype=torch.int64)
    with pytest.raises(OpArgError, match=f"`{name}`"):
        ops.apply_penalties(X, ids, ok)
