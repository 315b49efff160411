"""The code style is checked, not hoped for: `ruff check` (lint) and `ruff format --check` over the repository.

Both use the configuration in pyproject.toml ([tool.ruff]: line length 120, Python 3.10, rules E, F, W, I, UP, B)
and skip what .gitignore ignores. ruff comes with the `test` extra (`pip install -e .[test]`), pinned to one exact
version, since another version may format or lint the same code differently (docs/development.md: moving the pin).
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean():
    result = _ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert result.returncode == 0, (
        f"ruff check found problems (fix them; `ruff check --fix .` fixes some):\n{result.stdout}{result.stderr}"
    )


def test_ruff_format_leaves_every_file_unchanged():
    result = _ruff("format", "--no-cache", "--check", ".")
    assert result.returncode == 0, f"files not in ruff's format (run `ruff format .`):\n{result.stdout}{result.stderr}"


def test_installed_ruff_is_the_pinned_one():
    """The ruff running the two checks above is the exact version the `test` extra pins."""
    pins = re.findall(r'"ruff==([0-9][0-9a-z.]*)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert len(pins) == 1, f"pyproject.toml's test extra pins ruff exactly once (ruff==X.Y.Z); found {pins}"
    installed = _ruff("--version").stdout.split()[-1]
    assert installed == pins[0], (
        f"ruff {installed} is installed but pyproject.toml pins ruff=={pins[0]}: `pip install -e .[test]`, or move "
        "the pin as docs/development.md says"
    )
