"""Rewards for RL fine-tuning: the built-in math reward, loading user reward functions, batch scoring.

Reward functions are called with keywords only: ``fn(prompt=..., completion=..., answer=...) -> float``.
Write them as ``def my_reward(prompt, completion, answer, **kwargs) -> float`` so that keywords added later
do not break them. Load one with `load_reward_fn("math")`, `load_reward_fn("package.module:function")` or
`load_reward_fn("path/to/file.py:function")`.

Time bound of the math reward (`math_reward`). math-verify bounds its own work with `signal.alarm`, which
only works in the main thread of the main interpreter, and a signal cannot interrupt a long C call anyway
(a CPython big-integer power like 9^(9^9) runs to the end before any Python signal handler). So the
symbolic comparison runs in one persistent worker process (a plain `subprocess` running
`_worker_main`, started lazily on first use, reused across calls), with math-verify's own timeouts
disabled. The caller waits for the one-byte answer with `select` up to `timeout_s`; on timeout the worker
is SIGKILLed (which always works, whatever it is computing), the sample scores 0.0, and a replacement is
started at once so that its imports overlap with the caller's next work. This behaves identically in the
main thread and in any other thread, needs no signal handlers in the trainer's process, and caps the
worker's address space so that a runaway answer cannot take the machine's memory. A plain subprocess is
used instead of `multiprocessing` because 'spawn' and 'forkserver' re-import the user's `__main__` script,
and 'fork' is unsafe after torch has started threads. Calls from several threads share the worker under a
lock, so concurrent calls queue. Cheap checks come first and need no worker at all: no final box -> 0.0;
normalised strings equal -> 1.0; both plain integers/fractions/decimals that are exactly equal -> 1.0,
two different integers -> 0.0; an answer longer than 1,000 characters or nested deeper than 32 brackets
-> 0.0. Results (timeouts included) are cached per (reference, answer) pair, so repeated answers within
a group, and repeated pathological answers, cost nothing after the first.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import OrderedDict
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable

from .errors import UserInputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RewardFn = Callable[..., float]

MAX_ANSWER_CHARS = 1000  # longer boxed answers score 0.0 unless string-equal to the reference
MAX_NESTING = 32  # deeper {[( nesting scores 0.0 unless string-equal to the reference
_WORKER_START_TIMEOUT_S = 120.0  # imports of sympy/math-verify on a busy machine; not counted in timeout_s
_WORKER_MEMORY_BYTES = 4 << 30  # address-space cap of the worker
_CACHE_SIZE = 8192

# ----------------------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)


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


# -------------------------------------------------------------------------------------- normalisation

_DROP_RE = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;: ]|\\?\$|[~\s]")
_NUM_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?)\\frac(\d)(\d)")
_SLASH_RE = re.compile(r"(-?\d+)/(-?\d+)")


def _normalise(s: str) -> str:
    """Formatting-only normalisation for the string fast path: it never makes different answers equal."""
    s = _DROP_RE.sub("", s)
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    return s.rstrip(".")


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, is_integer_literal) for a normalised plain number, fraction or \\frac of integers, else None."""
    try:
        if _NUM_RE.fullmatch(s):
            return Fraction(s), "." not in s
        m = _FRAC_RE.fullmatch(s)
        if m:
            sign, a, b = (m.group(1), m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5), m.group(6))
            v = Fraction(int(a), int(b))
            return (-v if sign else v), False
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


# ------------------------------------------------------------------------------------------- worker


