"""Tests for benchmarks.index's --workdir: it never writes over files it did not make."""

import os
import sys

import forkserver
import pytest

from benchmarks.index import WORKDIR_MARKER, claim_workdir

TINY = ["--documents", "30", "--rows", "60", "--exact_queries", "1", "--index_queries", "1", "--batch", "1"]
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_workdir_holding_a_users_corpus_is_refused_before_anything_is_written(tmp_path):
    mine = tmp_path / "corpus.jsonl"
    mine.write_text('{"id": "mine-1", "content": "MY CORPUS"}\n')
    done = forkserver.run(
        # Sizes that finish in seconds where the workdir were (wrongly) taken.
        [sys.executable, "-m", "benchmarks.index", "--workdir", str(tmp_path), *TINY],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: --workdir {str(tmp_path)!r} holds files that benchmarks.index did not write "
        "(e.g. 'corpus.jsonl'), which it would overwrite; choose a new or empty directory."
    ]
    assert mine.read_text() == '{"id": "mine-1", "content": "MY CORPUS"}\n'
    assert os.listdir(tmp_path) == ["corpus.jsonl"]


def test_a_new_empty_or_earlier_workdir_is_taken_and_a_file_is_not(tmp_path):
    fresh = tmp_path / "new" / "work"
    claim_workdir(str(fresh))
    assert os.listdir(fresh) == [WORKDIR_MARKER]
    (fresh / "corpus.jsonl").write_text("the benchmark's own\n")
    claim_workdir(str(fresh))  # an earlier run's: taken again
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        claim_workdir(str(tmp_path / "file"))
