"""Nothing lost while reading: every file in `adversarial_corpus` ends as rows and reasoned dead letters.

All cases of a format run as one export, which checks the exact accounting,
every case's rows and every dead letter's reason and position (cases name their
files apart, so one export holds them all), and the exit status (5 when a file
broke, records lost unknown).
"""

import os

import pyarrow.dataset as ds
import pytest
from adversarial_corpus import CASES, FORMAT_FLAGS, write

from pipeline.run import main
from pipeline.running import export
from pipeline.writing import layout as layout_lib
from pipeline.writing import state as state_lib


def _read_dir(directory):
    if not os.path.isdir(directory):
        return []
    dataset = ds.dataset(directory, format="parquet", ignore_prefixes=layout_lib.READER_IGNORE_PREFIXES)
    return dataset.to_table().to_pylist()


def _export_and_check(tmp_path, bundle, input_format, cases, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    expected = write(corpus, cases)
    output = str(tmp_path / "out")
    flags = [*FORMAT_FLAGS[input_format], "--max_error_fraction", "1"]
    code = main(["--model", bundle, "--input", str(corpus / "*"), "--output", output, *flags])
    printed = capsys.readouterr()

    assert code == expected.exit_code, printed.err[-3000:]
    assert "Traceback" not in printed.out + printed.err
    rows = _read_dir(output)
    errors = _read_dir(os.path.join(output, layout_lib.ERRORS_DIR))
    assert sorted(row["id"] for row in rows) == sorted(expected.rows)
    found = {(os.path.basename(error["source"]), error["position"]): error["reason"] for error in errors}
    assert found == expected.dead
    assert len(errors) == len(expected.dead)
    for error in errors:
        assert error["message"]
        assert error["raw"] is None or len(error["raw"]) <= 4096

    counts = state_lib.read_manifest(output)["counts"]
    assert counts["records_read"] == expected.records == counts["rows_written"] + counts["dead_letters"]
    assert counts["files_broken"] == expected.broken
    if expected.broken:
        assert "records after a break may be lost" in printed.err
        assert state_lib.read_manifest(output)["status"] == "completed_with_errors"
    return errors


@pytest.mark.parametrize("input_format", list(CASES))
def test_adversarial_corpus_in_one_export(tmp_path, tiny_bundle, capsys, input_format):
    errors = _export_and_check(tmp_path, tiny_bundle[0], input_format, CASES[input_format], capsys)
    carriage_returns = "carriage return (\\r) alone"
    for error in errors:
        # A line of \r-ended lines is a read_error of its own: reading goes on after it.
        if error["reason"] == "read_error" and carriage_returns not in error["message"]:
            assert error["message"].startswith(f"Reading stopped after record {error['position'] - 1}: ")
    hints = {
        ("pretty.jsonl", 1): "jq -c . FILE > FILE.jsonl",
        ("mac.jsonl", None): carriage_returns,
        ("mac-final.jsonl", None): carriage_returns,
        ("mac-mid.jsonl", 2): carriage_returns,
        ("mac-final.txt", None): carriage_returns,
        ("mac-two.txt", None): carriage_returns,
        ("mixed.txt", 2): carriage_returns,
        ("notes.tgz", None): "tar archive",
        ("hidden.jsonl.gz", None): "tar archive",
        ("wide.csv", None): "UTF-16",
    }
    for error in errors:
        hint = hints.get((os.path.basename(error["source"]), error["position"]))
        assert hint is None or hint in error["message"], error


def test_binary_kept_fields_are_text_not_python_reprs(tmp_path, tiny_bundle, capsys):
    """`b"plain"` was kept as "b'plain'": a join key stored as bytes no longer matched."""
    import base64

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": ["k-1", "k-2"],
            "content": ["word1", "word2"],
            "title": ["word3", "word4"],
            "key": pa.array([b"plain", b"\x00\xab"], pa.binary()),
            "tags": pa.array([[b"caf\xc3\xa9"], [b"\xff"]], pa.list_(pa.binary())),
        }
    )
    corpus = tmp_path / "keys.parquet"
    pq.write_table(table, corpus)
    output = tmp_path / "out"
    flags = ["--input_format", "parquet", "--keep_fields", "key,tags"]
    assert main(["--model", tiny_bundle[0], "--input", str(corpus), "--output", str(output), *flags]) == 0
    capsys.readouterr()
    kept = {row["id"]: (row["key"], row["tags"]) for row in _read_dir(output)}
    key_2, tag_2 = (base64.b64encode(data).decode() for data in (b"\x00\xab", b"\xff"))
    assert kept == {
        "k-1": ("plain", '["café"]'),
        "k-2": (key_2, f'["{tag_2}"]'),
    }


def _records_of(output):
    rows = sorted(row["id"] for row in _read_dir(output))
    errors = _read_dir(os.path.join(output, layout_lib.ERRORS_DIR))
    return rows, sorted((error["position"], error["reason"]) for error in errors)


@pytest.mark.parametrize("input_format", ["text", "jsonl"])
def test_carriage_returns_are_judged_alike_in_byte_ranges(tmp_path, tiny_bundle, monkeypatch, input_format):
    """Each range of a split file judges its lines as one read of the whole file does.

    Stray \r (text; whitespace in JSONL) on many lines, the last one included (no
    newline after it), stay text; the line of three \r-ended records is a read_error.
    """
    lines = []
    for n in range(301):  # the last line, no newline after it, holds a stray \r
        stray = "\r" if n % 3 == 0 else ""
        if input_format == "text":
            lines.append(f"word{n % 9} with a stray {stray} in it")
        else:
            lines.append(f'{{"id": "r-{n}",{stray}"content": "word{n % 9}", "title": "word{n % 7}"}}')
    lines[150] = "\r".join(lines[:3])
    path = tmp_path / f"corpus.{'txt' if input_format == 'text' else 'jsonl'}"
    path.write_bytes("\n".join(lines).encode())
    flags = [*FORMAT_FLAGS[input_format], "--max_error_fraction", "1"]
    argv = ["--model", tiny_bundle[0], "--input", str(path), *flags]

    assert main([*argv, "--output", str(tmp_path / "whole")]) == 5
    monkeypatch.setattr(export, "split_bytes_for", lambda options, total: total // 7)
    assert main([*argv, "--output", str(tmp_path / "split")]) == 5

    rows, dead = _records_of(tmp_path / "whole")
    assert dead == [(151, "read_error")] and len(rows) == 300
    assert _records_of(tmp_path / "split") == (rows, dead)
    assert state_lib.read_manifest(str(tmp_path / "split"))["counts"]["ranges_read"] > 1
