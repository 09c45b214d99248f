"""The README is the front door and ``docs/`` holds the reference (issue 18, item 16): the README
stays short, links every page, and gives the two commands (set up and run; the tests) that
``.ci/run`` relies on; every relative link in the README and the pages resolves, anchors included
(headings slugged as GitHub does)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
#: A front door, not a manual: what, install, quick start, the two commands, a tour, links.
README_MAX_LINES = 150

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _outside_fences(text: str) -> str:
    kept, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
            continue
        if not fence:
            kept.append(line)
    return "\n".join(kept)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _outside_fences(path.read_text()).splitlines()
            if re.match(r"#{1,6} ", line)}


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_the_readme_is_a_front_door_that_links_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = {target.split("#")[0] for target in _LINK.findall(_outside_fences(text))}
    assert {f"docs/{page.name}" for page in DOCS.glob("*.md")} <= linked


def test_the_readme_gives_the_commands_ci_runs():
    commands = re.findall(r"```sh\n(.*?)\n```", README.read_text(), re.S)
    demo = [block for block in commands if "masqd run --backend dry-run --config examples/config.yaml" in block]
    assert len(demo) == 1 and "--http-address 127.0.0.1:" in demo[0]  # the demo never listens on the LAN
    assert ".venv/bin/python -m pytest -q" in commands
    assert ".venv/bin/python -m pytest -q" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", [pytest.param(p, id=p.relative_to(REPO).as_posix()) for p in _pages()])
def test_every_relative_link_resolves(page):
    broken = []
    for target in _LINK.findall(_outside_fences(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https://, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no {resolved.relative_to(REPO) if REPO in resolved.parents else resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.name}")
    assert broken == []