def _worker_equal(parse: Callable, verify: Callable, cfg: list, gold_cache: dict, gold: str, pred: str) -> bool:
    """math-verify comparison, run inside the worker process, timeouts disabled (the parent kills us)."""
    g = gold_cache.get(gold)
    if g is None:
        g = parse("\\boxed{" + gold + "}", extraction_config=cfg, parsing_timeout=None)
        if len(gold_cache) > 1024:
            gold_cache.clear()
        gold_cache[gold] = g
    p = parse("\\boxed{" + pred + "}", extraction_config=cfg, parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def _read_exact(fd: int, n: int) -> bytes | None:
    """Read exactly n bytes from a blocking fd; None on EOF."""
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _worker_main() -> None:
    """Entry point of the math-verify worker process: length-prefixed JSON [gold, pred] in, b'1'/b'0' out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's; we exit when stdin closes
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, never into the protocol
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "timeout disabled" and per-item warnings
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_cache: dict = {}
    _worker_equal(parse, verify, cfg, gold_cache, "\\frac{1}{2}", "0.5")  # warm up sympy's lazy imports
    gold_cache.clear()
    os.write(out_fd, b"R")
    while True:
        head = _read_exact(0, 4)
        if head is None:
            return
        body = _read_exact(0, struct.unpack("<I", head)[0])
        if body is None:
            return
        try:
            gold, pred = json.loads(body)
            ok = _worker_equal(parse, verify, cfg, gold_cache, gold, pred)
        except BaseException:  # noqa: BLE001 - RecursionError, MemoryError, sympy internals: all "not equal"
            ok = False
        os.write(out_fd, b"1" if ok else b"0")


class _Worker:
    """One lazily started math-verify worker process, killed and replaced on timeout or crash."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.pid = os.getpid()

    def _spawn(self) -> None:
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from kpo_lightning.rewards import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        self.ready = False

    def _kill(self) -> None:
        proc, self.proc, self.ready = self.proc, None, False
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def _wait_readable(self, deadline: float) -> bool:
        """True when the worker's stdout has data (or EOF) before the deadline."""
        fd = self.proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                r, _, _ = select.select([fd], [], [], left)
            except InterruptedError:
                continue
            if r:
                return True

    def _ensure_ready(self) -> None:
        if self.pid != os.getpid():  # forked child: the handle belongs to the parent; leave it alone
            self.proc, self.ready, self.pid = None, False, os.getpid()
        if self.proc is None or self.proc.poll() is not None:
            self._kill()
            self._spawn()
        if not self.ready:
            ok = self._wait_readable(time.monotonic() + _WORKER_START_TIMEOUT_S)
            if not ok or os.read(self.proc.stdout.fileno(), 1) != b"R":
                self._kill()
                raise RuntimeError("the math-verify worker process did not start; check that `python -c "
                                   "\"import math_verify\"` works (pip install math-verify)")
            self.ready = True

    def equal(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """math-verify equivalence; None when it took longer than timeout_s (the worker is then replaced)."""
        with self.lock:
            self._ensure_ready()
            body = json.dumps([gold, pred]).encode()
            deadline = time.monotonic() + timeout_s
            try:
                self.proc.stdin.write(struct.pack("<I", len(body)) + body)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._kill()
                return None
            if not self._wait_readable(deadline):
                self._kill()
                self._spawn()  # start the replacement now; its imports overlap with the caller's work
                return None
            ans = os.read(self.proc.stdout.fileno(), 1)
            if ans not in (b"0", b"1"):  # EOF: the worker crashed (e.g. C stack overflow)
                self._kill()
                return None
            return ans == b"1"

    def close(self) -> None:
        if self.pid == os.getpid():
            self._kill()


_WORKER = _Worker()
atexit.register(_WORKER.close)
_CACHE: OrderedDict[tuple[str, str], float] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def math_reward(completion: str, answer: str, timeout_s: float = 2.0) -> float:
    """1.0 when the last `\\boxed{}` of `completion` equals `answer`, else 0.0 (see the module docstring).

    `answer` is the reference, bare (`\\frac{1}{2}`) or boxed. Equality is string equality after
    formatting normalisation, or math-verify's equivalence (`0.5` = `\\frac{1}{2}`, `x=3` = `3`,
    `30^\\circ` = `30`, `\\{1,2\\}` = `\\{2,1\\}`), bounded by `timeout_s` seconds in any thread; a
    comparison that takes longer scores 0.0.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
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
    if _nesting(p) > MAX_NESTING or _nesting(g) > MAX_NESTING:
        return 0.0
    gold, pred = gold.strip().strip("$").strip(), pred.strip()
    key = (gold, pred)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    eq = _WORKER.equal(gold, pred, timeout_s)
    if eq is None:
        log.debug("math_reward: comparing %.80r with reference %.80r took over %.1fs; scored 0.0", pred, gold,
                  timeout_s)
    result = 1.0 if eq else 0.0
    with _CACHE_LOCK:
        _CACHE[key] = result
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result


def math_reward_fn(prompt: str, completion: str, answer: str, **kwargs: Any) -> float:
    """The built-in "math" reward in the reward-function calling convention (`prompt` is unused)."""
    return math_reward(completion, answer)


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


# ---------------------------------------------------------------------------------------- scoring


def score_completions(
    fn: RewardFn, prompts: list[str], completions: list[str], answers: list[str]
) -> tuple["torch.Tensor", int]:
    """Rewards (float32, (N,)) and the number of samples whose reward failed.

    A sample fails when `fn` raises, or returns None, NaN/inf, or something that is not a number; it then
    scores 0.0. Scoring never raises for a failing sample; one warning per kind of failure is logged
    with the count and the first error's text.
    """
    import torch

    n = len(completions)
    if len(prompts) != n or len(answers) != n:
        raise ValueError(f"prompts, completions and answers must have one entry per sample, got "
                         f"{len(prompts)}, {n}, {len(answers)}")
    rewards = [0.0] * n
    failures: dict[str, tuple[int, int, str]] = {}  # kind -> (count, first index, first message)

    def fail(kind: str, i: int, msg: str) -> None:
        count, first, text = failures.get(kind, (0, i, msg))
        failures[kind] = (count + 1, first, text)

    for i in range(n):
        try:
            r = fn(prompt=prompts[i], completion=completions[i], answer=answers[i])
        except Exception as e:  # noqa: BLE001 - a user function may raise anything
            fail(f"raised {type(e).__name__}", i, str(e)[:500])
            continue
        if r is None:
            fail("returned None", i, "None")
            continue
        if isinstance(r, (str, bytes)) or not hasattr(r, "__float__"):
            fail("returned a non-number", i, f"{type(r).__name__}: {r!r:.200}")
            continue
        try:
            v = float(r)
        except Exception as e:  # noqa: BLE001 - e.g. a multi-element tensor
            fail("returned a non-number", i, f"{type(r).__name__}: {e}")
            continue
        if not math.isfinite(v):
            fail("returned NaN/inf", i, repr(v))
            continue
        rewards[i] = v
    num_errors = sum(c for c, _, _ in failures.values())
    for kind, (count, first, text) in failures.items():
        name = getattr(fn, "__qualname__", repr(fn))
        log.warning("reward function %s %s on %d/%d samples (scored 0.0); first at sample %d: %s",
                    name, kind, count, n, first, text)
    return torch.tensor(rewards, dtype=torch.float32), num_errors
