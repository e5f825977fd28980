"""The README and the measured record link into each other by section: every link must land."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "reports/README.md", "reports/results.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(title: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[str]:
    """The markdown headings' titles; a line starting with # inside a code block is a shell comment."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.append(line.lstrip("#").strip())
    return found


def anchors(text: str) -> set[str]:
    return {anchor(title) for title in headings(text)}


def test_anchor_follows_github() -> None:
    assert anchor("Does distillation pay? Student sweep benchmark") == "does-distillation-pay-student-sweep-benchmark"
    assert anchor("CI's time") == "cis-time"
    assert anchor("The served student, optimized") == "the-served-student-optimized"


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_lands_on_a_file_and_heading(doc: str) -> None:
    source = ROOT / doc
    broken = []
    for target in LINK.findall(source.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, section = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif section and section not in anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc}: {broken}"


def test_every_section_the_code_names_exists() -> None:
    # Comments cite measurements as (reports/results.md, "Section"); a renamed section would leave them pointing nowhere.
    cited = re.compile(r'(README|reports/results\.md)[,:]? "([^"]+)"')
    docs = {"README": ROOT / "README.md", "reports/results.md": ROOT / "reports/results.md"}
    titles = {name: headings(path.read_text(encoding="utf-8")) for name, path in docs.items()}
    files = [*ROOT.glob("kdlib/*.py"), *ROOT.glob("search/**/*.py"), *ROOT.glob("search/**/*.yaml"), *ROOT.glob("reports/*.py")]
    found, missing = 0, []
    for path in files:
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", path.read_text(encoding="utf-8"))  # a citation may wrap onto a comment line
        for doc, section in cited.findall(text):
            found += 1
            if not any(title.startswith(section) for title in titles[doc]):
                missing.append(f"{path.relative_to(ROOT)}: {doc} {section!r}")
    assert found >= 10, "the citations were not read"
    assert not missing, missing
