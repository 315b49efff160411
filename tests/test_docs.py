"""README.md and docs/*.md hold together: every relative link and `#anchor` resolves, every `kpo_lightning` import in
their code blocks imports, and README stays a short page whose Quick start has the shape CI reads.

Anchors are GitHub's heading slugs (lowercase; punctuation other than `-` and `_` dropped; spaces to `-`; a repeated
heading gets `-1`, `-2`, ...). Links inside fenced code blocks and inline code are not links and are skipped; so are
absolute URLs (`http:`, `https:`, `mailto:`), which would need the network.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/notes/ is engineers' scratch, not a page

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
IMPORT = re.compile(r"^\s*(from\s+kpo_lightning[\w.]*\s+import\s+.+|import\s+kpo_lightning[\w.]*.*)$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a fenced block's lines are replaced by empty ones)."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            out.append("")
        else:
            out.append("" if in_fence else line)
    return out


def code_block_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif in_fence:
            out.append(line)
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links keep their text, markup and punctuation go, spaces become `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(page: Path) -> list[str]:
    """'target: problem' for each relative link or anchor of the page that does not resolve."""
    problems = []
    for number, line in enumerate(prose_lines(page.read_text(encoding="utf-8")), start=1):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                problems.append(f"{page.name}:{number}: {target}: no file {resolved}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{page.name}:{number}: {target}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


def import_statements(text: str) -> list[str]:
    """The `from kpo_lightning... import ...` / `import kpo_lightning...` statements of the code blocks, each whole
    (a parenthesised name list over several lines joined into one statement)."""
    statements, lines = [], code_block_lines(text)
    i = 0
    while i < len(lines):
        m = IMPORT.match(lines[i])
        if m:
            statement = m.group(1).split("#", 1)[0].strip()
            while statement.count("(") > statement.count(")") and i + 1 < len(lines):
                i += 1
                statement += " " + lines[i].split("#", 1)[0].strip()
            statements.append(statement)
        i += 1
    return statements


def test_pages_are_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "index.md", "configuration.md", "development.md", "benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_every_page_is_reachable_from_the_readme_or_the_index():
    linked = set()
    for page in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        for line in prose_lines(page.read_text(encoding="utf-8")):
            for target in LINK.findall(INLINE_CODE.sub("", line)):
                path_part = target.partition("#")[0]
                if path_part and not re.match(r"^[a-z][a-z0-9+.-]*:", path_part):
                    linked.add((page.parent / path_part).resolve())
    assert [p.name for p in PAGES if p.resolve() not in linked and p.name != "README.md"] == []


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    """The link check itself can fail: a broken path, a wrong anchor; inline code and code blocks are not links."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: with punctuation!\n\n## Twice\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md#a-code-heading-with-punctuation) [ok](other.md#twice-1) [ok](#page) [ok](other.md)\n"
        "[missing file](nowhere.md) [bad anchor](other.md#no-such-heading) [bad local](#nope)\n"
        "`[in code](nowhere2.md)`\n```\n[in a block](nowhere3.md)\n```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert any("nowhere.md" in p for p in problems)
    assert any("#no-such-heading" in p for p in problems)
    assert any("#nope" in p for p in problems)


def test_github_slugs():
    assert (
        github_slug("The chain task (`data.source=chain`, `preset=chain`)")
        == "the-chain-task-datasourcechain-presetchain"
    )
    assert github_slug("A real model on a CPU: `preset=smollm2`") == "a-real-model-on-a-cpu-presetsmollm2"
    assert github_slug("Chain task: ratios against response length") == "chain-task-ratios-against-response-length"


def test_kpo_lightning_imports_in_code_blocks_import():
    """Each import line of a README/docs code block runs in a fresh interpreter (no name in them has gone stale)."""
    statements = sorted({s for page in PAGES for s in import_statements(page.read_text(encoding="utf-8"))})
    assert len(statements) >= 5, statements  # README's own-Trainer example and the export example at least
    script = "\n".join(statements)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, f"{script}\n{result.stderr[-2000:]}"


def test_import_statements_are_read_whole():
    text = "```python\nfrom kpo_lightning.config import (\n    DataConfig,  # data\n    LossConfig,\n)\nx = 1\n```\n"
    assert import_statements(text) == ["from kpo_lightning.config import ( DataConfig, LossConfig, )"]


def test_readme_is_short_and_its_quick_start_has_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md is a short page: move detail to docs/"
    section = re.split(r"^## Quick start\s*$", text, flags=re.MULTILINE)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "the Quick start is one fenced block"
    commands = [line for line in blocks[0].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2, commands
