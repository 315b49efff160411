"""The built-in task: an endless, seeded stream of small arithmetic problems.

A problem is a pure function of (seed, index), so a position in the stream is just an integer: no files, no
downloads, and resuming a run means remembering one number.

Format (what the shipped `tiny-arith` model was trained on):

    prompt     "12+34="
    answer     "46"
    completion "\\boxed{46}"      (the reference completion; the reward reads the last \\boxed{...})

Held-out validation: every operand pair is assigned once and for all to the train or the val side by a fixed
arithmetic hash (about 1 pair in 10 is val). `split="train"` never yields a val pair and `split="val"` only
yields val pairs, so validation accuracy measures generalisation, not memorisation. Validation streams also
use a different seed, `seed + ARITHMETIC_VAL_SEED_OFFSET`; `validation_problem` does both.
"""

from __future__ import annotations

import random

ARITHMETIC_VAL_SEED_OFFSET = 1_000_003  # validation streams use seed + this (and split="val")
VAL_PAIR_MODULUS = 10  # one operand pair in VAL_PAIR_MODULUS is held out for validation
_MASK64 = 2**64 - 1
_SEED_MIX = 1_000_003  # random.Random(seed * _SEED_MIX + index): no hash(), so stable across processes


def is_val_pair(a: int, b: int, op: str = "+") -> bool:
    """True if the problem `a op b` belongs to the held-out validation side (a fixed hash of the operands)."""
    h = (a * 1_000_003 + b * 1009 + (0 if op == "+" else 1)) & _MASK64
    for _ in range(2):  # two splitmix64-style rounds: a well-mixed, stable integer hash
        h = ((h ^ (h >> 31)) * 0x9E3779B97F4A7C15) & _MASK64
    return (h >> 32) % VAL_PAIR_MODULUS == 0


def format_completion(answer: str) -> str:
    """The reference completion for an answer: `\\boxed{answer}`."""
    return "\\boxed{" + answer + "}"


def arithmetic_problem(seed: int, index: int, max_operand: int = 99, split: str = "train", ops: str = "+") -> dict:
    """Problem `index` of the stream `seed`: {"prompt": "a+b=", "answer": str(a+b)}.

    Operands are uniform in [0, max_operand]. `ops` is the set of operators to draw from ("+" or "+-";
    subtraction puts the larger operand first so answers stay non-negative). `split` picks which side of the
    fixed train/val partition of operand pairs the problem comes from.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    bad = set(ops) - {"+", "-"}
    if not ops or bad:
        raise ValueError(f"ops must be a non-empty subset of '+-', got {ops!r}")
    rng = random.Random(seed * _SEED_MIX + index)
    want_val = split == "val"
    while True:  # rejection sampling onto the requested side of the partition (~10 tries for val)
        op = rng.choice(ops)
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and a < b:
            a, b = b, a
        if is_val_pair(a, b, op) == want_val:
            break
    result = a + b if op == "+" else a - b
    return {"prompt": f"{a}{op}{b}=", "answer": str(result)}


def validation_problem(seed: int, index: int, max_operand: int = 99, ops: str = "+") -> dict:
    """Problem `index` of the held-out validation stream for training seed `seed`."""
    return arithmetic_problem(seed + ARITHMETIC_VAL_SEED_OFFSET, index, max_operand, split="val", ops=ops)


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, stripped, or None (the reward's own extraction)."""
    from kpo_lightning.rewards.answer_extraction import extract_boxed as last_boxed

    found = last_boxed(text)
    return found.strip() if found is not None else None


def exact_match_reward(completion: str, answer: str) -> float:
    """1.0 if the last boxed value of `completion` is the integer `answer`, else 0.0.

    A dependency-free stand-in for the math-verify reward on this task (integers only, so comparing the parsed
    ints is exact: "046" counts as 46, like a symbolic check would)."""
    got = extract_boxed(completion)
    if got is None:
        return 0.0
    try:
        return float(int(got) == int(answer))
    except ValueError:
        return 0.0
