"""README.md stays a guide a newcomer can read: short, with the two Start-here commands, and every
relative link (and its #anchor) pointing at something that exists. docs/*.md are held to the same links."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300  # measurements live in docs/; the guide leaves room for new sections under this
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but `-` and `_` dropped, spaces -> `-`."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(path: Path) -> list[str]:
    """The relative links of `path` whose file, or whose #anchor in that file, does not exist."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move measurements and detail to docs/"


def test_readme_keeps_the_two_start_here_commands():
    text = README.read_text(encoding="utf-8")
    start = text.split("## Start here", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in start and "make test" in start
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.parametrize("doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path):
    assert broken_links(doc) == []


def test_the_link_check_sees_a_broken_link(tmp_path: Path):
    (tmp_path / "there.md").write_text("# A heading: `with` code (2026)\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading-with-code-2026) [gone](missing.md) [bad](there.md#nope)\n"
                    "[web](https://example.org) [self](#top)\n# Top\n```\n[in code](nowhere.md)\n```\n",
                    encoding="utf-8")
    assert broken_links(page) == ["missing.md (no such file)", "there.md#nope (no heading #nope in there.md)"]
