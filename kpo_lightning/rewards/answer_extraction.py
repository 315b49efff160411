"""Reading a math answer: the final `\\boxed{}` of a completion (after `</think>`) and formatting-only normalisation.

Plain string functions, no child process and no math-verify: `math_reward.py` uses them for its cheap checks
before any symbolic comparison.
"""

from __future__ import annotations

import re
from fractions import Fraction

# ----------------------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, braces balanced; None if absent/unbalanced.

    Escaped braces (`\\{`, `\\}`) are literal characters and do not open or close groups, so
    `\\boxed{\\{1,2\\}}` gives `\\{1,2\\}`. An unterminated last box (a truncated completion) gives None.
    """
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    start = boxes[-1].end()
    depth = 1
    for m in _BRACE_TOKEN_RE.finditer(text, start):  # \{ \} \\ are escapes, not grouping braces
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[start : m.start()]
    return None


def answer_part(completion: str, prompt: str = "") -> str | None:
    """The part of a completion that holds the final answer, as thinking models' graders read it.

    After the last `</think>` when there is one; None (no answer: score 0) when thinking was opened, in the
    completion or at the end of the prompt (templates that pre-fill `<think>`), and never closed; else all of it.
    """
    end = completion.rfind(THINK_CLOSE)
    if end >= 0:
        return completion[end + len(THINK_CLOSE) :]
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
