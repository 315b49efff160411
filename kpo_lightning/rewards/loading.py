"""Loading reward functions by name: `load_reward_fn` (a spec to a callable), `TimedReward` (a user reward run in
child processes under a time bound) and `reward_from_config` (the reward a run uses).

Specs: "math" (the built-in `math_reward.math_reward_fn`), "package.module:function" or
"path/to/file.py:function". User rewards named by a spec (`reward.fn=...`) run in a pool of child processes
(`workers.RewardPool`) bounded by `reward.timeout_s` per sample: a sample whose reward does not return in
time scores 0.0 and is counted, its process is replaced, the run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kpo_lightning.rewards.math_reward import MathReward, _check_timeout, math_reward_fn
from kpo_lightning.rewards.user_function import load_user_function
from kpo_lightning.rewards.workers import Outcome, RewardPool

if TYPE_CHECKING:
    from kpo_lightning.config import RewardConfig

RewardFn = Callable[..., float]


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function named by `spec`: "math", "package.module:function" or "path/to/file.py:function".

    The function is called as `fn(prompt=..., completion=..., answer=...)` and returns a float; it must
    accept those keywords (or **kwargs). Every problem with `spec` raises UserInputError naming the fix.
    """
    if isinstance(spec, str) and spec.strip() == "math":
        return math_reward_fn
    return load_user_function(spec)


class TimedReward:
    """A user reward named by a spec, run in a pool of child processes with `timeout_s` per sample.

    `TimedReward("my_pkg.rewards:score", timeout_s=10)` behaves like the function it names, except that a call
    that does not return in time scores 0.0 (counted as a timeout by `score_completions`) and that the function
    runs in another process (it must be importable by that name; module state is per process). `num_workers`
    processes (0: up to 4, one per CPU) are started on first use and reused; one that dies is restarted. Each
    process's address space is capped at `memory_mb` (0: no cap); one that runs out is replaced, its sample retried.
    """

    def __init__(self, spec: str, timeout_s: float = 2.0, num_workers: int = 0, memory_mb: int = 4096) -> None:
        _check_timeout(timeout_s)
        load_reward_fn(spec)  # every problem with the spec, here, in one line
        target, _, attr = spec.strip().rpartition(":")
        if target.endswith(".py") or "/" in target or os.sep in target:  # children resolve it from any cwd
            target = os.path.abspath(os.path.expanduser(target))
        self.spec = f"{target}:{attr}"
        self.timeout_s = timeout_s
        self.num_workers = num_workers if num_workers > 0 else min(4, os.cpu_count() or 1)
        self.memory_mb = memory_mb
        self.__qualname__ = self.spec
        self._pool: RewardPool | None = None

    def score_batch(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[Outcome]:
        if self._pool is None:
            self._pool = RewardPool(self.spec, self.num_workers, self.memory_mb << 20)
        return self._pool.score(list(zip(prompts, completions, answers)), self.timeout_s)

    def __call__(self, prompt: str = "", completion: str = "", answer: str = "", **kwargs: Any) -> float:
        out = self.score_batch([prompt], [completion], [answer])[0]
        return out if isinstance(out, float) else 0.0

    def close(self) -> None:
        """Stop the child processes (they also stop when this process exits)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}


def reward_from_config(cfg: RewardConfig) -> RewardFn:
    """The reward a run uses: `MathReward` for "math", else the user's function as a `TimedReward`."""
    if isinstance(cfg.fn, str) and cfg.fn.strip() == "math":
        return MathReward(cfg.timeout_s, cfg.answer_after_think)
    return TimedReward(cfg.fn, cfg.timeout_s, cfg.num_workers, cfg.worker_memory_mb)
