"""The project's documentation: every relative link and image in README.md and docs/*.md names a file of
the repository (a renamed figure or page breaks no link), and none points outside it."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_names_a_file_of_the_repository(page):
    for target in relative_links(page):
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"{page.name}: {target} points outside the repository"
        assert path.exists(), f"{page.name}: {target} does not exist"


def test_the_link_reader_finds_links_and_images(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("![a](fig.png) [b](other.md#x) [c](https://x.org) [d](#here)\n```\n[e](code.md)\n```\n")
    assert relative_links(page) == ["fig.png", "other.md#x"]
