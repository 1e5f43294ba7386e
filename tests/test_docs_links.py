"""Every ``docs/<file>.md §N`` cited in the code names a document in docs/ with a heading numbered N.

A citation is a document followed by one or more sections: ``docs/eval-protocol.md §1.4, §2.2`` or a range
``docs/reference-behaviour.md §9–§10`` (both ends are checked). A ``§`` followed by a number anywhere else in
geoloc/, bench/ or tests/ is a bare citation: the reader cannot tell which document it means, so it fails.
Sections of external standards and of tracker issues (``RFC 7946 §3.1.9``, ``issue 14 §3``) are allowed.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("geoloc", "bench", "tests")
NUM = r"\d+(?:\.\d+)*"
# A document, then its sections: "§N", continued by ", §N" (a list) or "–§N" (a range).
CITE = re.compile(rf"docs/([\w-]+\.md) (§\s?{NUM}(?:(?:, ?|–)§\s?{NUM})*)")
SECTION = re.compile(rf"§\s?({NUM})")
BARE = re.compile(rf"§\s?{NUM}")
STANDARD = re.compile(r"(?:RFC|[Ii]ssue) \d+ $")
HEADING = re.compile(r"^#+\s+§?(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def _source_files() -> list[Path]:
    files = []
    for top in SOURCES:
        files.extend(p for p in sorted((ROOT / top).rglob("*.py")) if p.resolve() != Path(__file__).resolve())
    return files


def _citations(text: str) -> list[tuple[str, str]]:
    """(document, section) for every section of every citation in ``text``."""
    return [(doc, sec) for doc, group in CITE.findall(text) for sec in SECTION.findall(group)]


def _bare(text: str) -> list[tuple[int, str]]:
    """(line, ``§N``) for each section sign that belongs to no docs/ citation and to no external standard."""
    blanked = CITE.sub(lambda m: " " * len(m.group(0)), text)  # same offsets, so line numbers stay right
    return [
        (blanked.count("\n", 0, m.start()) + 1, m.group(0))
        for m in BARE.finditer(blanked)
        if not STANDARD.search(blanked, max(0, m.start() - 20), m.start())
    ]


def _headings(doc: Path) -> set[str]:
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def test_heading_pattern_reads_numbered_headings():
    text = "# Title\n## 7. Samplers\n### 7.3 Riemannian Euler\n## §16.1 EMA\n- 8.1 not a heading\n"
    assert HEADING.findall(text) == ["7", "7.3", "16.1"]


def test_citation_pattern_reads_lists_and_ranges():
    doc = "docs/x.md"
    text = f"({doc} §1.4, §2.2) and ({doc} §9–§10; see also {doc} §3)"
    assert _citations(text) == [
        ("x.md", "1.4"),
        ("x.md", "2.2"),
        ("x.md", "9"),
        ("x.md", "10"),
        ("x.md", "3"),
    ]
    assert _bare(text) == []


def test_bare_pattern_flags_undocumented_sections_but_not_standards():
    sign = "\u00a7"  # written out so that this file's own text holds no bare citation
    text = (
        f"the reference ({sign}16.1),\nRFC 7946 {sign}3.1.9, issue 14 {sign}3, docs/x.md {sign}2 and {sign}4"
    )
    assert _bare(text) == [(1, f"{sign}16.1"), (2, f"{sign}4")]


def test_every_cited_section_exists():
    missing = []
    for path in _source_files():
        source = path.relative_to(ROOT)
        for doc, section in sorted(set(_citations(path.read_text(encoding="utf-8")))):
            target = ROOT / "docs" / doc
            if not target.exists():
                missing.append(f"{source}: docs/{doc} does not exist")
            elif section not in _headings(target):
                missing.append(f"{source}: docs/{doc} has no heading §{section}")
    assert not missing, "\n".join(missing)


def test_no_bare_section_citations():
    bare = []
    for path in _source_files():
        for lineno, hit in _bare(path.read_text(encoding="utf-8")):
            bare.append(f"{path.relative_to(ROOT)}:{lineno}: {hit}")
    assert not bare, "cite as docs/<file>.md §N:\n" + "\n".join(bare)


def test_docs_cite_only_their_own_sections_and_each_other():
    """Cross-references inside docs/ resolve too (a doc's own ``§N`` means its own heading N)."""
    missing = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        for other, section in _citations(text):
            target = ROOT / "docs" / other
            if not target.exists() or section not in _headings(target):
                missing.append(f"docs/{doc.name}: docs/{other} §{section} not found")
        own = _headings(doc)
        for lineno, hit in _bare(text):
            if SECTION.search(hit).group(1) not in own:
                missing.append(f"docs/{doc.name}:{lineno}: {hit} is not a heading of this document")
    assert not missing, "\n".join(missing)
