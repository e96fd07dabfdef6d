"""Sampling: properties of each filter (hypothesis), greedy at temperature 0, and a seeded RNG
whose state round-trips exactly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from driftwood.model.sampling import (
    SamplingParams,
    frequency_presence_penalty,
    generator_state,
    min_p,
    new_generator,
    repetition_penalty,
    sample,
    set_generator_state,
    top_k,
    top_p,
)

logit_lists = st.lists(st.floats(min_value=-30, max_value=30, allow_nan=False, width=32),
                       min_size=1, max_size=64)


def finite(x: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(x)).flatten().tolist())


@given(logit_lists, st.integers(min_value=0, max_value=70))
def test_top_k(values, k):
    x = torch.tensor(values)
    kept = finite(top_k(x, k))
    assert int(x.argmax()) in kept
    if 0 < k < len(values):
        kth = torch.topk(x, k).values[-1]
        assert kept == {i for i, v in enumerate(values) if v >= kth}  # ties at the k-th kept
        assert len(kept) >= k
    else:
        assert len(kept) == len(values)


@given(logit_lists, st.floats(min_value=0.01, max_value=1.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(values, p):
    x = torch.tensor(values)
    kept = finite(top_p(x, p))
    probs = x.softmax(-1)
    assert int(x.argmax()) in kept
    if p < 1.0:
        mass = float(probs[sorted(kept)].sum())
        dropped_max = max((float(probs[i]) for i in range(len(values)) if i not in kept), default=0.0)
        assert mass >= p - 1e-5 or len(kept) == len(values)
        # every kept token is at least as likely as every dropped one
        assert all(float(probs[i]) >= dropped_max - 1e-7 for i in kept)
        # dropping the least likely kept token would fall short of p
        smallest = min(float(probs[i]) for i in kept)
        assert len(kept) == 1 or mass - smallest < p + 1e-5


@given(logit_lists, st.floats(min_value=0.0, max_value=1.0))
def test_min_p(values, p):
    x = torch.tensor(values)
    probs = x.softmax(-1)
    kept = finite(min_p(x, p))
    assert kept == {i for i in range(len(values)) if probs[i] >= p * probs.max()}


@given(logit_lists, st.lists(st.integers(min_value=0, max_value=63), max_size=20),
       st.floats(min_value=1.0, max_value=3.0))
def test_repetition_penalty_only_lowers_seen_tokens(values, history, penalty):
    x = torch.tensor(values)
    out = repetition_penalty(x, [h for h in history if h < len(values)], penalty)
    seen = {h for h in history if h < len(values)}
    for i, (before, after) in enumerate(zip(x.tolist(), out.tolist(), strict=True)):
        if i in seen:
            assert after <= before
        else:
            assert after == before


@given(logit_lists, st.lists(st.integers(min_value=0, max_value=63), max_size=40),
       st.floats(min_value=-2.0, max_value=2.0), st.floats(min_value=-2.0, max_value=2.0))
def test_frequency_and_presence_penalties_follow_the_counts(values, history, frequency, presence):
    """Against a plain loop over llama.cpp's definition: logit -= count * frequency + presence."""
    x = torch.tensor(values)
    history = [h for h in history if h < len(values)]
    out = frequency_presence_penalty(x, history, frequency, presence)
    for i, (before, after) in enumerate(zip(x.tolist(), out.tolist(), strict=True)):
        count = history.count(i)
        want = before - (count * frequency + presence) if count else before
        assert after == pytest.approx(want, rel=1e-6, abs=1e-5)


def test_penalties_apply_to_the_recent_window_only():
    """A token seen only before the last ``repeat_last_n`` tokens is not penalized."""
    logits = torch.zeros(4)
    logits[2] = 1.0
    params = SamplingParams(presence_penalty=5.0, repeat_last_n=2)
    assert sample(logits, params, new_generator(0), history=[2, 0, 1]) == 2
    assert sample(logits, params, new_generator(0), history=[0, 2, 1]) != 2


