"""Every relative link in README.md and docs/*.md names a file or folder that exists, and README links every page.

Pure and fast (reads a dozen Markdown files, no imports of the project). A link is
``[text](target)``; targets with a scheme (``https:``, ``mailto:``) and pure
``#anchors`` are skipped, a ``#fragment`` is dropped, and the rest is resolved
against the folder of the file that holds it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The targets of ``page``'s relative links, fragments dropped."""
    targets = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_relative_links_finds_links_and_skips_schemes_and_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "[a](docs/x.md#part) [b](https://example.org/y) [c](#top) [d](../z.py) [e](mailto:me@example.org)\n"
        "not a link (q.md) and [text] (r.md)\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["docs/x.md", "../z.py"]


def test_every_relative_link_resolves():
    checked, broken = 0, []
    for page in pages():
        for target in relative_links(page):
            checked += 1
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert checked > 0
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs, "docs/ holds no page"
    linked = {(ROOT / target).resolve() for target in relative_links(ROOT / "README.md")}
    unlinked = [str(p.relative_to(ROOT)) for p in docs if p.resolve() not in linked]
    assert not unlinked, f"docs pages README.md does not link: {unlinked}"
