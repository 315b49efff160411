"""A reward that accepts a small model's natural answer formats: `\\boxed{12}`, "The answer is 12.", "12".

The built-in "math" reward reads only the last `\\boxed{}`. SmolLM2-135M-Instruct rarely boxes its answer, so on
that model the math reward is 0 for every sample, every group has zero variance and nothing is learned. This
reward reads the last `\\boxed{}` when there is one, otherwise the last number in the completion, and scores
1.0 when it equals the (numeric) reference. Use it with `reward.fn=kpo_lightning.rewards.lenient_reward:score`
(`preset=smollm2` does). Integers and decimals only: it is meant for the arithmetic task, not for MATH.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from kpo_lightning.rewards.answer_extraction import extract_boxed

# A number as written in prose: optional sign, digits with optional thousands commas, optional decimals.
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def _to_number(text: str) -> Fraction | None:
    """`text` as an exact number ("1,234" -> 1234, "12.50" -> 25/2), or None when it is not one."""
    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str) -> str | None:
    """The answer a completion gives: the last `\\boxed{}` content if any, else the last number, else None."""
    boxed = extract_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1] if numbers else None


def score(prompt: str, completion: str, answer: str, **kwargs: Any) -> float:
    """1.0 when the completion's answer (see `extract_answer`) equals the numeric reference `answer`, else 0.0."""
    got = extract_answer(completion)
    if got is None:
        return 0.0
    if got == answer.strip():
        return 1.0
    a, b = _to_number(got), _to_number(answer)
    return float(a is not None and b is not None and a == b)
