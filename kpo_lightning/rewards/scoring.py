"""Rewards for RL fine-tuning: scoring a batch of completions (`score_completions`), and the one import path for
every reward name.

Reward functions are called with keywords only: ``fn(prompt=..., completion=..., answer=...) -> float``.
Write them as ``def my_reward(prompt, completion, answer, **kwargs) -> float`` so that keywords added later
do not break them. Load one with `load_reward_fn("math")`, `load_reward_fn("package.module:function")` or
`load_reward_fn("path/to/file.py:function")`; `reward_from_config(RewardConfig(...))` gives the time-bounded
version a run uses.

Where the parts live (all names are importable from here): answer extraction and normalisation in
`answer_extraction.py`; the built-in math reward (`math_reward`, `MathReward`, its verdict cache) in
`math_reward.py`, with math-verify in a killable child (`math_verify_worker.py`); loading rewards by spec
(`load_reward_fn`, `TimedReward`, `reward_from_config`) in `loading.py`, user rewards running in a pool of
child processes (`workers.py`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

from kpo_lightning.rewards.answer_extraction import THINK_CLOSE, THINK_OPEN, answer_part, extract_boxed
from kpo_lightning.rewards.loading import RewardFn, TimedReward, load_reward_fn, reward_from_config
from kpo_lightning.rewards.math_reward import MAX_ANSWER_CHARS, MAX_NESTING, MathReward, math_reward, math_reward_fn
from kpo_lightning.rewards.workers import Failure, call_reward, classify, stop_on_sigterm

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- scoring


class Scores(NamedTuple):
    rewards: torch.Tensor  # float32, (N,)
    num_errors: int  # samples whose reward raised, returned None/NaN/inf/a non-number, or killed its process
    num_timeouts: int  # samples whose reward did not return within the time bound


def score_completions(fn: RewardFn, prompts: list[str], completions: list[str], answers: list[str]) -> Scores:
    """Rewards (float32, (N,)), the number of samples whose reward failed, and the number that timed out.

    A sample fails when `fn` raises, or returns None, NaN/inf, or something that is not a number; it then
    scores 0.0. A reward with a `score_batch` method (`MathReward`, `TimedReward`) scores the batch at once and
    reports timeouts (also 0.0). Scoring never raises for a failing sample; one warning per kind of failure is
    logged with the count and the first error's text. SIGTERM and Ctrl-C stop the scoring at once.
    """
    import torch

    n = len(completions)
    if len(prompts) != n or len(answers) != n:
        raise ValueError(
            f"prompts, completions and answers must have one entry per sample, got {len(prompts)}, {n}, {len(answers)}"
        )
    with stop_on_sigterm():
        if hasattr(fn, "score_batch"):
            outcomes = [
                o if isinstance(o, Failure) else classify(o)
                for o in fn.score_batch(list(prompts), list(completions), list(answers))
            ]
        else:
            outcomes = [call_reward(fn, prompts[i], completions[i], answers[i]) for i in range(n)]
    rewards = [o if isinstance(o, float) else 0.0 for o in outcomes]
    failures: dict[str, tuple[int, int, str]] = {}  # kind -> (count, first index, first message)
    for i, o in enumerate(outcomes):
        if isinstance(o, Failure):
            count, first, text = failures.get(o.kind, (0, i, o.message))
            failures[o.kind] = (count + 1, first, text)
    num_timeouts = sum(isinstance(o, Failure) and o.timeout for o in outcomes)
    num_errors = sum(isinstance(o, Failure) for o in outcomes) - num_timeouts
    name = getattr(fn, "__qualname__", repr(fn))
    for kind, (count, first, text) in failures.items():
        log.warning(
            "reward function %s %s on %d/%d samples (scored 0.0); first at sample %d: %s",
            name,
            kind,
            count,
            n,
            first,
            text,
        )
    return Scores(torch.tensor(rewards, dtype=torch.float32), num_errors, num_timeouts)


__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_NESTING",
    "THINK_CLOSE",
    "THINK_OPEN",
    "MathReward",
    "RewardFn",
    "Scores",
    "TimedReward",
    "answer_part",
    "extract_boxed",
    "load_reward_fn",
    "math_reward",
    "math_reward_fn",
    "reward_from_config",
    "score_completions",
]
