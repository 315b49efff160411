"""The second built-in task: chained addition written out step by step (responses of ~30-150 tokens).

The first built-in task (`kpo_lightning.data.arithmetic`) has 10-token responses, too short to show what the Kalman
filter does to token ratios along a response. Here a prompt adds 5-16 one-digit numbers and the reference
completion adds them one at a time, carrying the running sum:

    prompt     "7+5+9+3+8="
    answer     "32"
    completion "7+5=12;12+9=21;21+3=24;24+8=32;\\boxed{32}"      (the reward reads the last \\boxed{...})

The response length is set by the number of operands (about 8 characters a step with the character tokenizer of
the shipped `tiny-chain` model, so 5 operands give ~40 tokens and 16 give ~130). One-digit operands keep each
step learnable by a sub-million-parameter model (a one-digit number added to the running sum), so the length,
not the difficulty of one addition, is what the task varies.

Like the first task, problem `index` of stream `seed` is a pure function of (seed, index), so resuming is
remembering one integer. Curriculum: the largest operand count grows with the index, from `min_operands` at
index 0 to `max_operands` at index `curriculum_prompts` (0: the full range from the start); each problem's count
is drawn uniformly between `min_operands` and that cap, so every stage still mixes lengths.

Held-out validation: every operand tuple is assigned once and for all to the train or the val side by a fixed
hash (about 1 in 10 is val). `split="train"` never yields a val problem, `split="val"` only val problems.
Validation streams use a different seed (`seed + CHAIN_VAL_SEED_OFFSET`) and no curriculum (the full
`min_operands..max_operands` range), so validation accuracy means the same thing at every point of a run.
"""

from __future__ import annotations

import random

CHAIN_VAL_SEED_OFFSET = 2_000_003  # validation streams use seed + this (and split="val")
VAL_MODULUS = 10  # one operand tuple in VAL_MODULUS is held out for validation
OPERAND_RANGE = (1, 9)  # one-digit operands
DEFAULT_MIN_OPERANDS = 5  # 5 operands: at least 34 response tokens (33 characters plus eos), ~40 typically
DEFAULT_MAX_OPERANDS = 16  # 16 operands: at most 140 response tokens, ~130 typically
MAX_OPERANDS_LIMIT = 40  # beyond this a trace outgrows every preset's rollout.max_new_tokens by far
_MASK64 = 2**64 - 1
_SEED_MIX = 1_000_003  # random.Random(seed * _SEED_MIX + index): no hash(), so stable across processes


def is_val_chain(operands: tuple[int, ...] | list[int]) -> bool:
    """True if the chain of `operands` belongs to the held-out validation side (a fixed hash of the tuple)."""
    h = len(operands)
    for x in operands:  # splitmix64-style mixing of each operand into the running hash
        h = ((h ^ (x + 0x9E3779B97F4A7C15)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 31)) * 0x94D049BB133111EB) & _MASK64
    return (h >> 32) % VAL_MODULUS == 0


def chain_solution(operands: tuple[int, ...] | list[int]) -> str:
    """The step-by-step reference completion: `a+b=s1;s1+c=s2;...;\\boxed{total}`."""
    steps, total = [], operands[0]
    for x in operands[1:]:
        steps.append(f"{total}+{x}={total + x};")
        total += x
    return "".join(steps) + "\\boxed{" + str(total) + "}"


def curriculum_cap(index: int, min_operands: int, max_operands: int, curriculum_prompts: int) -> int:
    """The largest operand count problem `index` may have: grows linearly to `max_operands` at `curriculum_prompts`."""
    if curriculum_prompts <= 0 or index >= curriculum_prompts:
        return max_operands
    return min_operands + (max_operands - min_operands) * index // curriculum_prompts


def check_chain_settings(min_operands: int, max_operands: int, curriculum_prompts: int) -> None:
    """ValueError for settings the generator cannot honour (config_checks gives the user-facing message)."""
    if not 2 <= min_operands <= max_operands <= MAX_OPERANDS_LIMIT:
        raise ValueError(
            f"need 2 <= min_operands <= max_operands <= {MAX_OPERANDS_LIMIT}, got {min_operands}, {max_operands}"
        )
    if curriculum_prompts < 0:
        raise ValueError(f"curriculum_prompts must be >= 0, got {curriculum_prompts}")


def chain_problem(
    seed: int,
    index: int,
    min_operands: int = DEFAULT_MIN_OPERANDS,
    max_operands: int = DEFAULT_MAX_OPERANDS,
    curriculum_prompts: int = 0,
    split: str = "train",
) -> dict:
    """Problem `index` of stream `seed`: {"prompt": "a+b+c=", "answer": str(sum), "completion": trace}."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    check_chain_settings(min_operands, max_operands, curriculum_prompts)
    rng = random.Random(seed * _SEED_MIX + index)
    n = rng.randint(min_operands, curriculum_cap(index, min_operands, max_operands, curriculum_prompts))
    want_val = split == "val"
    while True:  # rejection sampling onto the requested side of the partition (~10 tries for val)
        operands = [rng.randint(*OPERAND_RANGE) for _ in range(n)]
        if is_val_chain(operands) == want_val:
            break
    return {
        "prompt": "+".join(map(str, operands)) + "=",
        "answer": str(sum(operands)),
        "completion": chain_solution(operands),
    }


def chain_validation_problem(
    seed: int, index: int, min_operands: int = DEFAULT_MIN_OPERANDS, max_operands: int = DEFAULT_MAX_OPERANDS
) -> dict:
    """Problem `index` of the held-out validation stream for training seed `seed` (no curriculum)."""
    return chain_problem(seed + CHAIN_VAL_SEED_OFFSET, index, min_operands, max_operands, 0, split="val")


class ChainSource:
    """The training stream for `PromptDataModule` (`data.source=chain`): read(epoch, index) -> (prompt, answer).

    One endless epoch; record `index` is `chain_problem(seed, index, ...)` on the training side, so the data
    module's saved position (an index) resumes it exactly, curriculum included.
    """

    def __init__(self, seed: int, min_operands: int, max_operands: int, curriculum_prompts: int) -> None:
        check_chain_settings(min_operands, max_operands, curriculum_prompts)
        self.seed, self.min_operands, self.max_operands = seed, min_operands, max_operands
        self.curriculum_prompts = curriculum_prompts

    def read(self, epoch: int, index: int) -> tuple[str, str]:
        p = chain_problem(self.seed, index, self.min_operands, self.max_operands, self.curriculum_prompts)
        return p["prompt"], p["answer"]

    def validation_pairs(self, size: int) -> list[tuple[str, str]]:
        """The first `size` (prompt, answer) pairs of the held-out validation stream."""
        val = (chain_validation_problem(self.seed, i, self.min_operands, self.max_operands) for i in range(size))
        return [(p["prompt"], p["answer"]) for p in val]
