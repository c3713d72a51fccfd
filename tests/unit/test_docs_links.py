"""Every relative link in README.md and docs/*.md leads somewhere.

The README was split into docs/*.md; a link that points to a renamed or never-written file is
what an administrator following the guide hits first. External links (http:, mailto:, ...) are
not checked (no network in tests); a `#anchor` must name a heading of the target file.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(text: str) -> list[str]:
    """Markdown link targets outside fenced code blocks."""
    return LINK.findall(FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def broken(document: Path) -> list[str]:
    wrong = []
    for target in links(document.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, man: ...
            continue
        path, _, fragment = target.partition("#")
        dest = (document.parent / path).resolve() if path else document
        if not dest.exists():
            wrong.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            wrong.append(f"{target}: no heading #{fragment} in {dest.name}")
    return wrong


def test_the_checker_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "b.md").write_text("# Some heading\n")
    doc = tmp_path / "a.md"
    doc.write_text(
        "[ok](b.md) [ok](b.md#some-heading) [web](https://example.org/x.md)\n"
        "[gone](c.md) [bad](b.md#other)\n```\n[in code](d.md)\n```\n"
    )
    assert broken(doc) == ["c.md: no such file", "b.md#other: no heading #other in b.md"]


def test_every_relative_link_in_the_documents_resolves():
    wrong = [f"{doc.relative_to(REPO)}: {problem}" for doc in DOCUMENTS for problem in broken(doc)]
    assert wrong == []
