""".ci/run does what a new user does: README's second Quick start command, in a fresh venv outside the checkout.

The command is read out of README.md by `.ci/run` itself; here a stand-in README (`CI_README`) with cheap commands
checks the rules: the venv is new, outside the checkout and removed afterwards, the command runs from the repository
root, a failing command fails CI, and pytest's exit code 5 (no tests collected) fails it too.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / ".ci" / "run"


def quick_start_commands(readme: Path) -> list[str]:
    """The non-comment lines of the fenced block under README's '## Quick start' heading."""
    section = re.split(r"^## Quick start\s*$", readme.read_text(encoding="utf-8"), flags=re.MULTILINE)[1]
    block = re.search(r"^```[^\n]*\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_ci(*args: str, readme: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "CI_README")}
    if readme is not None:
        env["CI_README"] = str(readme)
        env["CI_VENV_OPTIONS"] = "--without-pip"  # the stand-in commands install nothing; saves ~10 s per venv
    return subprocess.run(["bash", str(CI), *args], capture_output=True, text=True, env=env, timeout=timeout)


def stand_in_readme(tmp_path: Path, second_command: str) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n## Quick start\n\n```bash\n# a comment line is not a command\necho first\n"
        f"{second_command}\n```\n\nText.\n\n```bash\necho not-this-block\n```\n"
    )
    return readme


def test_ci_runs_the_readme_s_second_quick_start_command():
    commands = quick_start_commands(ROOT / "README.md")
    assert len(commands) == 2
    assert "pytest" in commands[1] and ".[test]" in commands[1]
    result = run_ci("--print-command")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == commands[1]


def test_ci_reads_the_second_command_of_the_first_block(tmp_path):
    result = run_ci("--print-command", readme=stand_in_readme(tmp_path, "echo second"))
    assert result.stdout.strip() == "echo second"


def test_ci_refuses_a_readme_without_a_second_command(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("## Quick start\n\n```bash\necho only\n```\n")
    result = run_ci(readme=readme)
    assert result.returncode != 0 and "no second command" in result.stderr


def test_ci_uses_a_fresh_venv_outside_the_checkout_from_the_repository_root(tmp_path):
    probe = (
        'python -c "import os, sys; assert sys.prefix != sys.base_prefix, sys.prefix; '
        "assert os.path.isfile('.ci/run'), os.getcwd(); print('PREFIX=' + sys.prefix)\""
    )
    prefixes = []
    for _ in range(2):
        result = run_ci(readme=stand_in_readme(tmp_path, probe))
        assert result.returncode == 0, result.stdout + result.stderr
        prefix = Path(re.search(r"^PREFIX=(.+)$", result.stdout, flags=re.MULTILINE).group(1))
        assert ROOT not in prefix.resolve().parents  # outside the checkout
        assert not prefix.exists()  # removed at the end
        prefixes.append(prefix)
    assert prefixes[0] != prefixes[1]  # a new one on every run


@pytest.mark.parametrize(
    ("command", "status"),
    [("false && echo installed", 1), ("true && python -c 'import sys; sys.exit(3)'", 3)],
)
def test_ci_fails_when_either_part_of_the_command_fails(tmp_path, command, status):
    result = run_ci(readme=stand_in_readme(tmp_path, command))
    assert result.returncode == status, result.stdout + result.stderr


def test_pytest_collecting_no_tests_fails_ci(tmp_path):
    """Exit status 5 is pytest's "no tests collected" (the fresh venv has no pytest, so a stand-in exits with it)."""
    result = run_ci(readme=stand_in_readme(tmp_path, "true && python -c 'import sys; sys.exit(5)'"))
    assert result.returncode == 5, result.stdout + result.stderr
    assert "collected no tests" in result.stderr
