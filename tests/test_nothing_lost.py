"""Nothing lost: hostile input ends as rows or reasoned dead letters, and output is atomic."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import zipfile

import forkserver
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import REPOSITORY, pipeline_command, wait_for_staged_shard
from sizes import LENGTHS

from models.bundle import load_bundle
from models.paths import SAMPLE_CORPUS
from pipeline.run import EXIT_CONFIG_ERROR, main
from pipeline.running.export import run_export
from pipeline.writing import layout as layout_lib
from pipeline.writing import state as state_lib


def _json(record):
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def _doc(doc_id, content="socket server thread", title="network io"):
    return _json({"id": doc_id, "title": title, "content": content, "kind": "function"})


# (line bytes, expected reason or None for a written row, id in the output)
HOSTILE_JSONL = [
    (_doc("plain"), None),
    (_doc("chinese", "你好世界，这是一个测试", "中文标题"), None),
    (_doc("emoji", "launch 🚀🚀 party 🎉", "emoji 😀"), None),
    (_doc("rtl", "שלום עולם مرحبا بالعالم", "كتاب"), None),
    (_doc("zero_width", "zero\u200bwidth\u200djoiner\ufeff", "invisible\u2060"), None),
    (_doc("escaped_nul", "before\u0000after", "nul"), None),
    (_doc("long", " ".join(["word"] * 500)), None),
    (b'{"id": "bad_utf8", "content": "caf\xe9 \xff\xfe", "title": "x"}', "invalid_utf8"),
    (b'{"id": "raw_nul", "content": "a\x00b", "title": "x"}', "malformed_json"),
    (b"", "empty_record"),
    (b"   \t  ", "empty_record"),
    (b'{"id": "trailing", "content": "x", "title": "y"} garbage', "malformed_json"),
    (b'{"id": "unterminated", "content": "x', "malformed_json"),
    (b'["an", "array"]', "not_an_object"),
    (b"42", "not_an_object"),
    (_json({"id": "int_content", "content": 5, "title": "t"}), "wrong_type"),
    (_json({"id": "nested", "content": {"deep": ["junk", {"x": 1}]}, "title": "t"}), "wrong_type"),
    (_json({"id": "list_title", "content": "ok text", "title": ["a", "b"]}), "wrong_type"),
    (_json({"id": "no_content", "title": "t"}), "missing_field"),
    (_json({"id": "null_content", "content": None, "title": "t"}), "missing_field"),
    (_json({"id": None, "content": "text", "title": "t"}), "missing_id"),
    (_json({"content": "text", "title": "t"}), "missing_id"),
    (_json({"id": {"a": 1}, "content": "text", "title": "t"}), "bad_id"),
    (_doc("plain", "the same id again"), "duplicate_id"),
    (_doc("punctuation", "!!! ... ???", " -- "), "empty_document"),
    (b'{"id": "huge", "content": "' + b"x" * (10 * 1024 * 1024) + b'", "title": "t"}', "too_large"),
]

HOSTILE_CSV = (
    (
        b"id,title,content\r\n"
        b'c1,"quoted, title","a ""quoted"" word and\nan embedded newline"\r\n'
        b"c2,short,plain csv text\r\n"
        b"c3,too,many,fields\r\n"
        b"c4,too few\r\n"
    )
    + b"c5,bad,caf\xe9 bytes\r\n"
    + "c6,中文,emoji 🎉 text\r\n".encode()
)
CSV_EXPECTED = {1: None, 2: None, 3: "wrong_field_count", 4: "wrong_field_count", 5: "invalid_utf8", 6: None}


def _read_dir(directory):
    table = ds.dataset(
        directory, format="parquet", ignore_prefixes=layout_lib.READER_IGNORE_PREFIXES
    ).to_table()
    return table.to_pylist()


def _export(tmp_path, bundle, corpus, name, extra=()):
    output = str(tmp_path / name)
    summary = run_export(["--model", bundle, "--input", corpus, "--output", output, *extra])
    return output, summary


def test_hostile_jsonl_runs_to_completion_with_exact_accounting(tmp_path, tiny_bundle):
    corpus = tmp_path / "hostile.jsonl"
    corpus.write_bytes(b"\n".join(line for line, _ in HOSTILE_JSONL) + b"\n")
    output, summary = _export(
        tmp_path, tiny_bundle[0], str(corpus), "out", ["--keep_fields", "kind", "--max_error_fraction", "1"]
    )

    assert summary.exit_code == 0, summary.message
    rows = _read_dir(output)
    errors = _read_dir(os.path.join(output, "errors"))
    assert summary.records_read == len(HOSTILE_JSONL)
    assert summary.records_read == len(rows) + len(errors)
    assert summary.rows_written == len(rows) and summary.dead_letters == len(errors)

    expected_rows = sorted({json.loads(line)["id"] for line, reason in HOSTILE_JSONL if reason is None})
    assert sorted(row["id"] for row in rows) == expected_rows
    # A document counts once however many of its inputs were cut; "long" is.
    tokenizer = load_bundle(tiny_bundle[0]).tokenizer
    written = [json.loads(line) for line, reason in HOSTILE_JSONL if reason is None]
    cut = np.zeros(len(written), dtype=bool)
    for name, length in LENGTHS.items():
        cut |= tokenizer.encode_batch([document[name] for document in written], length)[3]
    assert cut[[document["id"] for document in written].index("long")]
    assert summary.truncated == int(cut.sum())
    reasons = {error["position"]: error["reason"] for error in errors}
    expected = {number: reason for number, (_, reason) in enumerate(HOSTILE_JSONL, start=1) if reason}
    assert reasons == expected
    for error in errors:
        assert error["source"].endswith("hostile.jsonl")
        assert error["message"]
        assert error["raw"] is None or len(error["raw"]) <= 4096
    # The kept duplicate is the first one in the file, not the later one.
    duplicate = next(e for e in errors if e["reason"] == "duplicate_id")
    assert duplicate["id"] == "plain" and "hostile.jsonl:1" in duplicate["message"]

    manifest = state_lib.read_manifest(output)
    counts = manifest["counts"]
    assert counts["records_read"] == counts["rows_written"] + counts["dead_letters"]
    assert sum(counts["dead_letters_by_reason"].values()) == len(errors)
    assert counts["dead_letters_by_reason"]["malformed_json"] == 3
    shards = manifest["shards"]["rows"] + manifest["shards"]["errors"]
    assert sum(shard["rows"] for shard in shards) == len(rows) + len(errors)
    for shard in shards:
        with open(os.path.join(output, shard["file"]), "rb") as handle:
            assert shard["sha256"] == hashlib.sha256(handle.read()).hexdigest()


def test_hostile_csv_rows_are_read_by_record_not_by_line(tmp_path, tiny_bundle):
    corpus = tmp_path / "hostile.csv"
    corpus.write_bytes(HOSTILE_CSV)
    output, summary = _export(tmp_path, tiny_bundle[0], str(corpus), "out", ["--max_error_fraction", "1"])

    rows = _read_dir(output)
    errors = _read_dir(os.path.join(output, "errors"))
    assert summary.records_read == len(CSV_EXPECTED) == len(rows) + len(errors)
    assert sorted(r["id"] for r in rows) == sorted(
        f"c{n}" for n, reason in CSV_EXPECTED.items() if reason is None
    )
    assert {e["position"]: e["reason"] for e in errors} == {n: r for n, r in CSV_EXPECTED.items() if r}


def test_text_lines_get_file_and_line_ids_and_blank_lines_are_dead_letters(tmp_path, tiny_bundle):
    corpus = tmp_path / "lines.txt"
    corpus.write_bytes("first line\n\n   \nlast line with 🎉\n".encode())
    output, summary = _export(
        tmp_path, tiny_bundle[0], str(corpus), "out", ["--layer", "lstm_content", "--max_error_fraction", "1"]
    )
    rows = _read_dir(output)
    errors = _read_dir(os.path.join(output, "errors"))
    assert sorted(r["id"] for r in rows) == [f"{corpus}:1", f"{corpus}:4"]
    assert sorted((e["position"], e["reason"]) for e in errors) == [
        (2, "empty_document"),
        (3, "empty_document"),
    ]
    assert summary.records_read == 4


@pytest.mark.parametrize(("value", "reason"), [(None, "missing_id"), (1.5, "bad_id")])
def test_a_corpus_without_usable_ids_is_told_to_check_id_field(value, reason, tmp_path, tiny_bundle, capsys):
    """A corpus without ids (the tutorial's) was told "Check --input_format and --input_map"."""
    corpus = tmp_path / "no_ids.jsonl"
    records = [{"title": "network io", "content": f"socket server {n}"} for n in range(5)]
    if value is not None:
        records = [dict(record, id=value) for record in records]
    corpus.write_text("".join(json.dumps(record) + "\n" for record in records))
    output = str(tmp_path / "out")
    assert main(["--model", tiny_bundle[0], "--input", str(corpus), "--output", output]) == 4
    error = capsys.readouterr().err
    assert f"({reason}: 5)" in error and "Check --id_field" in error, error[-2000:]
    assert "--input_format" not in error


def test_too_many_dead_letters_exit_non_zero_but_keep_the_output(tmp_path, tiny_bundle, capsys):
    corpus = tmp_path / "mostly_bad.jsonl"
    corpus.write_bytes(b"\n".join([_doc("good"), b"{broken", b"{broken", b"{broken"]) + b"\n")
    output = str(tmp_path / "out")
    code = main(["--model", tiny_bundle[0], "--input", str(corpus), "--output", output])
    assert code == 4
    assert "--max_error_fraction" in capsys.readouterr().err
    assert [r["id"] for r in _read_dir(output)] == ["good"]
    assert len(_read_dir(os.path.join(output, "errors"))) == 3
    assert state_lib.read_manifest(output)["status"] == "completed_with_errors"

    # The same corpus passes when the threshold allows it.
    code = main(
        [
            "--model",
            tiny_bundle[0],
            "--input",
            str(corpus),
            "--output",
            output,
            "--overwrite",
            "--max_error_fraction",
            "0.8",
        ]
    )
    assert code == 0


def _corrupt_model(tmp_path, bundle):
    path = tmp_path / "corrupt.keras"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    return ["--model", str(path), "--tokenizer", os.path.join(bundle, "tokenizer.json")], "Could not load"


def _truncated_model(tmp_path, bundle):
    with open(os.path.join(bundle, "model.keras"), "rb") as handle:
        data = handle.read()
    path = tmp_path / "truncated.keras"
    path.write_bytes(data[: len(data) // 2])
    return ["--model", str(path), "--tokenizer", os.path.join(bundle, "tokenizer.json")], "Could not load"


def _unknown_format(tmp_path, bundle):
    path = tmp_path / "model.bin"
    shutil.copy(os.path.join(bundle, "model.keras"), path)
    return ["--model", str(path)], "unknown format"


def _missing_tokenizer(tmp_path, bundle):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    os.remove(copy / "tokenizer.json")
    return ["--model", str(copy)], "missing tokenizer.json"


def _bare_model_without_tokenizer(tmp_path, bundle):
    return ["--model", os.path.join(bundle, "model.keras")], "--tokenizer"


def _layer_not_found(tmp_path, bundle):
    return ["--model", bundle, "--layer", "lstm_contnet"], "Did you mean 'lstm_content'"


def _input_map_does_not_fit(tmp_path, bundle):
    return ["--model", bundle, "--layer", "lstm_content", "--input_map", "title=title"], "do not need"


def _sequence_length_mismatch(tmp_path, bundle):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["inputs"][0]["length"] += 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return ["--model", str(copy)], "token ids"


def _model_not_a_zip(tmp_path, bundle):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with zipfile.ZipFile(copy / "model.keras", "a") as archive:
        archive.writestr("extra.txt", "tampered")
    return ["--model", str(copy)], "SHA-256"


@pytest.mark.parametrize(
    "fault",
    [
        _corrupt_model,
        _truncated_model,
        _unknown_format,
        _missing_tokenizer,
        _bare_model_without_tokenizer,
        _layer_not_found,
        _input_map_does_not_fit,
        _sequence_length_mismatch,
        _model_not_a_zip,
    ],
)
def test_model_side_faults_are_refused_at_launch_and_write_nothing(tmp_path, tiny_bundle, capsys, fault):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(_doc("a") + b"\n")
    flags, expected = fault(tmp_path, tiny_bundle[0])
    output = tmp_path / "out"
    code = main([*flags, "--input", str(corpus), "--output", str(output)])
    assert code == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert not output.exists() or not any(output.iterdir())


def _big_corpus(path, copies):
    with open(SAMPLE_CORPUS, encoding="utf-8") as handle:
        documents = [json.loads(line) for line in handle]
    with open(path, "w", encoding="utf-8") as handle:
        for copy in range(copies):
            for document in documents:
                handle.write(
                    json.dumps(dict(document, id=f"{copy}-{document['id']}"), ensure_ascii=False) + "\n"
                )
    return len(documents) * copies


def _command(bundle, corpus, output, *flags):
    return pipeline_command(corpus, output, "--model", bundle, "--batch_size", "32", *flags)


@pytest.mark.slow
def test_killed_run_leaves_nothing_readable_and_rerun_completes_exactly(tmp_path, tiny_bundle):
    corpus = str(tmp_path / "big.jsonl")
    total = _big_corpus(corpus, 5)
    output = str(tmp_path / "out")
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)

    # Small shards: the run is killed once it writes its first, long before its last.
    command = _command(tiny_bundle[0], corpus, output, "--shard_mb", "0.05")
    process = forkserver.popen(
        command,
        cwd=REPOSITORY,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    shards = wait_for_staged_shard(process, output)
    assert process.poll() is None, "the run finished before it could be killed; use a larger corpus"
    assert shards, "the run wrote no shard in its staging directory"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    staging = os.path.join(output, layout_lib.STAGING)
    assert all(path.startswith(staging + os.sep) and os.path.exists(path) for path in shards)
    assert state_lib.read_manifest(output) is None
    assert [f for f in os.listdir(output) if f.endswith(".parquet")] == []
    assert ds.dataset(output, format="parquet", ignore_prefixes=layout_lib.READER_IGNORE_PREFIXES).files == []
    assert state_lib.output_state(output) == "unfinished"

    rerun = forkserver.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reference = str(tmp_path / "reference")
    assert run_export(_command(tiny_bundle[0], corpus, reference)[3:]).exit_code == 0

    rerun_rows = sorted(_read_dir(output), key=lambda r: r["id"])
    reference_rows = sorted(_read_dir(reference), key=lambda r: r["id"])
    assert len(rerun_rows) == total
    assert len({r["id"] for r in rerun_rows}) == total
    assert rerun_rows == reference_rows
    assert not os.path.exists(staging)
    # The committed shards are whole Parquet files holding the rows the manifest says.
    shards = state_lib.read_manifest(output)["shards"]["rows"]
    assert len(shards) > 1
    assert [pq.read_metadata(os.path.join(output, s["file"])).num_rows for s in shards] == [
        s["rows"] for s in shards
    ]
    assert sum(s["rows"] for s in shards) == total
