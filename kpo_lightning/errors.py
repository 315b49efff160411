"""Every exception type the package raises on purpose, and the one-line message for a value not among the choices.

`UserInputError` is input a user can fix: `run.py` turns it into a single line on stderr and exit code 2. The
others are run failures `run.py` reports in one line too (exit 1); everything else is a bug and keeps its
traceback.
"""

from collections.abc import Iterable
from typing import Any


class UserInputError(ValueError):
    """Bad input that the user can fix: the message names the key, value or path and the fix."""


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise `key=value is invalid: use one of ...` unless value is one of choices (config checks and API alike)."""
    choices = tuple(choices)
    if value not in choices:
        raise UserInputError(f"{key}={value!r} is invalid: use one of {', '.join(map(str, choices))}")


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions, I/O error); the previous ones are intact."""
