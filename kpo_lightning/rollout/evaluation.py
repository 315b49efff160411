"""Evaluation: avg@k and unbiased pass@k from k sampled answers per prompt, with the training reward.

Used by the validation loop during training and by `run.py mode=eval`, so both report the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from math import comb

from torch import Tensor

from kpo_lightning.rewards.scoring import score_completions
from kpo_lightning.rollout.engine import RolloutEngine, SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate_batch(
    engine: RolloutEngine,
    model,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    params: SamplingParams,
    reward_fn: Callable[..., float],
) -> Tensor:
    """Rewards (num_prompts, k) of `params.num_samples` sampled answers per prompt."""
    gen = engine.generate(model, tokenizer, prompts, params)
    k = params.num_samples
    rewards, _, _ = score_completions(
        reward_fn,
        [p for p in prompts for _ in range(k)],
        gen.completions,
        [a for a in answers for _ in range(k)],
    )
    return rewards.reshape(len(prompts), k)


def summarize(rewards: Tensor, k: int) -> dict[str, float]:
    """avg@k (mean reward, the paper's headline) and pass@k (a reward of 1 counts as correct)."""
    rewards = rewards.float().cpu()
    correct = (rewards >= 1.0).sum(dim=1).tolist()
    n = rewards.shape[1]
    return {
        "accuracy": rewards.mean().item(),
        f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / max(len(correct), 1),
        "num_prompts": float(rewards.shape[0]),
    }
