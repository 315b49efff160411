"""The built-in "math" reward (`math_reward`, `MathReward`): the final `\\boxed{}` answer against the reference.

The answer is the last `\\boxed{}` of the completion, read after the
last `</think>` when the completion has one (a completion that opened `<think>`, or whose prompt left one open,
and never closed it scores 0.0: it is all reasoning, no answer). Cheap checks come first and need no child
process: no final box -> 0.0; normalised strings equal -> 1.0; both plain numbers (integers, decimals, fractions,
mixed numbers, thousands separators) that are exactly equal -> 1.0, two different integers -> 0.0; an answer
longer than 1,000 characters or nested deeper than 32 brackets -> 0.0; separate numbers side by side ("1 2") are
never joined into one ("12") nor handed to math-verify (which would add them). The rest is math-verify's symbolic
equivalence, run in a killable child process bounded by `timeout_s` (`math_verify_worker`). Verdicts are cached
per (reference, answer) pair; a timeout is not a verdict: it scores 0.0, is counted (`train/reward_timeouts`) and
is retried the next time the pair comes up (within one batch, identical pairs are checked once).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from kpo_lightning.rewards.answer_extraction import (
    _SEPARATE_NUMBERS_RE,
    _as_number,
    _nesting,
    _normalise,
    answer_part,
    extract_boxed,
)
from kpo_lightning.rewards.workers import Outcome, timeout_failure

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # longer boxed answers score 0.0 unless string-equal to the reference
MAX_NESTING = 32  # deeper {[( nesting scores 0.0 unless string-equal to the reference
_CACHE_SIZE = 8192


_CACHE: OrderedDict[tuple[str, str], float] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _quick_verdict(completion: str, answer: str, prompt: str, answer_after_think: bool) -> float | tuple[str, str]:
    """The score when cheap checks decide it, else the normalised (reference, answer) pair for math-verify."""
    if answer_after_think:
        part = answer_part(completion, prompt)
        if part is None:
            return 0.0
        completion = part
    pred = extract_boxed(completion)
    if pred is None:
        return 0.0
    gold = extract_boxed(answer) if "\\boxed" in answer or "\\fbox" in answer else answer
    if gold is None:
        gold = answer
    g, p = _normalise(gold), _normalise(pred)
    if not p or not g:
        return 0.0
    if g == p:
        return 1.0
    if len(p) > MAX_ANSWER_CHARS or len(g) > MAX_ANSWER_CHARS:
        return 0.0
    gn, pn = _as_number(g), _as_number(p)
    if gn is not None and pn is not None:
        if gn[0] == pn[0]:
            return 1.0
        if gn[1] and pn[1]:  # two different integers: math-verify would say no
            return 0.0
    if _SEPARATE_NUMBERS_RE.search(p) or _SEPARATE_NUMBERS_RE.search(g):
        return 0.0  # math-verify reads "1 2" as 1 + 2; separate numbers only match themselves (string equality)
    if _nesting(p) > MAX_NESTING or _nesting(g) > MAX_NESTING:
        return 0.0
    return g, p


def _symbolic(key: tuple[str, str], timeout_s: float) -> float | None:
    """math-verify's verdict for a normalised (reference, answer) pair, cached; None on timeout (not cached)."""
    from kpo_lightning.rewards.math_verify_worker import WORKER

    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    eq = WORKER.equal(key[0], key[1], timeout_s)
    if eq is None:
        log.debug(
            "math_reward: comparing %.80r with reference %.80r took over %.1fs; scored 0.0", key[1], key[0], timeout_s
        )
        return None
    result = 1.0 if eq else 0.0
    with _CACHE_LOCK:
        _CACHE[key] = result
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result


def _check_timeout(timeout_s: float) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")


def math_reward(
    completion: str, answer: str, timeout_s: float = 2.0, *, answer_after_think: bool = True, prompt: str = ""
) -> float:
    """1.0 when the last `\\boxed{}` of `completion` equals `answer`, else 0.0 (see the module docstring).

    `answer` is the reference, bare (`\\frac{1}{2}`) or boxed. Equality is string equality after
    formatting normalisation, or math-verify's equivalence (`0.5` = `\\frac{1}{2}`, `x=3` = `3`,
    `30^\\circ` = `30`, `\\{1,2\\}` = `\\{2,1\\}`), bounded by `timeout_s` seconds in any thread; a
    comparison that takes longer scores 0.0. With `answer_after_think`, only the text after the last
    `</think>` counts (`prompt` tells whether the template left a `<think>` open).
    """
    _check_timeout(timeout_s)
    quick = _quick_verdict(completion, answer, prompt, answer_after_think)
    if isinstance(quick, float):
        return quick
    return _symbolic(quick, timeout_s) or 0.0


@dataclass(frozen=True)
class MathReward:
    """The built-in "math" reward with its settings (`reward.timeout_s`, `reward.answer_after_think`).

    Callable like any reward function; `score_batch` (used by `score_completions`) also reports timeouts and
    checks identical (reference, answer) pairs of a batch once.
    """

    timeout_s: float = 2.0
    answer_after_think: bool = True

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_s)

    def __call__(self, prompt: str = "", completion: str = "", answer: str = "", **kwargs: Any) -> float:
        return math_reward(
            completion, answer, self.timeout_s, answer_after_think=self.answer_after_think, prompt=prompt
        )

    def score_batch(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[Outcome]:
        out: list[Outcome] = [0.0] * len(completions)
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (p, c, a) in enumerate(zip(prompts, completions, answers)):
            quick = _quick_verdict(c, a, p, self.answer_after_think)
            if isinstance(quick, float):
                out[i] = quick
            else:
                todo.setdefault(quick, []).append(i)
        for key, idx in todo.items():
            verdict = _symbolic(key, self.timeout_s)
            for i in idx:
                out[i] = timeout_failure(self.timeout_s) if verdict is None else verdict
        return out


def math_reward_fn(prompt: str, completion: str, answer: str, **kwargs: Any) -> float:
    """The built-in "math" reward in the reward-function calling convention, default settings."""
    return math_reward(completion, answer, prompt=prompt)
