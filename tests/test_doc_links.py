"""The documentation's relative links and pictures lead somewhere: every file they name exists, and
every #anchor is a heading of the page it points into (as GitHub names headings)."""
import os
import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def markdown_pages() -> list:
    """The repository's own Markdown pages: no hidden folders (.venv, .git), no run outputs, and no
    linked folders (the task folders' models/, datasets linked in)."""
    pages = []
    for folder, subfolders, files in os.walk(REPO):  # does not follow links
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "work_dirs")
        pages += [str((Path(folder) / f).relative_to(REPO)) for f in sorted(files) if f.endswith(".md")]
    return pages


def heading_anchors(markdown: str) -> set:
    """GitHub's anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)  # a '#' in a code block is no heading
    seen, anchors = Counter(), set()
    for title in re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def test_heading_anchors_follow_github():
    assert heading_anchors("# A b\n## On an Intel Xeon (AMX)\n# A b\n```\n# not a heading\n```\n") == {
        "a-b", "on-an-intel-xeon-amx", "a-b-1"}


@pytest.mark.parametrize("page", markdown_pages(), ids=str)
def test_relative_links_and_pictures_resolve(page):
    text = (REPO / page).read_text()
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (REPO / page).parent / path if path else REPO / page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text()):
            broken.append(f"{target}: no such heading")
    assert broken == [], f"{page}: {broken}"
