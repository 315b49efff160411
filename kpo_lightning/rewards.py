"""Rewards for RL fine-tuning: the built-in math reward, loading user reward functions, batch scoring.

Reward functions are called with keywords only: ``fn(prompt=..., completion=..., answer=...) -> float``.
Write them as ``def my_reward(prompt, completion, answer, **kwargs) -> float`` so that keywords added later
do not break them. Load one with `load_reward_fn("math")`, `load_reward_fn("package.module:function")` or
`load_reward_fn("path/to/file.py:function")`; `reward_from_config(RewardConfig(...))` gives the time-bounded
version a run uses.

Math reward (`math_reward`, `MathReward`). The answer is the last `\\boxed{}` of the completion, read after the
last `</think>` when the completion has one (a completion that opened `<think>`, or whose prompt left one open,
and never closed it scores 0.0: it is all reasoning, no answer). Cheap checks come first and need no child
process: no final box -> 0.0; normalised strings equal -> 1.0; both plain numbers (integers, decimals, fractions,
mixed numbers, thousands separators) that are exactly equal -> 1.0, two different integers -> 0.0; an answer
longer than 1,000 characters or nested deeper than 32 brackets -> 0.0; separate numbers side by side ("1 2") are
never joined into one ("12") nor handed to math-verify (which would add them). The rest is math-verify's symbolic
equivalence, run in a killable child process bounded by `timeout_s` (`math_verify_worker`). Verdicts are cached
per (reference, answer) pair; a timeout is not a verdict: it scores 0.0, is counted (`train/reward_timeouts`) and
is retried the next time the pair comes up (within one batch, identical pairs are checked once).

User rewards named by a spec (`reward.fn=package.module:function` or `path/to/file.py:function`) run in a pool of
child processes (`reward_workers.RewardPool`) under the same bound, `reward.timeout_s` per sample: a sample whose
reward does not return in time scores 0.0 and is counted, its process is replaced, the run goes on.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from kpo_lightning.errors import UserInputError
from kpo_lightning.reward_workers import (
    Failure,
    Outcome,
    RewardPool,
    call_reward,
    classify,
    stop_on_sigterm,
    timeout_failure,
)

if TYPE_CHECKING:
    import torch

    from kpo_lightning.config import RewardConfig

log = logging.getLogger(__name__)

RewardFn = Callable[..., float]

MAX_ANSWER_CHARS = 1000  # longer boxed answers score 0.0 unless string-equal to the reference
MAX_NESTING = 32  # deeper {[( nesting scores 0.0 unless string-equal to the reference
_CACHE_SIZE = 8192

# ----------------------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, braces balanced; None if absent/unbalanced.

    Escaped braces (`\\{`, `\\}`) are literal characters and do not open or close groups, so
    `\\boxed{\\{1,2\\}}` gives `\\{1,2\\}`. An unterminated last box (a truncated completion) gives None.
    """
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return None
    start = last.end()
    depth = 1
    for m in _BRACE_TOKEN_RE.finditer(text, start):  # \{ \} \\ are escapes, not grouping braces
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[start:m.start()]
    return None


def answer_part(completion: str, prompt: str = "") -> str | None:
    """The part of a completion that holds the final answer, as thinking models' graders read it.

    After the last `</think>` when there is one; None (no answer: score 0) when thinking was opened, in the
    completion or at the end of the prompt (templates that pre-fill `<think>`), and never closed; else all of it.
    """
    end = completion.rfind(THINK_CLOSE)
    if end >= 0:
        return completion[end + len(THINK_CLOSE):]
    opened = prompt.rfind(THINK_OPEN)
    if THINK_OPEN in completion or (opened >= 0 and prompt.find(THINK_CLOSE, opened) < 0):
        return None
    return completion


# -------------------------------------------------------------------------------------- normalisation

_DROP_RE = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\!|\\?\$")
_SPACE_RE = re.compile(r"(?:\s|~|\\[,;: ]|\\q?quad(?![A-Za-z]))+")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+(?:\.\d+)?")
_MIXED_SPACE_RE = re.compile(r"(-?)(\d+) (\d+)/(\d+)")
_NUM_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?)\\frac(\d)(\d)")
_MIXED_FRAC_RE = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}|(-?)(\d+)\\frac(\d)(\d)")
_SLASH_RE = re.compile(r"(-?\d+)/(-?\d+)")
_SEPARATE_NUMBERS_RE = re.compile(r"\d \d")


def _space(m: re.Match) -> str:
    """A run of (LaTeX) spacing: kept as one space between two digits or two letters, where removing it would
    join separate numbers ("1 2") or words (`\\pi r`), dropped elsewhere."""
    s, a, b = m.string, m.start(), m.end()
    left, right = s[a - 1] if a else "", s[b] if b < len(s) else ""
    keep = (left.isdigit() and right.isdigit()) or (left.isalpha() and right.isalpha())
    return " " if keep else ""


