"""Sampling filters and parameter checks."""

import pytest
import torch

from optgptq_compile.runtime.sampling import SamplingParams, filter_logits, make_generator, sample


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0])
    kept = filter_logits(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    # sorted: 0.5, 0.3 (cum 0.8), 0.1 (cum 0.9) ... with top_p=0.85 the third is still needed
    assert filter_logits(logits, 0, 0.85).isfinite().tolist() == [False, True, True, True, False]
    assert filter_logits(logits, 0, 0.75).isfinite().tolist() == [False, True, False, True, False]
    assert filter_logits(logits, 0, 0.01).isfinite().tolist() == [False, True, False, False, False]


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.tensor([0.0, 1.0, 2.0, -5.0])
    params = SamplingParams(temperature=1.0, seed=3)
    draws = [sample(logits, params, g) for g in [make_generator(params, torch.device("cpu"))] for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits, 0), atol=0.03, rtol=0)
    again = make_generator(params, torch.device("cpu"))
    assert [sample(logits, params, again) for _ in range(20)] == draws[:20]
    assert sample(logits, SamplingParams(), None) == 2  # temperature 0: greedy


@pytest.mark.parametrize("kw,match", [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"),
                                      (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
