"""pt2llm.sampling: the filters against transformers' logits warpers, and the draws against
the distribution they define."""
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from pt2llm.sampling import GREEDY, Sampling, next_tokens, probabilities

SETTINGS = [Sampling(0.7), Sampling(1.3, top_k=10), Sampling(0.9, top_p=0.8), Sampling(1.0, top_k=20, top_p=0.5),
            Sampling(0.5, top_k=3, top_p=0.99), Sampling(2.0, top_p=0.05), Sampling(1.0, top_k=100),
            Sampling(1.0, min_p=0.1), Sampling(1.7, top_k=30, top_p=0.9, min_p=0.05), Sampling(0.8, min_p=0.5),
            Sampling(1.2, repetition_penalty=1.3), Sampling(0.9, top_k=12, min_p=0.02, repetition_penalty=0.7)]


def _transformers(logits, s, input_ids=None):
    """The distribution transformers' generate(do_sample=True, ...) draws from."""
    scores = logits.clone()
    if s.repetition_penalty != 1:
        scores = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(input_ids, scores)
    scores = TemperatureLogitsWarper(s.temperature)(None, scores)
    if s.top_k:
        scores = TopKLogitsWarper(s.top_k)(None, scores)
    if s.top_p < 1:
        scores = TopPLogitsWarper(s.top_p)(None, scores)
    if s.min_p > 0:
        scores = MinPLogitsWarper(s.min_p)(None, scores)
    return scores.softmax(-1)


def _seen(input_ids, vocab):
    return torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool).scatter_(1, input_ids, True)


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s.describe())
def test_distribution_is_transformers(s):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=gen) * 3
    input_ids = torch.randint(0, 50, (8, 12), generator=gen)  # the tokens so far (repetition penalty)
    ours, theirs = probabilities(logits, s, _seen(input_ids, 50)), _transformers(logits, s, input_ids)
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens stay in the draw
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours.sum(-1), torch.ones(8))


@pytest.mark.parametrize("s", [Sampling(1.0), Sampling(0.6, top_k=4), Sampling(1.5, top_p=0.7)],
                         ids=lambda s: s.describe())
def test_draws_follow_the_distribution(s):
    logits = torch.tensor([2.0, 1.5, 0.3, 0.0, -0.7, -3.0, 1.0, 0.9])
    n = 40000
    rows = logits.expand(n, -1)
    got = next_tokens(rows, s, torch.Generator().manual_seed(1))
    assert got.shape == (n, 1) and got.dtype == torch.long
    freq = torch.bincount(got[:, 0], minlength=8).double() / n
    p = probabilities(logits, s).double()
    assert (freq[p == 0] == 0).all()  # nothing outside the filters, ever
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)


def test_greedy_and_top_one_are_the_argmax():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(2))
    best = logits.argmax(-1, keepdim=True)
    assert torch.equal(next_tokens(logits, GREEDY), best)
    assert torch.equal(next_tokens(logits, Sampling(5.0, top_k=1), torch.Generator().manual_seed(3)), best)
    assert torch.equal(next_tokens(logits, Sampling(5.0, top_p=1e-6), torch.Generator().manual_seed(3)), best)
    assert torch.equal(probabilities(logits, GREEDY).argmax(-1, keepdim=True), best)


@pytest.mark.parametrize("penalty", [1.5, 0.6])
def test_greedy_with_a_repetition_penalty_is_transformers_argmax(penalty):
    """Greedy decoding takes the penalty too (transformers applies it as a logits processor,
    before any warper); without the tokens seen it is refused."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(16, 40, generator=gen) * 2
    input_ids = torch.randint(0, 40, (16, 10), generator=gen)
    s = Sampling(repetition_penalty=penalty)
    want = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone()).argmax(-1, keepdim=True)
    got = next_tokens(logits, s, seen=_seen(input_ids, 40))
    assert torch.equal(got, want)
    assert not torch.equal(got, logits.argmax(-1, keepdim=True))  # the penalty changed some choices
    with pytest.raises(ValueError, match="seen"):
        next_tokens(logits, s)


def test_min_p_one_keeps_only_the_most_likely_token():
    logits = torch.randn(32, 25, generator=torch.Generator().manual_seed(4))
    draws = next_tokens(logits, Sampling(3.0, min_p=1.0), torch.Generator().manual_seed(5))
    assert torch.equal(draws, logits.argmax(-1, keepdim=True))


def test_a_seed_gives_the_same_draws_and_another_seed_others():
    logits = torch.zeros(4, 1000)  # uniform: every draw is noise
    s = Sampling(1.0)
    a = next_tokens(logits, s, torch.Generator().manual_seed(7))
    assert torch.equal(a, next_tokens(logits, s, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, next_tokens(logits, s, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(temperature=float("inf")), dict(temperature=float("nan")),
                                dict(temperature=1, top_k=-1), dict(temperature=1, top_p=0),
                                dict(temperature=1, top_p=1.5), dict(temperature=1, min_p=-0.1),
                                dict(temperature=1, min_p=1.5), dict(repetition_penalty=0),
                                dict(repetition_penalty=-1.2), dict(repetition_penalty=float("inf")),
                                dict(repetition_penalty=float("nan"))])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        Sampling(**kw)


def test_describe():
    assert GREEDY.describe() == "greedy"
    assert Sampling(0.7, top_k=40, top_p=0.95, seed=3).describe() == \
        "sampled (temperature 0.7, top-k 40, top-p 0.95, seed 3)"
    assert Sampling(1.0, min_p=0.05, repetition_penalty=1.2).describe() == \
        "sampled (temperature 1, min-p 0.05, repetition penalty 1.2, seed 0)"
    assert Sampling(repetition_penalty=1.1).describe() == "greedy (repetition penalty 1.1)"
