"""Every ``docs/<file>.md §N`` cited in the code names a document in docs/ with a heading numbered N."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"docs/([\w-]+\.md) §\s?(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def _citations() -> set[tuple[str, str, str]]:
    found = set()
    for path in sorted((ROOT / "geoloc").rglob("*.py")):
        for doc, section in CITE.findall(path.read_text(encoding="utf-8")):
            found.add((str(path.relative_to(ROOT)), doc, section))
    return found


def test_heading_pattern_reads_numbered_headings():
    text = "# Title\n## 7. Samplers\n### 7.3 Riemannian Euler\n"
    assert HEADING.findall(text) == ["7", "7.3"]


def test_every_cited_section_exists():
    missing = []
    for source, doc, section in sorted(_citations()):
        path = ROOT / "docs" / doc
        if not path.exists():
            missing.append(f"{source}: docs/{doc} does not exist")
            continue
        if section not in set(HEADING.findall(path.read_text(encoding="utf-8"))):
            missing.append(f"{source}: docs/{doc} has no heading §{section}")
    assert not missing, "\n".join(missing)
