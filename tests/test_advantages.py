"""rlad_megatron.advantages: GRPO group normalisation, dynamic-sampling filter, token broadcast."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.advantages import broadcast_to_tokens, dynamic_sampling_mask, grpo_advantages


def test_grpo_advantages_known_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    a = grpo_advantages(r, eps=0.0)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))  # mean .5, population std .5
    std = (0.5) ** 0.5  # row 1: mean 1, deviations (1, -1, 0, 0), population var 0.5
    torch.testing.assert_close(a[1], torch.tensor([1.0, -1.0, 0.0, 0.0]) / std)


def test_population_std_and_eps():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 8, generator=g, dtype=torch.float64)
    a = grpo_advantages(r, eps=1e-3)
    ref = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-3)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(a.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_constant_groups_are_exactly_zero():
    r = torch.tensor([[0.1, 0.1, 0.1], [7.0, 7.0, 7.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert r[0].mean() != 0.1  # floating-point mean is off by an ulp: plain (r - mean) would not be zero
    a = grpo_advantages(r)
    assert torch.equal(a[:2], torch.zeros(2, 3, dtype=torch.float64))
    assert (a[2] != 0).all()
    assert torch.equal(grpo_advantages(torch.tensor([[3.0], [1.0]])), torch.zeros(2, 1))


def test_integer_rewards_and_dynamic_sampling():
    r = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    assert grpo_advantages(r).dtype == torch.float32
    assert dynamic_sampling_mask(r).tolist() == [False, True, False]
    assert dynamic_sampling_mask(torch.tensor([[0.5], [1.0]])).tolist() == [False, False]


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="must agree"):
        broadcast_to_tokens(torch.tensor([1.0]), mask)


@pytest.mark.parametrize("rewards,match", [
    (torch.tensor([1.0, 2.0]), r"\[num_prompts, group\]"),
    (torch.zeros(0, 4), "non-empty"),
    (torch.tensor([[1.0, float("nan")]]), "NaN or inf"),
    (torch.tensor([[True, False]]), "real-valued"),
])
def test_bad_rewards(rewards, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(rewards)
    with pytest.raises(ValueError, match=match):
        dynamic_sampling_mask(rewards)


def test_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(torch.ones(1, 2), eps=-1.0)
