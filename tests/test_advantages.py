"""Group advantages against per-group loops."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kpo_lightning.algorithms.advantages import group_advantages
from kpo_lightning.errors import UserInputError


def loop_advantages(rewards, G, estimator, eps=1e-6):
    out = []
    for start in range(0, len(rewards), G):
        g = rewards[start : start + G]
        mean = sum(g) / G
        for r in g:
            if estimator == "grpo":
                std = math.sqrt(sum((x - mean) ** 2 for x in g) / (G - 1))
                out.append((r - mean) / (std + eps))
            elif estimator == "dr_grpo":
                out.append(r - mean)
            else:
                out.append(r - (sum(g) - r) / (G - 1))
    return out


@settings(max_examples=60, deadline=None)
@given(
    estimator=st.sampled_from(["grpo", "dr_grpo", "rloo"]),
    G=st.integers(2, 8),
    groups=st.integers(1, 5),
    binary=st.booleans(),
    data=st.data(),
)
def test_matches_loops(estimator, G, groups, binary, data):
    values = st.sampled_from([0.0, 1.0]) if binary else st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 3))
    rewards = data.draw(st.lists(values, min_size=G * groups, max_size=G * groups))
    adv, stats = group_advantages(torch.tensor(rewards, dtype=torch.float64), G, estimator)
    ref = loop_advantages(rewards, G, estimator)
    assert adv.shape == (G * groups,)
    torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    equal = [len(set(rewards[i : i + G])) == 1 for i in range(0, len(rewards), G)]
    assert stats["zero_var_group_frac"].item() == pytest.approx(sum(equal) / groups)
    assert stats["reward_mean"].item() == pytest.approx(sum(rewards) / len(rewards))
    for flat, g in zip(equal, adv.view(groups, G)):
        if flat:  # no signal: exactly zero, not eps-amplified rounding noise
            assert (g == 0).all()


def test_binary_example_and_stats():
    rewards = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1])  # ints are fine
    adv, stats = group_advantages(rewards, 4)
    std = math.sqrt(0.75 * 0.25 * 4 / 3)
    torch.testing.assert_close(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6))
    assert (adv[4:] == 0).all()
    assert stats["zero_var_group_frac"] == 0.5
    assert stats["reward_mean"] == pytest.approx(5 / 8)
    assert stats["reward_std"].item() == pytest.approx(torch.tensor([1, 0, 0, 0, 1, 1, 1, 1.0]).std().item())
    # equal non-binary rewards: the float mean may round, the advantage must not become noise / eps
    adv, _ = group_advantages(torch.full((8,), 0.1), 8)
    assert (adv == 0).all()


def test_rloo_is_scaled_dr_grpo():
    r = torch.randn(24, generator=torch.Generator().manual_seed(0))
    rloo, _ = group_advantages(r, 6, "rloo")
    dr, _ = group_advantages(r, 6, "dr_grpo")
    torch.testing.assert_close(rloo, dr * 6 / 5)


def test_group_of_one_only_for_dr_grpo():
    adv, stats = group_advantages(torch.tensor([1.0, 0.0]), 1, "dr_grpo")
    assert (adv == 0).all() and stats["zero_var_group_frac"] == 1
    for est in ("grpo", "rloo"):
        with pytest.raises(UserInputError, match="group_size >= 2"):
            group_advantages(torch.tensor([1.0, 0.0]), 1, est)


def test_bad_input_is_a_user_error():
    with pytest.raises(UserInputError, match=r"\(7\).*multiple of group_size \(4\)"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(UserInputError, match="'ppo'"):
        group_advantages(torch.zeros(8), 4, "ppo")
    with pytest.raises(UserInputError, match="non-finite"):
        group_advantages(torch.tensor([0.0, float("nan"), 1.0, 1.0]), 2)
    with pytest.raises(UserInputError, match="shape"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(UserInputError, match="group_size"):
        group_advantages(torch.zeros(8), 0)