@settings(deadline=None)
@given(logit_lists, st.floats(min_value=0.1, max_value=2.0), st.integers(0, 10),
       st.floats(min_value=0.1, max_value=1.0), st.floats(min_value=0.0, max_value=0.5),
       st.integers(0, 2**32))
def test_sample_draws_a_surviving_token(values, temperature, k, p, mp, seed):
    x = torch.tensor(values)
    params = SamplingParams(temperature=temperature, top_k=k, top_p=p, min_p=mp)
    token = sample(x, params, new_generator(seed))
    allowed = finite(min_p(top_p(top_k(x / temperature, k), p), mp))
    assert token in allowed


@given(logit_lists)
def test_temperature_zero_is_greedy(values):
    x = torch.tensor(values)
    assert sample(x, SamplingParams(), new_generator(0)) == int(x.argmax())


def test_seeded_draws_repeat_and_state_round_trips():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3
    params = SamplingParams(temperature=1.0)
    g1, g2 = new_generator(42), new_generator(42)
    assert [sample(x, params, g1) for _ in range(20)] == [sample(x, params, g2) for _ in range(20)]
    state = generator_state(g1)
    ahead = [sample(x, params, g1) for _ in range(50)]
    g3 = new_generator(7)
    set_generator_state(g3, state)
    assert generator_state(g3) == state
    assert [sample(x, params, g3) for _ in range(50)] == ahead
    assert len(set(ahead)) > 5  # really sampling


def test_sampling_distribution_follows_the_probabilities():
    x = torch.tensor([0.0, math.log(3.0)])  # p = 0.25, 0.75
    g = new_generator(0)
    draws = [sample(x, SamplingParams(temperature=1.0), g) for _ in range(4000)]
    assert 0.72 < sum(draws) / len(draws) < 0.78


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=2, max_size=64),
       st.sampled_from([5e-324, 1e-46, 1e-40, 1e-30, 1e-6, 1.0]), st.integers(0, 2**32))
def test_any_logits_over_any_temperature_draw_a_likely_token(values, temperature, seed):
    """Scaling can overflow float32 (3e38 / 1e-6, or -1 / 1e-40): the draw is still a token
    that float64 softmax gives a probability above zero (only the largest logits, when the
    temperature is tiny)."""
    x = torch.tensor(values)
    token = sample(x, SamplingParams(temperature=temperature), new_generator(seed))
    p = ((x.double() - x.double().max()) / temperature).softmax(-1)
    assert p[token] > 0


@pytest.mark.parametrize("temperature", [5e-324, 1e-46, 1e-40])
def test_a_temperature_below_float32s_range_draws_among_the_largest(temperature):
    x = torch.tensor([-1.0, 0.5, 0.5, -3.0, 0.25])
    assert {sample(x, SamplingParams(temperature=temperature), new_generator(s)) for s in range(40)} == {1, 2}


def test_infinite_nan_and_missing_logits():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([0.0, inf, 5.0, inf, -inf, nan])
    assert {sample(x, SamplingParams(temperature=0.7), new_generator(s)) for s in range(40)} == {1, 3}
    x = torch.tensor([nan, 1.0, 2.0, nan])  # NaN is never drawn, greedy or sampled
    assert sample(x, SamplingParams(), new_generator(0)) == 2
    assert {sample(x, SamplingParams(temperature=1.0), new_generator(s)) for s in range(40)} == {1, 2}
    for hopeless in ([-inf] * 4, [nan, -inf, nan]):
        with pytest.raises(ValueError, match="nothing to sample"):
            sample(torch.tensor(hopeless), SamplingParams(temperature=1.0), new_generator(0))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(min_p=1.5),
                                 dict(repetition_penalty=0.0), dict(top_k=-1), dict(temperature=float("nan")),
                                 dict(temperature=float("inf")), dict(repetition_penalty=float("inf")),
                                 dict(frequency_penalty=float("nan")), dict(presence_penalty=float("inf"))])
def test_invalid_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
