"""Tests for benchmarks.corpora's OUTPUT: never replaced without --overwrite, never written through a link."""

import os
import subprocess
import sys

import forkserver
import pytest

from benchmarks import corpora

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINE = '{"id": "mine-1", "content": "my precious corpus"}\n'


def _corpora(*args: str) -> subprocess.CompletedProcess:
    return forkserver.run(
        [sys.executable, "-m", "benchmarks.corpora", *args],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_existing_file_or_link_is_refused_and_left_as_it_was(tmp_path):
    mine = tmp_path / "my_corpus.jsonl"
    mine.write_text(MINE)
    notes = tmp_path / "notes.txt"
    notes.write_text("precious notes\n")
    (tmp_path / "link.jsonl").symlink_to(notes)
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "missing")
    for name in ("my_corpus.jsonl", "link.jsonl", "dangling.jsonl"):
        done = _corpora(str(tmp_path / name), "--documents", "3")
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            f"error: {tmp_path / name}: it already exists; pass --overwrite to replace it"
        ]
    assert mine.read_text() == MINE
    assert notes.read_text() == "precious notes\n"
    assert os.readlink(tmp_path / "link.jsonl") == str(notes)
    assert sorted(os.listdir(tmp_path)) == ["dangling.jsonl", "link.jsonl", "my_corpus.jsonl", "notes.txt"]


@pytest.mark.parametrize("documents", ["0", "-1"])
def test_fewer_than_one_document_is_refused_before_anything_is_opened(tmp_path, documents):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious notes\n")
    (tmp_path / "link.jsonl").symlink_to(notes)
    for target in (tmp_path / "link.jsonl", tmp_path / "new.jsonl"):
        done = _corpora(str(target), "--documents", documents, "--overwrite")
        assert done.returncode == 2
        assert done.stderr.splitlines()[-1].endswith(
            f"argument --documents: {documents} is below 1: a corpus needs at least one document"
        )
        assert "Traceback" not in done.stderr
    assert notes.read_text() == "precious notes\n"
    assert sorted(os.listdir(tmp_path)) == ["link.jsonl", "notes.txt"]


def test_overwrite_replaces_the_link_itself_and_not_its_target(tmp_path, monkeypatch):
    # A few real sentences stand in for the standard library's (parsing it all takes seconds).
    pool = [
        "The quick brown fox jumps over the lazy dog.",
        "Every record read becomes a row or a dead letter.",
        "Vectors are written as Parquet files for DuckDB and pandas.",
    ]
    monkeypatch.setattr(corpora, "sentence_pool", lambda: pool)
    notes = tmp_path / "notes.txt"
    notes.write_text("precious notes\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(notes)
    with pytest.raises(FileExistsError):
        corpora.write_real_corpus(str(link), 3)
    corpora.write_real_corpus(str(link), 3, overwrite=True)
    assert not link.is_symlink()
    assert len(link.read_text().splitlines()) == 3
    assert notes.read_text() == "precious notes\n"
    assert sorted(os.listdir(tmp_path)) == ["link.jsonl", "notes.txt"]
