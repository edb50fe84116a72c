"""Tests for models.swap: a bundle replaced whole, and what a kill in the middle leaves repaired."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from models import swap
from models.bundle import BundleError, read_manifest
from models.train import check_output
from pipeline import inspect

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bundle_like(path, tag):
    """A directory holding a bundle's three file names; `tag` tells old from new."""
    os.makedirs(path)
    for name in ("manifest.json", "model.keras", "tokenizer.json"):
        with open(os.path.join(path, name), "w", encoding="utf-8") as handle:
            handle.write(tag)


def _tag(path):
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as handle:
        return handle.read()


def _child(code):
    """Runs `code` in a fresh Python from the repository; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPOSITORY, capture_output=True, text=True
    )


def test_the_swap_is_one_exchange_with_no_moment_without_the_bundle(tmp_path, monkeypatch):
    target, staging = str(tmp_path / "B"), str(tmp_path / ".B.writing-x")
    _bundle_like(target, "old")
    _bundle_like(staging, "new")
    renames = []
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: renames.append((a, b)) or real(a, b))
    with swap.held(staging):  # as save_bundle holds it while it writes
        swap.swap_in(staging, target)
    assert _tag(target) == "new"
    assert renames == []  # one renameat2(RENAME_EXCHANGE), never B renamed away
    assert os.listdir(tmp_path) == ["B"]


def test_a_kill_between_the_two_renames_is_repaired_by_the_next_run(tmp_path, capsys):
    # Where the exchange is not offered, the swap is two renames; the child is killed between them.
    target = str(tmp_path / "B")
    _bundle_like(target, "old")
    _bundle_like(str(tmp_path / ".B.writing-k"), "new")
    killed = _child(f"""
        import os, signal
        from models import swap
        swap._exchange = lambda first, second: False
        real = os.rename
        def rename(source, destination):
            real(source, destination)
            if ".replaced-" in destination:
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
        with swap.held({str(tmp_path / ".B.writing-k")!r}):
            swap.swap_in({str(tmp_path / ".B.writing-k")!r}, {target!r})
    """)
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(target)
    assert sorted(os.listdir(tmp_path)) == [".B.replaced-k", ".B.writing-k"]

    # Loading it names the old bundle and how to put it back, in one line.
    with pytest.raises(BundleError) as raised:
        read_manifest(target)
    message = str(raised.value)
    assert "\n" not in message
    assert f"mv {tmp_path / '.B.replaced-k'} {target}" in message

    # So does the export's (and inspect's) --model.
    assert inspect.main([target]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"error: --model {target!r} does not exist: a `models.train --overwrite` was stopped"
    )
    assert f"mv {tmp_path / '.B.replaced-k'} {target}" in line

    # The next models.train puts the old bundle back and removes the stale staging directory.
    with pytest.raises(BundleError, match="already holds a bundle; pass --overwrite"):
        check_output(target, overwrite=False)
    assert _tag(target) == "old"
    assert os.listdir(tmp_path) == ["B"]


def test_a_finished_swap_killed_while_removing_the_old_bundle_leaves_nothing_next_time(tmp_path):
    target = str(tmp_path / "B")
    _bundle_like(target, "new")
    _bundle_like(str(tmp_path / ".B.replaced-r"), "old")
    assert swap.repair(target) == [f"removed {tmp_path / '.B.replaced-r'}, an old bundle already replaced"]
    assert os.listdir(tmp_path) == ["B"] and _tag(target) == "new"


def test_only_a_staging_directory_whose_writer_is_gone_is_removed(tmp_path):
    target = str(tmp_path / "B")
    stale = str(tmp_path / ".B.writing-stale")
    # A writer killed while it wrote: its lock went with it.
    killed = _child(f"""
        import os, signal
        from models import swap
        os.makedirs({stale!r})
        with swap.held({stale!r}):
            open(os.path.join({stale!r}, "model.keras"), "w").write("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert killed.returncode == -signal.SIGKILL
    live = str(tmp_path / ".B.writing-live")
    os.makedirs(live)
    with swap.held(live):  # another run still writing this one
        swap.repair(target)
    assert sorted(os.listdir(tmp_path)) == [".B.writing-live"]


def test_links_and_directories_that_are_not_bundles_are_never_moved_or_removed(tmp_path):
    target = str(tmp_path / "B")
    elsewhere = tmp_path / "elsewhere"
    _bundle_like(str(elsewhere), "someone else's")
    os.symlink(elsewhere, tmp_path / ".B.replaced-link")
    os.symlink(elsewhere, tmp_path / ".B.writing-link")
    os.makedirs(tmp_path / ".B.replaced-notes")
    (tmp_path / ".B.replaced-notes" / "notes.txt").write_text("mine")
    assert swap.repair(target) == []
    assert not os.path.lexists(target)
    assert _tag(str(elsewhere)) == "someone else's"
    assert sorted(os.listdir(tmp_path)) == [
        ".B.replaced-link",
        ".B.replaced-notes",
        ".B.writing-link",
        "elsewhere",
    ]


def test_the_staging_of_a_bundle_named_like_a_leftover_is_not_taken_for_one(tmp_path):
    # Bundle "B.replaced-x" being written: its staging starts with ".B.replaced-" too.
    other = tmp_path / ".B.replaced-x.writing-abc"
    _bundle_like(str(other), "other bundle")
    assert swap.repair(str(tmp_path / "B")) == []
    assert sorted(os.listdir(tmp_path)) == [".B.replaced-x.writing-abc"]
