"""Group-relative advantages (spec section 5): every prompt gets G samples, each scored against its own group.

Rewards are laid out group-contiguously: prompt i's G samples sit at i*G .. i*G+G-1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpo_lightning.errors import UserInputError, check_choice

ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def group_advantages(
    rewards: Tensor, group_size: int, estimator: str = "grpo", eps: float = 1e-6
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantages (N,) for rewards (N,) and stats.

    grpo:    (R - group mean) / (unbiased group std + eps)
    dr_grpo: R - group mean                                  (Dr. GRPO drops the std)
    rloo:    R - mean of the other G - 1 rewards of the group (leave-one-out baseline)

    A group whose rewards are all equal gets exactly 0 (no signal), not its mean's rounding error / eps.
    Non-finite rewards are a UserInputError (they come from the user's reward function).

    stats (0-d float tensors): zero_var_group_frac (share of groups whose rewards are all equal, which give no
    signal), reward_mean, reward_std (unbiased, over all N rewards; 0 when N = 1).
    """
    check_choice("loss.advantage", estimator, ESTIMATORS)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UserInputError(f"group_size={group_size!r} must be a positive integer")
    if estimator in ("grpo", "rloo") and group_size < 2:
        raise UserInputError(f"advantage estimator {estimator!r} needs group_size >= 2, got {group_size}")
    if rewards.dim() != 1:
        raise UserInputError(f"rewards must be one number per sample, shape (N,), got {tuple(rewards.shape)}")
    n = rewards.numel()
    if n == 0 or n % group_size:
        raise UserInputError(f"the number of rewards ({n}) must be a positive multiple of group_size ({group_size})")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    if not bool(torch.isfinite(r).all()):
        bad = (~torch.isfinite(r)).nonzero().flatten()[:5].tolist()
        raise UserInputError(
            f"the reward function returned non-finite rewards (at samples {bad}); it must return finite numbers"
        )

    g = r.view(-1, group_size)
    mean = g.mean(-1, keepdim=True)
    if estimator == "grpo":
        adv = (g - mean) / (g.std(-1, keepdim=True) + eps)
    elif estimator == "dr_grpo":
        adv = g - mean
    else:  # rloo: R_i - (sum - R_i) / (G - 1) = G / (G - 1) * (R_i - mean)
        adv = g - (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    # exact zero for groups with equal rewards (no signal), whatever the rounding of the mean
    zero_var = (g == g[:, :1]).all(-1)
    adv = torch.where(zero_var[:, None], 0.0, adv)

    stats = {
        "zero_var_group_frac": zero_var.float().mean(),
        "reward_mean": r.mean(),
        "reward_std": r.std() if n > 1 else r.new_zeros(()),
    }
    return adv.reshape(-1), stats
