"""Loading reward functions by name: `load_reward_fn` (a spec to a callable), `TimedReward` (a user reward run in
child processes under a time bound) and `reward_from_config` (the reward a run uses).

Specs: "math" (the built-in `math_reward.math_reward_fn`), "package.module:function" or
"path/to/file.py:function". User rewards named by a spec (`reward.fn=...`) run in a pool of child processes
(`reward_workers.RewardPool`) bounded by `reward.timeout_s` per sample: a sample whose reward does not return in
time scores 0.0 and is counted, its process is replaced, the run goes on.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kpo_lightning.errors import UserInputError
from kpo_lightning.math_reward import MathReward, _check_timeout, math_reward_fn
from kpo_lightning.reward_workers import Outcome, RewardPool

if TYPE_CHECKING:
    from kpo_lightning.config import RewardConfig

RewardFn = Callable[..., float]


_FORMS = "'math', 'package.module:function' or 'path/to/file.py:function'"


def _import_file(path: str, spec: str) -> Any:
    """Import a .py file as a uniquely named module (registered in sys.modules so pickling works)."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise UserInputError(
            f"reward function {spec!r}: file {full} does not exist; fix the path (relative "
            f"paths are resolved from the working directory {os.getcwd()})"
        )
    name = (
        "kpo_user_reward_"
        + re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
        + f"_{zlib.crc32(full.encode()):08x}"
    )
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, full)
    if mspec is None or mspec.loader is None:
        raise UserInputError(f"reward function {spec!r}: cannot load {full} as Python; give a .py file")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise UserInputError(
            f"reward function {spec!r}: importing {full} failed with {type(e).__name__}: {e}; fix the file"
        ) from e
    return module


def _import_module(modname: str, spec: str) -> Any:
    """Import a dotted module, turning 'not found' and import-time errors into UserInputError."""
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        missing = e.name or modname
        if modname == missing or modname.startswith(missing + "."):
            raise UserInputError(
                f"reward function {spec!r}: module {modname!r} not found; install it, add its "
                f"directory to PYTHONPATH, or use the file form 'path/to/file.py:function'"
            ) from e
        raise UserInputError(
            f"reward function {spec!r}: module {modname!r} needs {missing!r}, which is not installed; pip install it"
        ) from e
    except Exception as e:
        raise UserInputError(
            f"reward function {spec!r}: importing {modname!r} failed with {type(e).__name__}: {e}; fix the module"
        ) from e


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function named by `spec`: "math", "package.module:function" or "path/to/file.py:function".

    The function is called as `fn(prompt=..., completion=..., answer=...)` and returns a float; it must
    accept those keywords (or **kwargs). Every problem with `spec` raises UserInputError naming the fix.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"reward function spec {spec!r} is empty or not a string; use {_FORMS}")
    spec = spec.strip()
    if spec == "math":
        return math_reward_fn
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UserInputError(f"reward function spec {spec!r} is not understood; use {_FORMS}")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if not is_file and not all(part.isidentifier() for part in target.split(".")):
        raise UserInputError(
            f"reward function spec {spec!r}: {target!r} is neither a dotted module name nor a "
            f"path to a .py file; use {_FORMS}"
        )
    module = _import_file(target, spec) if is_file else _import_module(target, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise UserInputError(
                f"reward function {spec!r}: {target!r} has no attribute {attr!r}; fix the name "
                f"after ':' (callables there: {', '.join(names[:20]) or 'none'})"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserInputError(
            f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not callable; point the spec at a function"
        )
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj  # builtins and some C callables: nothing to check
    try:
        sig.bind(prompt="", completion="", answer="")
    except TypeError as e:
        raise UserInputError(
            f"reward function {spec!r} has signature {sig}, but it is called as "
            f"fn(prompt=..., completion=..., answer=...); define it as "
            f"def {attr.split('.')[-1]}(prompt, completion, answer, **kwargs) -> float ({e})"
        ) from e
    return obj


class TimedReward:
    """A user reward named by a spec, run in a pool of child processes with `timeout_s` per sample.

    `TimedReward("my_pkg.rewards:score", timeout_s=10)` behaves like the function it names, except that a call
    that does not return in time scores 0.0 (counted as a timeout by `score_completions`) and that the function
    runs in another process (it must be importable by that name; module state is per process). `num_workers`
    processes (0: up to 4, one per CPU) are started on first use and reused; one that dies is restarted.
    """

    def __init__(self, spec: str, timeout_s: float = 2.0, num_workers: int = 0) -> None:
        _check_timeout(timeout_s)
        load_reward_fn(spec)  # every problem with the spec, here, in one line
        target, _, attr = spec.strip().rpartition(":")
        if target.endswith(".py") or "/" in target or os.sep in target:  # children resolve it from any cwd
            target = os.path.abspath(os.path.expanduser(target))
        self.spec = f"{target}:{attr}"
        self.timeout_s = timeout_s
        self.num_workers = num_workers if num_workers > 0 else min(4, os.cpu_count() or 1)
        self.__qualname__ = self.spec
        self._pool: RewardPool | None = None

    def score_batch(self, prompts: list[str], completions: list[str], answers: list[str]) -> list[Outcome]:
        if self._pool is None:
            self._pool = RewardPool(self.spec, self.num_workers)
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
    return TimedReward(cfg.fn, cfg.timeout_s, cfg.num_workers)