def _normalise(s: str) -> str:
    """Formatting-only normalisation: it never makes different answers equal.

    Drops `\\left`, `\\right`, `\\displaystyle`, `\\!`, `$`; a whole answer that is a number with thousands
    separators (`1,000`, `1{,}000`, `1\\,000`, `1,\\!000`) loses them; spacing between two digits or two
    letters becomes one space (separate numbers stay separate), other spacing goes; `\\dfrac`/`\\tfrac` become
    `\\frac`; a mixed number `2 3/4` is written `2\\frac{3}{4}` (its value is 11/4, as math-verify reads the latter).
    """
    s = _DROP_RE.sub("", s).strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = re.sub(r"[^\d.-]", "", s)
    s = _SPACE_RE.sub(_space, s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    m = _MIXED_SPACE_RE.fullmatch(s)
    if m and int(m.group(3)) < int(m.group(4)):
        s = f"{m.group(1)}{m.group(2)}\\frac{{{m.group(3)}}}{{{m.group(4)}}}"
    return s.rstrip(".")


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, is_integer_literal) for a normalised plain number, fraction, mixed number or \\frac of integers."""
    try:
        if _NUM_RE.fullmatch(s):
            return Fraction(s), "." not in s
        m = _FRAC_RE.fullmatch(s)
        if m:
            sign, a, b = (m.group(1), m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5), m.group(6))
            v = Fraction(int(a), int(b))
            return (-v if sign else v), False
        m = _MIXED_FRAC_RE.fullmatch(s)
        if m:
            g = m.groups()[:4] if m.group(2) else m.groups()[4:]
            v = int(g[1]) + Fraction(int(g[2]), int(g[3]))
            return (-v if g[0] else v), False
        m = _SLASH_RE.fullmatch(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2))), False
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _nesting(s: str) -> int:
    """Maximum nesting depth of {[( brackets (escaped ones included: \\{ still nests in the parser)."""
    depth = best = 0
    for c in s:
        if c in "{[(":
            depth += 1
            best = max(best, depth)
        elif c in "}])":
            depth = max(0, depth - 1)
    return best


# ------------------------------------------------------------------------------------------- math reward

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


def _symbolic(key: tuple[str, str], timeout_s: float) -> Optional[float]:
    """math-verify's verdict for a normalised (reference, answer) pair, cached; None on timeout (not cached)."""
    from kpo_lightning.math_verify_worker import WORKER

    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    eq = WORKER.equal(key[0], key[1], timeout_s)
    if eq is None:
        log.debug("math_reward: comparing %.80r with reference %.80r took over %.1fs; scored 0.0", key[1], key[0],
                  timeout_s)
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


def math_reward(completion: str, answer: str, timeout_s: float = 2.0, *, answer_after_think: bool = True,
                prompt: str = "") -> float:
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
        return math_reward(completion, answer, self.timeout_s, answer_after_think=self.answer_after_think,
                           prompt=prompt)

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


# ---------------------------------------------------------------------------------------- loading

_FORMS = ("'math', 'package.module:function' or 'path/to/file.py:function'")


def _import_file(path: str, spec: str) -> Any:
    """Import a .py file as a uniquely named module (registered in sys.modules so pickling works)."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise UserInputError(f"reward function {spec!r}: file {full} does not exist; fix the path (relative "
                             f"paths are resolved from the working directory {os.getcwd()})")
    name = "kpo_user_reward_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0]) + \
        f"_{zlib.crc32(full.encode()):08x}"
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
        raise UserInputError(f"reward function {spec!r}: importing {full} failed with {type(e).__name__}: {e}; "
                             f"fix the file") from e
    return module


def _import_module(modname: str, spec: str) -> Any:
    """Import a dotted module, turning 'not found' and import-time errors into UserInputError."""
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        missing = e.name or modname
        if modname == missing or modname.startswith(missing + "."):
            raise UserInputError(f"reward function {spec!r}: module {modname!r} not found; install it, add its "
                                 f"directory to PYTHONPATH, or use the file form 'path/to/file.py:function'") from e
        raise UserInputError(f"reward function {spec!r}: module {modname!r} needs {missing!r}, which is not "
                             f"installed; pip install it") from e
    except Exception as e:
        raise UserInputError(f"reward function {spec!r}: importing {modname!r} failed with {type(e).__name__}: "
                             f"{e}; fix the module") from e


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
        raise UserInputError(f"reward function spec {spec!r}: {target!r} is neither a dotted module name nor a "
                             f"path to a .py file; use {_FORMS}")
    module = _import_file(target, spec) if is_file else _import_module(target, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise UserInputError(f"reward function {spec!r}: {target!r} has no attribute {attr!r}; fix the name "
                                 f"after ':' (callables there: {', '.join(names[:20]) or 'none'})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserInputError(f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not callable; "
                             f"point the spec at a function")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj  # builtins and some C callables: nothing to check
    try:
        sig.bind(prompt="", completion="", answer="")
    except TypeError as e:
        raise UserInputError(f"reward function {spec!r} has signature {sig}, but it is called as "
                             f"fn(prompt=..., completion=..., answer=...); define it as "
                             f"def {attr.split('.')[-1]}(prompt, completion, answer, **kwargs) -> float ({e})") from e
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
        self._pool: Optional[RewardPool] = None

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


def reward_from_config(cfg: "RewardConfig") -> RewardFn:
    """The reward a run uses: `MathReward` for "math", else the user's function as a `TimedReward`."""
    if isinstance(cfg.fn, str) and cfg.fn.strip() == "math":
        return MathReward(cfg.timeout_s, cfg.answer_after_think)
    return TimedReward(cfg.fn, cfg.timeout_s, cfg.num_workers)


# ---------------------------------------------------------------------------------------- scoring


class Scores(NamedTuple):
    rewards: "torch.Tensor"  # float32, (N,)
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
        raise ValueError(f"prompts, completions and answers must have one entry per sample, got "
                         f"{len(prompts)}, {n}, {len(answers)}")
    with stop_on_sigterm():
        if hasattr(fn, "score_batch"):
            outcomes = [o if isinstance(o, Failure) else classify(o)
                        for o in fn.score_batch(list(prompts), list(completions), list(answers))]
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
        log.warning("reward function %s %s on %d/%d samples (scored 0.0); first at sample %d: %s",
                    name, kind, count, n, first, text)
    return Scores(torch.tensor(rewards, dtype=torch.float32), num_errors, num_timeouts)
