"""Docs links resolve: every relative markdown link in README.md and docs/ points at a file (and, with a
``#fragment``, at a heading of it), and every ``docs/...md`` path named in the code, configs and docs exists.

Guides (docs/*.md) and measurement records (docs/results/*.md) are separate files; a moved section must
not leave a dangling link behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
DOCS_PATH = re.compile(r"(?<![\w/.])docs/[\w./-]*?\.md\b")
FENCE = re.compile(r"^(```|~~~)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a link inside a code sample is not a link)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(line)
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", _prose(path.read_text()), re.MULTILINE)}


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_docs_are_split_into_guides_and_records():
    results = ROOT / "docs" / "results"
    assert (ROOT / "docs" / "design.md").is_file()
    records = {p.stem for p in results.glob("*.md")}
    assert {"objectives", "quickstart", "embedded_base", "performance", "federated", "downstream"} <= records
    for record in records:  # each record has its guide
        assert (ROOT / "docs" / f"{record}.md").is_file(), record


def test_the_preregistration_opens_the_objectives_record():
    text = (ROOT / "docs" / "results" / "objectives.md").read_text()
    first = re.search(r"^## (.*)$", text, re.MULTILINE)
    assert first is not None
    assert first.group(1).startswith("Pre-registered endpoints (issue 34 protocol), declared 2026-12-07")
    assert "(committed in 14985cf)" in text[first.end() : first.end() + 200]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_markdown_links_resolve(path: Path):
    broken = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_docs_paths_named_in_code_and_docs_exist():
    sources = [*MARKDOWN]
    for folder, pattern in (
        ("insitu", "*.py"),
        ("insitu", "*.yaml"),
        ("benchmarks", "*.py"),
        ("benchmarks", "*.sh"),
        ("configs", "*.yaml"),
    ):
        sources += sorted((ROOT / folder).rglob(pattern))
    missing = sorted(
        {
            f"{src.relative_to(ROOT)}: {name}"
            for src in sources
            for name in DOCS_PATH.findall(src.read_text())
            if not (ROOT / name).is_file()
        }
    )
    assert not missing, f"docs paths that do not exist: {missing}"


def test_the_check_sees_a_broken_link(tmp_path: Path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading: with `code`\n")
    page.write_text(
        "[ok](there.md#a-heading-with-code) [gone](missing.md) ![img](x.png) [web](https://example.org)\n```\n[code](nope.md)\n```\n"
    )
    links = relative_links(page)
    assert links == ["there.md#a-heading-with-code", "missing.md"]
    assert "a-heading-with-code" in anchors(tmp_path / "there.md")
    assert not (tmp_path / "missing.md").exists()
