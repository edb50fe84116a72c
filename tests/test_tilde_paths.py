"""Every tool refuses a path flag the shell left a leading '~' in (after '='), as pipeline.run does."""

import os

import pytest

from benchmarks import index as index_benchmark
from models import train
from pipeline import analyze, inspect, vocabulary


def _status(main, argv):
    try:
        return main(argv)
    except SystemExit as exit:  # benchmarks.index exits itself
        return exit.code


@pytest.mark.parametrize(
    ("main", "argv", "named"),
    [
        (inspect.main, ["~/model.h5"], "MODEL '~/model.h5'"),
        (inspect.main, ["model.h5", "--tokenizer=~/tokenizer.json"], "--tokenizer '~/tokenizer.json'"),
        (vocabulary.main, ["--output=~/vocabulary"], "--output '~/vocabulary'"),
        (vocabulary.main, ["--model=~/bundle", "--output", "v"], "--model '~/bundle'"),
        (analyze.main, ["~/export", "knn-score", "--label", "kind"], "OUTPUT_DIR '~/export'"),
        (analyze.main, ["export", "plot", "--out=~/plot.png"], "--out '~/plot.png'"),
        (analyze.main, ["export", "neighbors", "--queries=~/ids.txt"], "--queries '~/ids.txt'"),
        (train.main, ["--output=~/bundle"], "--output '~/bundle'"),
        (train.main, ["--corpus=~/corpus.jsonl", "--output", "b"], "--corpus '~/corpus.jsonl'"),
        (index_benchmark.main, ["--workdir=~/work"], "--workdir '~/work'"),
    ],
)
def test_a_leading_tilde_is_one_error_line_and_nothing_is_made(
    main, argv, named, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert _status(main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(f"error: {named} starts with '~', which the shell did not expand")
    assert os.path.expanduser("~") in line
    assert os.listdir(tmp_path) == []  # no directory named '~' here
