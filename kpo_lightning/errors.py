"""The one exception type for input a user can fix (config, data, paths, reward functions).

`run.py` turns it into a single line on stderr and exit code 2; everything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad input that the user can fix: the message names the key, value or path and the fix."""
