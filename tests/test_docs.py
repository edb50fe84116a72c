"""The README and docs/: every internal link resolves, and every marked block has a test that runs it."""

import os
import re

import pytest
from doc_pages import MARKERS, PAGES, README, REPOSITORY, anchors, links, markers, read

EXTERNAL = ("http://", "https://", "mailto:")


def _name(page):
    return os.path.relpath(page, REPOSITORY)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_internal_links_resolve(page):
    broken = []
    for target in links(page):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved):
            broken.append(f"{target}: no file {_name(resolved)}")
        elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading #{anchor} in {_name(resolved)}")
    assert not broken, f"{_name(page)} links to what is not there:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {
        os.path.normpath(os.path.join(REPOSITORY, target.partition("#")[0])) for target in links(README)
    }
    unlinked = [_name(page) for page in PAGES if page != README and page not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_blocks_are_marked_only_for_tests_that_run_them(page):
    unknown = sorted(set(markers(page)) - set(MARKERS))
    assert not unknown, f"{_name(page)} marks blocks {unknown}, which no test runs (known: {MARKERS})"


def test_anchors_follow_github():
    page = os.path.join(REPOSITORY, "docs", "token_storage.md")
    assert "per-token-vectors-as-token-ids---token_storage-ids" in anchors(page)


def test_ci_runs_the_readme_test_command():
    """`.ci/run` and the README's "run the tests" command are one command, so CI checks what users run."""
    with open(os.path.join(REPOSITORY, ".ci", "run"), encoding="utf-8") as file:
        ci = [line for line in file.read().splitlines() if line.startswith("python3 -m venv")]
    readme = read(README).splitlines()
    command = readme[
        readme.index(
            "# run the tests: set-up, lint, type check, then pytest (the same command CI runs, in .ci/run)"
        )
        + 1
    ]
    assert ci == [command]
    for step in ("-c constraints.txt", "ruff check .", "ruff format --check .", "mypy", "pytest"):
        assert step in command


def test_the_structure_table_lists_every_module_and_only_modules_that_exist():
    """README's structure table matches the tree: each module of `pipeline/` and `models/` has a row."""
    table = read(README).split("## Structure of the project", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| \*{0,2}`([\w/.]+)`", table, flags=re.M))
    missing_paths = sorted(path for path in listed if not os.path.exists(os.path.join(REPOSITORY, path)))
    assert not missing_paths, f"the structure table names what does not exist: {missing_paths}"
    modules = {
        os.path.relpath(os.path.join(directory, name), REPOSITORY)
        for package in ("pipeline", "models")
        for directory, _, names in os.walk(os.path.join(REPOSITORY, package))
        for name in names
        if name.endswith(".py") and name != "__init__.py"
    }
    unlisted = sorted(modules - listed)
    assert not unlisted, f"modules without a row in README's structure table: {unlisted}"
