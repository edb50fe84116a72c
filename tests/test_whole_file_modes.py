"""Tests that files written whole (vocabulary, plot, batch answers) get the usual permissions, not 0600."""

import os
import stat

import pytest

from models.paths import DEFAULT_BUNDLE
from pipeline import vocabulary
from pipeline.writing.files import write_whole_local


@pytest.fixture
def umask():
    """Sets the process umask for the test (`umask(value)`), and restores it after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_a_new_file_gets_0666_less_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "answers.parquet"
    write_whole_local(str(path), lambda handle: handle.write(b"rows"))
    assert path.read_bytes() == b"rows"
    assert _mode(path) == 0o666 & ~mask


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    path.chmod(0o644)
    umask(0o077)
    write_whole_local(str(path), lambda handle: handle.write(b"new"))
    assert path.read_bytes() == b"new" and _mode(path) == 0o644


def test_the_vocabulary_is_readable_by_others_as_the_export_is(tmp_path, umask):
    umask(0o022)
    output = tmp_path / "vocabulary"
    vocabulary.export_vocabulary(DEFAULT_BUNDLE, None, "emb", str(output))
    assert _mode(output / "vocabulary.parquet") == 0o644
