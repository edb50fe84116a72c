"""The README and the docs/ pages read for the tests: their marked code blocks, links and headings.

A fenced block preceded by `<!-- MARKER -->` is run by the test that collects MARKER
(`runnable`: tests/test_analyze.py, `token-ids`: tests/test_token_ids.py), on whichever
page it is, so a block moved between pages stays tested.
"""

import glob
import os
import re
from typing import NamedTuple

# Not pipeline_fixtures' REPOSITORY: that module imports Keras, and the link checks are pure.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPOSITORY, "README.md")
PAGES = (README, *sorted(glob.glob(os.path.join(REPOSITORY, "docs", "*.md"))))
MARKERS = ("runnable", "token-ids")

_FENCE = re.compile(r"^```.*?^```[^\n]*$", flags=re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


class Block(NamedTuple):
    """One marked fenced block: the page it is on (relative to the repository), its language and code."""

    page: str
    language: str
    code: str


def read(page: str) -> str:
    with open(page, encoding="utf-8") as handle:
        return handle.read()


def marked_blocks(marker: str) -> list[Block]:
    """The fenced blocks marked `<!-- marker -->`, in page order (README first, then docs/ by name)."""
    pattern = re.compile(
        rf"<!-- {re.escape(marker)} -->\s*\n```(\w+)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE
    )
    return [
        Block(os.path.relpath(page, REPOSITORY), language, code)
        for page in PAGES
        for language, code in pattern.findall(read(page))
    ]


def markers(page: str) -> list[str]:
    """Every `<!-- ... -->` marker that precedes a fenced block on the page."""
    return re.findall(r"<!-- ([\w-]+) -->\s*\n```", read(page))


def prose(page: str) -> str:
    """The page without its fenced blocks, where neither links nor headings count."""
    return _FENCE.sub("", read(page))


def links(page: str) -> list[str]:
    """The targets of the page's Markdown links, in order."""
    return _LINK.findall(prose(page))


def anchors(page: str) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+?)\s*$", prose(page), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in found:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        found.add(anchor)
    return found
