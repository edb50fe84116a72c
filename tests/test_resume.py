"""Resume: a run killed with SIGKILL is continued by the same command, bit for bit an uninterrupted run.

Each interrupted run is a real `python -m pipeline.run` child, killed (with its
worker processes) once it has closed a known number of row files; the reference
is an uninterrupted export with the same flags.  Rows are compared as whole
Arrow tables sorted by id (every column, every bit), dead letters as tables
sorted by place, and the manifests' counts whole.
"""

import contextlib
import dataclasses
import errno
import glob
import json
import logging
import os
import pathlib
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator

import forkserver
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import TUTORIAL_KERAS2_SCRIPT, kill_group_when, pipeline_command, snapshot
from test_commit import _hooked, _wait_for
from test_schema import VECTOR, make_plan

from models.bundle import DEFAULT_BUNDLE
from models.paths import SAMPLE_CORPUS as DEFAULT_SAMPLE_CORPUS
from pipeline.analysis.dataset import open_documents
from pipeline.analysis.index_build import IndexSettings, build_index
from pipeline.errors import (
    EXIT_ACCOUNTING_UNVERIFIED,
    EXIT_CONFIG_ERROR,
    EXIT_OUTPUT_FAILED,
    OutputWriteError,
)
from pipeline.inference import skip_kept as skip_kept_lib
from pipeline.inference.features import DocumentTokenizer
from pipeline.planning import locations as locations_lib
from pipeline.reading.listing import list_input
from pipeline.run import main
from pipeline.running import counters as counters_lib
from pipeline.running import export as export_lib
from pipeline.running.export import run_export
from pipeline.writing import commit as commit_lib
from pipeline.writing import files as files_lib
from pipeline.writing import layout as layout_lib
from pipeline.writing import resume as resume_lib
from pipeline.writing import state as state_lib
from pipeline.writing.shards import TOKENIZER_COUNTS_KEY

DOCUMENTS = 1000
# Small files, closed often: the run is killed after a few of them, long before its end (the corpus
# is 63 batches of 16; a whole run closes a file every one to three of them).
FLAGS = ("--batch_size", "16", "--checkpoint_seconds", "0.05", "--keep_fields", "kind")
# A vector column of the tiny bundle's default layers.
VECTOR_COLUMN = "lstm_content"
TWO_PROCESSES = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")


def write_corpus(path, count=DOCUMENTS, start=0):
    """A JSONL corpus with a bit of everything that is not a plain row, spread through it.

    Duplicate ids (the first by place is kept), malformed lines, missing content,
    documents longer than the model input (truncated) and unknown words (oov).
    """
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(start, start + count):
            words = " ".join(f"word{(index * 7 + k) % 48}" for k in range(3 + index % 17))
            record = {"id": f"doc{index}", "content": words, "title": f"word{index % 30}", "kind": "k"}
            if index % 97 == 5:
                record["id"] = f"doc{index - 5}"  # a later record of an earlier id
            if index % 89 == 3:
                record["content"] += " unknownword"
            if index % 211 == 7:
                del record["content"]
            handle.write(json.dumps(record) + "\n")
            if index % 401 == 11:
                handle.write('{"id": "broken", "content": \n')
    return str(path)


def durable_files(output):
    """The complete row files (a Parquet footer) that runs have closed in `output`'s staging area."""
    pattern = os.path.join(str(output), layout_lib.STAGING, "*", "data", "part-writing", "*.parquet")
    complete = []
    for path in glob.glob(pattern):
        try:
            pq.read_metadata(path)
        except Exception:  # Being written, or gone.
            continue
        complete.append(path)
    return sorted(complete)


def kill_after_files(bundle, corpus, output, count, *flags):
    """Starts the export in a child process and SIGKILLs it (and its workers) once `count` files are durable.

    `count` 0 kills it as soon as it has recorded its run (before any row file).

    Returns:
        The durable row files at the kill.
    """
    command = pipeline_command(corpus, output, "--model", bundle, *FLAGS, *flags)

    def ready():
        if count == 0:
            return bool(glob.glob(os.path.join(str(output), layout_lib.STAGING, "*", resume_lib.RUN_FILE)))
        return len(durable_files(output)) >= count

    assert kill_group_when(command, ready), "the run finished before it could be killed; use a larger corpus"
    assert state_lib.read_manifest(str(output)) is None
    return durable_files(output)


def rows(output):
    table = ds.dataset(str(output), format="parquet", ignore_prefixes=layout_lib.READER_IGNORE_PREFIXES)
    return table.to_table().sort_by("id")


def dead_letters(output):
    files = sorted(glob.glob(os.path.join(str(output), layout_lib.ERRORS_DIR, "*.parquet")))
    table = pa.concat_tables([pq.read_table(path) for path in files])
    return table.sort_by([("source", "ascending"), ("position", "ascending"), ("id", "ascending")])


def assert_same_export(output, reference):
    """Rows bit for bit, dead letters and counts equal to the uninterrupted `reference`."""
    resumed, expected = rows(output), rows(reference)
    assert resumed.schema == expected.schema
    assert resumed.equals(expected)
    assert dead_letters(output).equals(dead_letters(reference))
    counts = state_lib.read_manifest(str(output))["counts"]
    assert counts == state_lib.read_manifest(str(reference))["counts"]
    assert counts["records_read"] == counts["rows_written"] + counts["dead_letters"]


def rows_in(files):
    return sum(pq.read_metadata(path).num_rows for path in files)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("resume") / "corpus.jsonl")


@pytest.fixture(scope="module")
def reference(corpus, tiny_bundle, tmp_path_factory):
    """The uninterrupted export of `corpus`."""
    output = str(tmp_path_factory.mktemp("reference") / "out")
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    assert summary.exit_code == 0 and summary.dead_letters > 0 and summary.truncated > 0
    counts = state_lib.read_manifest(output)["counts"]
    assert counts["dead_letters_by_reason"]["duplicate_id"] > 0
    assert counts["dead_letters_by_reason"]["malformed_json"] > 0
    return output


@pytest.mark.parametrize("kill_after", [0, 3], ids=["before_any_file", "after_the_third_file"])
@pytest.mark.slow
def test_a_killed_run_resumes_bit_for_bit(kill_after, corpus, reference, tiny_bundle, tmp_path, request):
    output = str(tmp_path / "out")
    if kill_after == 3:  # The module's run killed after three files, the same command: a copy of it.
        shutil.copytree(request.getfixturevalue("killed_after_three"), output)
        kept = durable_files(output)
    else:
        kept = kill_after_files(tiny_bundle[0], corpus, output, kill_after)
    kept_rows = rows_in(kept)
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS]
    summary = run_export(argv)
    assert summary.exit_code == 0, summary.message
    assert_same_export(output, reference)
    resumed = state_lib.read_manifest(output)["resumed"]
    assert resumed["rows_kept"] == summary.rows_kept == kept_rows >= (1 if kill_after else 0)
    assert resumed["rows_kept"] < summary.rows_written
    assert resumed["attempt"] == 2 and len(kept) <= resumed["files_kept"]
    assert not os.path.exists(os.path.join(output, layout_lib.STAGING))


@pytest.mark.slow
def test_partial_and_repeated_files_are_ignored_and_counted_once(
    killed, corpus, reference, tiny_bundle, tmp_path
):
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    kept = durable_files(output)
    kept_rows, repeated_rows = rows_in(kept), rows_in(kept[:1])
    writing = os.path.dirname(kept[0])
    # A retried bundle's leftover: the same rows in a second complete file.
    shutil.copy(kept[0], os.path.join(writing, f"{uuid.uuid4().hex}.parquet"))
    # A file killed while it was written: no footer.
    with (
        open(kept[1], "rb") as source,
        open(os.path.join(writing, f"{uuid.uuid4().hex}.parquet"), "wb") as cut,
    ):
        cut.write(source.read()[: os.path.getsize(kept[1]) // 2])
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    assert summary.exit_code == 0, summary.message
    assert_same_export(output, reference)
    resumed = state_lib.read_manifest(output)["resumed"]
    assert resumed["duplicate_rows_dropped"] == repeated_rows
    assert resumed["partial_files_ignored"] >= 1
    assert resumed["rows_kept"] >= kept_rows


def _damage_a_vector_page(path):
    """Flips one byte inside the vector column's last data page; the file still reads without checks."""
    metadata = pq.read_metadata(path)
    schema = pq.read_schema(path)
    group = metadata.row_group(0)
    chunks = [group.column(index) for index in range(group.num_columns)]
    [chunk] = [chunk for chunk in chunks if chunk.path_in_schema.startswith(VECTOR_COLUMN + ".")]
    offset = chunk.data_page_offset + chunk.total_compressed_size - 8
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x10]))
    damaged = pq.read_table(path, schema=schema)  # No checksum check: it reads, wrong.
    assert damaged.num_rows == metadata.num_rows


@pytest.mark.slow
def test_a_kept_file_damaged_on_disk_is_embedded_again(killed, corpus, reference, tiny_bundle, tmp_path):
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    kept = durable_files(output)
    before, intact_rows = pq.read_table(kept[0]), rows_in(kept[1:])
    _damage_a_vector_page(kept[0])
    assert not pq.read_table(kept[0]).equals(before)
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    assert summary.exit_code == 0, summary.message
    assert_same_export(output, reference)
    resumed = state_lib.read_manifest(output)["resumed"]
    assert resumed["damaged_files_ignored"] == 1
    assert resumed["rows_kept"] >= intact_rows


def test_two_different_copies_of_a_row_stop_the_run(killed, corpus, tiny_bundle, tmp_path, capsys):
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    kept = durable_files(output)
    # The same documents as a kept file, one vector changed: two copies of a row that differ.
    table = pq.read_table(kept[0])
    index = table.schema.get_field_index(VECTOR_COLUMN)
    field = table.schema.field(index)
    vectors = table.column(index).to_pylist()
    vectors[0] = [value + 1.0 for value in vectors[0]]
    changed = table.set_column(index, field, pa.array(vectors, field.type))
    pq.write_table(changed, os.path.join(os.path.dirname(kept[0]), f"{uuid.uuid4().hex}.parquet"))
    code = main(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "two different rows for id" in errors[0] and "--resume off" in errors[0]
    assert state_lib.read_manifest(output) is None


def spy_on_tokenizer(monkeypatch):
    """The ids of the documents tokenized in this process from now on (the in-memory runner's)."""
    tokenized = []
    original = DocumentTokenizer.tokenize

    def tokenize(self, document):
        tokenized.append(document.id)
        return original(self, document)

    monkeypatch.setattr(DocumentTokenizer, "tokenize", tokenize)
    return tokenized


def ids_in(files):
    return set(
        pa.concat_tables([pq.read_table(path, columns=["id"]) for path in files]).column(0).to_pylist()
    )


def footer_counts(path):
    return json.loads(pq.read_metadata(path).metadata[TOKENIZER_COUNTS_KEY])


def test_kept_documents_are_neither_tokenized_nor_embedded_again(
    killed_after_three, corpus, reference, tiny_bundle, tmp_path, monkeypatch
):
    output = str(tmp_path / "out")
    shutil.copytree(killed_after_three, output)
    kept = durable_files(output)
    assert all(set(footer_counts(path)) == {"documents_truncated", "oov_tokens"} for path in kept)
    kept_ids = ids_in(kept)
    tokenized = spy_on_tokenizer(monkeypatch)
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    assert summary.exit_code == 0, summary.message
    # The counts of the documents not tokenized again come from the kept files' footers.
    assert_same_export(output, reference)
    assert tokenized and not kept_ids & set(tokenized)
    counts = state_lib.read_manifest(output)["counts"]
    # Tokenized: every document the rerun read but did not keep, minus those dead-lettered while read.
    read_errors = sum(
        counts["dead_letters_by_reason"].get(reason, 0) for reason in ("duplicate_id", "malformed_json")
    )
    assert len(tokenized) <= counts["records_read"] - summary.rows_kept - read_errors


def test_a_kept_file_without_tokenizer_counts_is_tokenized_again(
    killed_after_three, corpus, reference, tiny_bundle, tmp_path, monkeypatch
):
    """A file a resume rewrote (a retried bundle's copy dropped) has no counts: it is tokenized again."""
    output = str(tmp_path / "out")
    shutil.copytree(killed_after_three, output)
    kept = durable_files(output)
    # A file whose rows the tokenizer counted something for, so that losing its counts shows.
    counted = next(path for path in kept[1:] if any(footer_counts(path).values()))
    # One file with the rows of the first kept file and of `counted`, without counts, as a resume
    # writes it; the first file's rows are then held twice and kept once.
    merged = pa.concat_tables([pq.read_table(kept[0]), pq.read_table(counted)]).replace_schema_metadata(
        {b"embexport": pq.read_table(kept[0]).schema.metadata[b"embexport"]}
    )
    counted_ids, kept_rows, repeated_rows = ids_in([counted]), rows_in(kept), rows_in(kept[:1])
    os.remove(counted)
    pq.write_table(merged, os.path.join(os.path.dirname(kept[0]), f"{uuid.uuid4().hex}.parquet"))
    tokenized = spy_on_tokenizer(monkeypatch)
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    assert summary.exit_code == 0, summary.message
    assert_same_export(output, reference)
    resumed = state_lib.read_manifest(output)["resumed"]
    assert resumed["duplicate_rows_dropped"] == repeated_rows
    assert counted_ids <= set(tokenized)
    assert summary.rows_kept >= kept_rows


@pytest.fixture(scope="module")
def killed(corpus, tiny_bundle, tmp_path_factory):
    """An output directory holding what a run killed after two row files left."""
    output = str(tmp_path_factory.mktemp("killed") / "out")
    assert kill_after_files(tiny_bundle[0], corpus, output, 2)
    return output


@pytest.fixture(scope="module")
def killed_after_three(corpus, tiny_bundle, tmp_path_factory):
    """The same, killed after three row files (tests copy both before they change them)."""
    output = str(tmp_path_factory.mktemp("killed_after_three") / "out")
    assert kill_after_files(tiny_bundle[0], corpus, output, 3)
    return output


def _staged_run(output):
    (run_id,) = os.listdir(os.path.join(output, layout_lib.STAGING))
    return run_id


def _set_state(output, state):
    path = os.path.join(output, layout_lib.STAGING, _staged_run(output), resume_lib.RUN_FILE)
    with open(path, encoding="utf-8") as handle:
        run = json.load(handle)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(dict(run, state=state), handle)


def _set_run_format(output, run_format):
    """Makes the staged run one of another `_RUN.json` format (an earlier version of this code)."""
    path = os.path.join(output, layout_lib.STAGING, _staged_run(output), resume_lib.RUN_FILE)
    with open(path, encoding="utf-8") as handle:
        run = json.load(handle)
    run["signature"]["format"] = run_format
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(run, handle)


def _truncate_run_file(output):
    path = os.path.join(output, layout_lib.STAGING, _staged_run(output), resume_lib.RUN_FILE)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


@pytest.mark.parametrize(
    "change",
    ["resume_off", "dtype", "model", "truncated_run_file", "earlier_run_format"],
)
def test_another_export_starts_from_zero(change, killed, corpus, reference, tiny_bundle, tmp_path):
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    dead_run = _staged_run(output)
    input_path, model, flags = corpus, tiny_bundle[0], list(FLAGS)
    if change == "resume_off":
        flags += ["--resume", "off"]
    elif change == "dtype":
        flags += ["--dtype", "float16"]
    elif change == "model":
        model = DEFAULT_BUNDLE
    elif change == "truncated_run_file":
        _truncate_run_file(output)
    elif change == "earlier_run_format":  # e.g. one that kept rows of blank records
        _set_run_format(output, resume_lib.RUN_FORMAT - 1)
    summary = run_export(["--model", model, "--input", input_path, "--output", output, *flags])
    assert summary.exit_code == 0, summary.message
    manifest = state_lib.read_manifest(output)
    assert manifest["resumed"] is None and summary.rows_kept == 0
    assert not os.path.exists(os.path.join(output, layout_lib.STAGING))
    assert dead_run not in json.dumps(manifest)
    if change in ("resume_off", "truncated_run_file", "earlier_run_format"):
        assert_same_export(output, reference)


def test_a_run_killed_before_its_commit_point_is_resumed(
    killed, corpus, reference, tiny_bundle, tmp_path, caplog
):
    """Killed while "committing" but before its journal (hashing its staged files): its rows are kept.

    Its last progress line counts the kept rows as written: it said "2,000 records read, 1,100 rows
    written, 60 dead letters", the kept rows missing, though the summary said 1,940 rows.
    """
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    dead_run = _staged_run(output)
    _set_state(output, resume_lib.COMMITTING)
    caplog.set_level(logging.INFO, logger="pipeline.running.progress")
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    assert summary.exit_code == 0, summary.message
    manifest = state_lib.read_manifest(output)
    assert manifest["resumed"]["run"] == dead_run and summary.rows_kept > 0
    assert_same_export(output, reference)
    (last,) = [record.getMessage() for record in caplog.records if "done in" in record.getMessage()]
    assert f" {summary.rows_written:,} rows written, {summary.dead_letters:,} dead letters" in last


def test_a_resumed_runs_summary_rate_counts_only_the_rows_it_wrote():
    """A rerun that kept 1,940 rows and embedded 60 in 10 s said "(200 docs/s)": 33 times its rate."""
    from pipeline.running.report import ExportSummary, format_summary

    summary = ExportSummary("out", 2000, 2000, 0, {}, 0, 0, 10.0, 0, "ok", resumed_run="r1", rows_kept=1940)
    assert "  seconds          10.0 (6 docs/s)" in format_summary(summary).splitlines()


_REWRITES = {
    "text": ("word1", "word2", "is not the one whose row it kept"),
    # A kept field's value only: the rows kept held the old one.
    "kept_field": ('"kind": "k"', '"kind": "j"', "is not the one whose row it kept"),
    # Other ids: no kept row's document is met; those rows would be committed beside the new ones.
    "ids": ('"id": "doc', '"id": "dox', "have their document in the corpus now"),
}


@contextlib.contextmanager
def _rewritten_in_place(corpus: str, tmp_path: pathlib.Path, old: str, new: str) -> Iterator[None]:
    """The corpus with `old` replaced by `new`, at the same path, size and time; put back after."""
    saved = str(tmp_path / "corpus.jsonl")
    shutil.copy2(corpus, saved)
    stat = os.stat(corpus)
    try:
        with open(saved, encoding="utf-8") as handle, open(corpus, "w", encoding="utf-8") as out:
            out.write(handle.read().replace(old, new))
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        yield
    finally:
        shutil.copy2(saved, corpus)
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# With two worker processes, a changed kept field is refused by the same worker code as changed
# text (SkipKeptFn compares the row keys, raising the same error): text stands for both there.
@pytest.mark.parametrize(
    "processes,old,new,what",
    [
        pytest.param(processes, *_REWRITES[change], id=f"{name}-{change}")
        for name, processes in (("in_memory", ()), ("two_processes", TWO_PROCESSES))
        for change in _REWRITES
        if not (processes and change == "kept_field")
    ],
)
def test_a_corpus_rewritten_with_the_same_size_and_time_is_not_resumed(
    killed, corpus, tiny_bundle, tmp_path, capfd, old, new, what, processes
):
    """tar, cp -p, touch -r: the listing is the same, the texts are not: rows of old text were kept."""
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    # The same bytes but other words, the same size and modification time, at the same path.
    with _rewritten_in_place(corpus, tmp_path, old, new):
        code = main(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS, *processes])
    # Worker processes' stderr included: a worker's refusal printed its tracebacks first.
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == EXIT_CONFIG_ERROR and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "corpus changed since the interrupted run" in lines[0] and "--resume off" in lines[0]
    assert what in lines[0]
    assert state_lib.read_manifest(output) is None


@pytest.mark.parametrize("reported", ["attempted", "none"])
def test_a_resume_on_a_job_server_without_committed_counters(
    killed, corpus, reference, tiny_bundle, tmp_path, monkeypatch, capfd, reported
):
    """Spark's and Flink's job servers report attempted counters only, or none (exit 7).

    attempted: a corpus whose kept ids are gone (rewritten with the same size and time) was
    committed with those stale rows, exit 3 "Accounting mismatch" (a bug, said the docs); attempted
    counters never count less, so fewer kept documents met proves it. none: every resumed run ended
    exit 3 ("kept 48 rows but met 0 of their documents"), a correct export not committed over a
    succeeded one.
    """
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    real = export_lib.read_counters

    def as_reported(result, namespace=counters_lib.NAMESPACE):
        values = real(result, namespace).values if reported == "attempted" else {}
        return counters_lib.RunCounters(values, False)

    monkeypatch.setattr(export_lib, "read_counters", as_reported)
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS]
    if reported == "none":
        assert main(argv) == EXIT_ACCOUNTING_UNVERIFIED
        assert state_lib.read_manifest(output)["resumed"] and rows(output).equals(rows(reference))
        return
    with _rewritten_in_place(corpus, tmp_path, '"id": "doc', '"id": "dox'):
        code = main(argv)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == EXIT_CONFIG_ERROR and len(lines) == 1, lines
    assert "corpus changed since the interrupted run" in lines[0] and ", only 0 have" in lines[0]
    assert state_lib.read_manifest(output) is None


def _kept_counted_twice(read_counters):
    """`read_counters` as a job server's attempted counters give it where a bundle of kept documents ran
    twice: `rows_kept` doubled, and not committed."""

    def retried(result, namespace=counters_lib.NAMESPACE):
        values = dict(read_counters(result, namespace).values)
        values[counters_lib.ROWS_KEPT] *= 2
        return counters_lib.RunCounters(values, False)

    return retried


def test_a_kept_row_whose_id_is_gone_is_refused_though_a_retried_bundle_doubles_the_attempted_counters(
    killed, corpus, tiny_bundle, tmp_path, monkeypatch, capfd
):
    """Spark's and Flink's attempted counters count a retried bundle twice: it covered a gone kept id.

    The kept rows were told from the `rows_kept` counter alone (met < kept): one kept id renamed in
    place (the same size and time) and one bundle of kept documents run twice made met >= kept, and
    the run committed the stale row of the gone id beside its new one (exit 7, as every run there).
    The documents with a kept row are now counted as the pipeline's data, exact on every runner.
    """
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    gone = sorted(ids_in(durable_files(output)))[0]
    monkeypatch.setattr(export_lib, "read_counters", _kept_counted_twice(export_lib.read_counters))
    with _rewritten_in_place(corpus, tmp_path, f'"id": "{gone}"', f'"id": "{gone.replace("doc", "dox")}"'):
        code = main(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == EXIT_CONFIG_ERROR and len(lines) == 1, lines
    assert "corpus changed since the interrupted run" in lines[0] and ", only " in lines[0]
    assert state_lib.read_manifest(output) is None


def test_an_unreadable_count_of_kept_documents_is_not_passed_over_where_no_committed_counter_stands_in(
    killed, corpus, tiny_bundle, tmp_path, monkeypatch, capfd
):
    """`_KEPT_MET.json` damaged (truncated) or unreadable was taken as absent, without a word: the attempted
    `rows_kept` counter stood in, a retried bundle doubled it, and the stale row of a kept id the corpus no
    longer has was committed beside the new one (exit 7), the very row the count was added to catch."""
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    gone = sorted(ids_in(durable_files(output)))[0]

    def truncated(count, kept_ids_path):
        with open(skip_kept_lib.kept_met_path(kept_ids_path), "w", encoding="utf-8") as handle:
            handle.write('{"documents": ')

    monkeypatch.setattr(export_lib, "read_counters", _kept_counted_twice(export_lib.read_counters))
    monkeypatch.setattr(skip_kept_lib, "_record_kept_met", truncated)
    with _rewritten_in_place(corpus, tmp_path, f'"id": "{gone}"', f'"id": "{gone.replace("doc", "dox")}"'):
        code = main(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == EXIT_CONFIG_ERROR and len(lines) == 1, lines
    assert "cannot tell whether the documents of the" in lines[0]
    assert "_KEPT_MET.json cannot be read" in lines[0]
    assert "rerun the same command" in lines[0] and "--resume off" in lines[0]
    assert state_lib.read_manifest(output) is None


def test_a_touched_input_file_does_not_resume(killed, corpus, reference, tiny_bundle, tmp_path):
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    stat = os.stat(corpus)
    try:
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    finally:
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert summary.exit_code == 0 and state_lib.read_manifest(output)["resumed"] is None
    assert_same_export(output, reference)


def test_the_listing_digest_names_the_files_not_how_input_spells_them(tmp_path, monkeypatch):
    """A resume compares this digest: a run killed with `/abs/a.jsonl`, rerun with `./a.jsonl`, started over.

    The same files however spelt (relative, absolute, `./`, doubled slashes, through a linked
    directory, a glob listing them) are one input; files elsewhere with the same names, sizes
    and times are another, and so is a text file spelt otherwise, whose ids hold its path.
    """
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.jsonl", "b.jsonl", "a.txt"):
        (data / name).write_text('{"id": "1", "content": "word1"}\n', encoding="utf-8")
    (tmp_path / "link").symlink_to(data)
    elsewhere = tmp_path / "elsewhere" / "data"
    shutil.copytree(data, elsewhere)  # copy2: the same names, sizes and modification times
    monkeypatch.chdir(tmp_path)

    def digest(pattern, input_format="jsonl"):
        return locations_lib.listing_sha256(list_input(pattern)[0], input_format)

    spellings = [f"{data}/*.jsonl", "data/*.jsonl", "./data/*.jsonl", "data//*.jsonl", "link/[ab].jsonl"]
    assert len({digest(pattern) for pattern in spellings}) == 1
    assert digest("data/a.jsonl") == digest("./data/a*.jsonl") == digest("link/a.jsonl")
    assert digest("elsewhere/data/*.jsonl") != digest("data/*.jsonl")
    monkeypatch.chdir(tmp_path / "elsewhere")  # `data/*.jsonl` from another working directory
    assert digest("data/*.jsonl") != digest(f"{data}/*.jsonl")
    assert digest(f"{data}/a.txt", "text") != digest(f"{tmp_path}/link/a.txt", "text")
    assert digest(f"{data}/a.txt", "text") == digest(f"{data}/a.txt", "text")


def test_the_run_signature_holds_what_input_and_reuse_name_not_how_they_are_spelt():
    """A killed `--reuse /data/v1` run rerun with `--reuse v1/` started over (reuse, reuse_files changed)."""
    plan = dataclasses.replace(
        make_plan([VECTOR]),
        reuse="/data/v1",
        reuse_files=("/data/v1/part-00000-of-00001.parquet",),
        reuse_digests=("sha256:" + "c" * 64,),
    )
    spelt = dataclasses.replace(
        plan, input_pattern="./corpus.jsonl", reuse="v1/", reuse_files=("v1/part-00000-of-00001.parquet",)
    )
    replaced = dataclasses.replace(plan, reuse_digests=("sha256:" + "d" * 64,))
    without = dataclasses.replace(plan, reuse="", reuse_files=(), reuse_digests=())
    signature = resume_lib.run_signature(plan, None)
    assert resume_lib.run_signature(spelt, None) == signature
    assert signature not in (
        resume_lib.run_signature(replaced, None),
        resume_lib.run_signature(without, None),
    )


def test_the_run_signature_holds_the_onednn_setting():
    """A run killed with oneDNN on, rerun with TF_ENABLE_ONEDNN_OPTS=0, kept the rows of one setting beside
    rows of the other (they differ in the last bits): the export equalled neither uninterrupted run."""
    plan = make_plan([VECTOR])
    on, off = (resume_lib.run_signature(dataclasses.replace(plan, onednn=on), None) for on in (True, False))
    assert on != off


def test_the_run_signature_holds_each_columns_forward_pass_not_why_keras_was_chosen():
    """A run whose fast-path check failed recorded "differs from Keras by 2.31e-05": a rerun launched
    elsewhere measures 2.29e-05 and started from zero, though Keras computes every row of both."""
    plan = make_plan([VECTOR])
    column = plan.columns[0].column

    def signature(engine, reason):
        return resume_lib.run_signature(
            dataclasses.replace(plan, forward_passes=((column, engine, reason),)), None
        )

    measured = "the fast path differs from Keras by {} (> 1e-05) on a sample batch"
    assert signature("keras", measured.format("2.31e-05")) == signature("keras", measured.format("2.29e-05"))
    assert signature("keras", "--fast_path off") != signature("fast", "embedding 'emb': table lookup")
    # What the fast path runs is what its rows are made by.
    assert signature("fast", "LSTM 'l': padding skipped") != signature("fast", "LSTM 'l': padding run")


@pytest.mark.slow
def test_the_same_corpus_and_model_spelt_otherwise_resume(
    killed, corpus, reference, tiny_bundle, tmp_path, monkeypatch
):
    """Rerun from the corpus's directory with relative paths, a run killed with absolute ones.

    It started from zero ("input_pattern changed"). And with --model spelt otherwise (the same
    bundle), the kept row files still named the killed run's --model in their metadata.
    """
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    dead_run = _staged_run(output)
    monkeypatch.chdir(os.path.dirname(corpus))
    spelt = os.path.join(".", os.path.basename(corpus))
    model = os.path.relpath(tiny_bundle[0])
    summary = run_export(["--model", model, "--input", spelt, "--output", output, *FLAGS])
    assert summary.exit_code == 0, summary.message
    assert state_lib.read_manifest(output)["resumed"]["run"] == dead_run and summary.rows_kept > 0
    assert rows(output).equals(rows(reference))
    assert state_lib.read_manifest(output)["counts"] == state_lib.read_manifest(reference)["counts"]
    # The dead letters are the rerun's own: they name the file as this command spells it.
    assert set(dead_letters(output)["source"].to_pylist()) == {spelt}
    same = ["position", "id", "reason", "raw"]
    assert dead_letters(output).select(same).equals(dead_letters(reference).select(same))
    models = {
        json.loads(pq.read_schema(path).metadata[b"embexport"])["model_uri"]
        for path in glob.glob(os.path.join(output, "part-*.parquet"))
    }
    assert models == {model}


def test_only_the_matching_run_is_resumed_and_the_other_removed(
    killed, corpus, reference, tiny_bundle, tmp_path
):
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    matching = _staged_run(output)
    other = os.path.join(output, layout_lib.STAGING, "otherrun0000")
    shutil.copytree(os.path.join(output, layout_lib.STAGING, matching), other)
    with open(os.path.join(other, resume_lib.RUN_FILE), encoding="utf-8") as handle:
        run = json.load(handle)
    run["signature"]["batch_size"] = 999
    with open(os.path.join(other, resume_lib.RUN_FILE), "w", encoding="utf-8") as handle:
        json.dump(run, handle)
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    assert summary.exit_code == 0 and summary.resumed_run == matching
    assert_same_export(output, reference)
    assert not os.path.exists(os.path.join(output, layout_lib.STAGING))


@pytest.mark.slow
def test_a_full_disk_during_the_hand_over_gives_the_kept_files_back(
    killed, corpus, reference, tiny_bundle, tmp_path
):
    """The rerun had moved the kept files into its own staging when its first write found the disk
    full: its line said they were kept there, and the next rerun removed that directory with them."""
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    old_run = _staged_run(output)
    kept_rows = rows_in(durable_files(output))
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS]
    process = _hooked(["enospc:0"], argv)
    _, err = process.communicate(timeout=180)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert process.returncode == EXIT_OUTPUT_FAILED and len(lines) == 1, err[-3000:]
    assert os.path.join(output, layout_lib.STAGING, old_run) in lines[0], lines[0]
    summary = run_export(argv)  # space freed
    assert summary.exit_code == 0 and summary.resumed_run == old_run, summary.message
    assert summary.rows_kept == kept_rows
    assert_same_export(output, reference)


@pytest.mark.parametrize("where", ["hand_over", "removal"])
def test_a_staging_this_user_may_not_change_is_one_error_line(
    where, killed, corpus, tiny_bundle, tmp_path, monkeypatch
):
    """A killed run's staging the rerun may not change (left by a run started with sudo, or immutable)
    stopped the same command (moving the kept rows over) and `--resume off` (removing them) with a
    PermissionError traceback, exit 1."""
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    dead_run = os.path.join(output, layout_lib.STAGING, _staged_run(output))
    before = snapshot(dead_run)
    flags = list(FLAGS)
    if where == "hand_over":

        def refused(action, relative):
            if action == "rename":
                raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), os.path.join(output, relative))

        monkeypatch.setattr(files_lib, "step_hook", refused)
    else:
        flags += ["--resume", "off"]
        unlink = os.unlink

        def refused(path, *args, **kwargs):
            if os.path.basename(path) == resume_lib.RUN_FILE:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(OutputWriteError) as refusal:
        run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *flags])
    monkeypatch.undo()
    message = str(refusal.value)
    assert "\n" not in message and "could not be prepared" in message, message
    assert state_lib.read_manifest(output) is None
    if where == "hand_over":  # Its rows are given back: the rerun continues from all of them.
        assert snapshot(dead_run) == before
    else:  # shutil.rmtree's error named the file alone (_RUN.json): the line names it by its path.
        assert os.path.join(dead_run, resume_lib.RUN_FILE) in message


@pytest.mark.slow
@pytest.mark.parametrize("orphan", ["names_a_shard", "renames_kept_files"])
def test_an_orphaned_job_writing_into_the_interrupted_run_is_never_committed(
    orphan, killed, corpus, reference, tiny_bundle, tmp_path
):
    """A portable or Dataflow job outlives its SIGKILLed launcher and goes on writing into its staging.

    `names_a_shard`: once the rerun's pipeline runs, the "orphan" closes one more row
    file in its own staging and names it as a shard, as its `NameShardsFn` does at its
    end (a copy of a kept file: committed, its rows would be there twice).
    `renames_kept_files`: as the rerun begins to take the kept files over, the orphan
    closes that file and renames the kept files to shard names.
    """
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    old_run = _staged_run(output)
    kept = durable_files(output)
    writing = os.path.dirname(kept[0])
    closed_by_the_orphan = shutil.copy(kept[0], tmp_path / "closed_by_the_orphan.parquet")
    marker = str(tmp_path / "orphan")
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS]
    if orphan == "names_a_shard":
        process = _hooked([f"inference_pause:1:{marker}"], argv)
    else:  # Paused before its first move: every kept file is listed and checked complete.
        process = _hooked([f"pause:rename:1:{marker}"], argv)
    _wait_for(marker + ".paused", process)
    os.makedirs(writing, exist_ok=True)
    if orphan == "names_a_shard":
        shutil.copy(
            closed_by_the_orphan, os.path.join(os.path.dirname(writing), "part-99999-of-99999.parquet")
        )
    else:
        shutil.copy(closed_by_the_orphan, os.path.join(writing, f"{uuid.uuid4().hex}.parquet"))
        for index, path in enumerate(kept):
            shard = f"part-{index:05d}-of-{len(kept):05d}.parquet"
            os.rename(path, os.path.join(os.path.dirname(writing), shard))
    open(marker + ".go", "w").close()
    _, err = process.communicate(timeout=180)
    if orphan == "renames_kept_files":
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert process.returncode == EXIT_CONFIG_ERROR and len(lines) == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert f"interrupted run {old_run}" in lines[0] and "is still running" in lines[0]
        assert "Cancel that job" in lines[0]
        assert state_lib.read_manifest(output) is None
        # The job was cancelled: the next rerun continues from what the old run's staging holds.
        summary = run_export(argv)
        assert summary.exit_code == 0, summary.message
    else:
        assert process.returncode == 0, err[-3000:]
    assert_same_export(output, reference)
    resumed = state_lib.read_manifest(output)["resumed"]
    assert resumed["attempt"] >= 2 and resumed["rows_kept"] > 0
    # What the orphan wrote after the old staging was removed is a dead run's leftovers, nothing more.
    staging = os.path.join(output, layout_lib.STAGING)
    assert not os.path.exists(staging) or os.listdir(staging) == [old_run]


@pytest.mark.slow
@pytest.mark.parametrize("moves", [1, 2])
def test_a_rerun_killed_while_taking_the_kept_files_over_loses_and_repeats_nothing(
    moves, killed, corpus, reference, tiny_bundle, tmp_path
):
    """SIGKILLed before its first or second move: the files moved are embedded again, the rest kept."""
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    not_moved = rows_in(durable_files(output)[moves - 1 :])
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS]
    process = _hooked([f"kill:rename:{moves}"], argv)
    process.communicate(timeout=180)
    assert process.returncode == -signal.SIGKILL
    summary = run_export(argv)
    assert summary.exit_code == 0, summary.message
    assert_same_export(output, reference)
    assert summary.rows_kept == not_moved


def test_a_rerun_killed_after_it_recorded_itself_continues_from_it(
    killed, corpus, reference, tiny_bundle, tmp_path, monkeypatch
):
    """Killed between its own `_RUN.json` and removing the old run's staging: the later attempt is resumed."""
    output = str(tmp_path / "out")
    shutil.copytree(killed, output)
    kept_rows = rows_in(durable_files(output))
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS]

    def killed_here(directory, old_run_id, attempts=3):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(resume_lib, "remove_old_run", killed_here)
        with pytest.raises(KeyboardInterrupt):
            run_export(argv)
    runs = os.listdir(os.path.join(output, layout_lib.STAGING))
    assert len(runs) == 2
    (second,) = [run for run in runs if resume_lib.read_run(output, run)["attempt"] == 2]
    summary = run_export(argv)
    assert summary.exit_code == 0, summary.message
    assert summary.resumed_run == second and summary.rows_kept == kept_rows
    assert_same_export(output, reference)
    assert state_lib.read_manifest(output)["resumed"]["attempt"] == 3


LIMIT = ("--limit", "750")


@pytest.fixture(scope="module")
def limited_reference(corpus, tiny_bundle, tmp_path_factory):
    """The in-memory export of `corpus` under --limit 750."""
    output = str(tmp_path_factory.mktemp("limited_reference") / "out")
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS, *LIMIT])
    assert summary.exit_code == 0, summary.message
    return output


@pytest.fixture(scope="module")
def killed_with_two_processes(corpus, tiny_bundle, tmp_path_factory):
    """(output, rows durable at the kill) of a two-process run under --limit 750 killed after three row
    files (two cold SDK workers: the tests resuming it copy the output)."""
    output = str(tmp_path_factory.mktemp("killed_with_two_processes") / "out")
    kept = kill_after_files(tiny_bundle[0], corpus, output, 3, *TWO_PROCESSES, *LIMIT)
    return output, rows_in(kept)


@pytest.mark.slow
def test_two_worker_processes_with_a_limit(
    killed_with_two_processes, limited_reference, corpus, tiny_bundle, tmp_path
):
    flags = [*TWO_PROCESSES, *LIMIT]
    # The reference is the in-memory export of the same limit: both runner modes give the same export.
    output = str(tmp_path / "out")
    shutil.copytree(killed_with_two_processes[0], output)
    kept_rows = killed_with_two_processes[1]
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS, *flags])
    assert summary.exit_code == 0, summary.message
    assert_same_export(output, limited_reference)
    assert state_lib.read_manifest(output)["limited"] is True
    assert 0 < kept_rows <= summary.rows_kept < summary.rows_written


@pytest.mark.slow
def test_a_run_killed_with_two_processes_resumes_with_one(
    killed_with_two_processes, limited_reference, corpus, tiny_bundle, tmp_path
):
    """What the out-of-memory line advises (--direct_num_workers 1) changed --tf_threads, which was in
    the signature: the rerun dropped every durable row without a word.

    The killed run is the limit test's (--limit 750, the same in both runs), copied: one two-process
    run killed for both tests."""
    output = str(tmp_path / "out")
    shutil.copytree(killed_with_two_processes[0], output)
    kept_rows = killed_with_two_processes[1]
    one = ("--direct_running_mode=multi_processing", "--direct_num_workers=1")
    summary = run_export(
        ["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS, *one, *LIMIT]
    )
    assert summary.exit_code == 0, summary.message
    assert 0 < kept_rows <= summary.rows_kept
    assert_same_export(output, limited_reference)


@pytest.mark.slow
def test_a_killed_reuse_run_resumes_with_the_same_counts(corpus, tiny_bundle, tmp_path):
    earlier = str(tmp_path / "v1")
    # Half the documents are in the earlier export: the other half is embedded.
    first = write_corpus(tmp_path / "v1.jsonl", DOCUMENTS // 2)
    run_export(["--model", tiny_bundle[0], "--input", first, "--output", earlier, *FLAGS])
    flags = ["--reuse", earlier]
    reference = str(tmp_path / "reference")
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", reference, *FLAGS, *flags])
    output = str(tmp_path / "out")
    kill_after_files(tiny_bundle[0], corpus, output, 2, *flags)
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS, *flags])
    assert summary.exit_code == 0, summary.message
    assert summary.rows_kept > 0
    assert_same_export(output, reference)
    counts = state_lib.read_manifest(output)["counts"]
    assert counts["rows_reused"] > 0 and counts["rows_embedded"] >= DOCUMENTS // 2 - 100


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_bad_checkpoint_seconds_are_refused(value, corpus, tiny_bundle, tmp_path, capsys):
    output = str(tmp_path / "out")
    code = main(
        ["--model", tiny_bundle[0], "--input", corpus, "--output", output, f"--checkpoint_seconds={value}"]
    )
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR, err
    assert "--checkpoint_seconds must be a number from 0.01 to 604,800" in err, err
    assert not os.path.exists(output)


def test_infinite_shard_size_is_refused(corpus, tiny_bundle, tmp_path, capsys):
    output = str(tmp_path / "out")
    code = main(["--model", tiny_bundle[0], "--input", corpus, "--output", output, "--shard_mb=inf"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR and "--shard_mb must be a number from 0.001 to 1,000,000" in err, err


def test_checkpoints_close_files_during_one_long_bundle(tiny_bundle, tmp_path):
    """One bundle (one process, default shard size) still closes a file every --checkpoint_seconds."""
    corpus = write_corpus(tmp_path / "c.jsonl", 1000)
    output = str(tmp_path / "out")
    summary = run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    assert len(state_lib.read_manifest(output)["shards"]["rows"]) > 3
    single = str(tmp_path / "single")
    flags = [flag if flag != "0.05" else "604800" for flag in FLAGS]
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", single, *flags])
    assert len(state_lib.read_manifest(single)["shards"]["rows"]) == 1
    assert rows(single).equals(rows(output)) and summary.exit_code == 0


def test_the_run_file_says_when_the_run_reached_its_commit(tiny_bundle, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "c.jsonl", 50)
    output = str(tmp_path / "out")
    states = []
    original = commit_lib.commit

    def spying_commit(directory, run_id, staged, manifest, held):
        states.append(resume_lib.read_run(directory, run_id)["state"])
        return original(directory, run_id, staged, manifest, held)

    monkeypatch.setattr(commit_lib, "commit", spying_commit)
    run_export(["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS])
    assert states == [resume_lib.COMMITTING]


def test_a_full_disk_as_the_run_reaches_its_commit_is_one_error(tiny_bundle, tmp_path, monkeypatch):
    """The commit's first write (`_RUN.json` saying "committing") finding the disk full: exit 6."""
    corpus = write_corpus(tmp_path / "c.jsonl", 20)
    output = str(tmp_path / "out")

    def disk_full(directory, run_id):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)

    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS]
    with monkeypatch.context() as patched:
        patched.setattr(resume_lib, "mark_committing", disk_full)
        with pytest.raises(OutputWriteError, match="ran out of space"):
            run_export(argv)
    # The finished run's rows are kept: once there is room, the rerun commits them without embedding.
    assert os.listdir(os.path.join(output, layout_lib.STAGING))
    summary = run_export(argv)
    assert summary.exit_code == 0 and summary.rows_kept == summary.rows_written > 0


@pytest.mark.slow
def test_the_tutorial_keras2_model_resumes_bit_for_bit(tmp_path):
    """The users' first model (tf_keras `.h5`, float32 `Input(shape=(300,))`, Keras 2 Tokenizer) resumes.

    Killed after two durable files, the rerun equals the uninterrupted export bit for
    bit, and both equal what Keras 2 itself gives for the same texts.
    """
    with open(DEFAULT_SAMPLE_CORPUS, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    # 500 of the sample corpus's documents: long enough to kill after a few files.
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        for record in records[:500]:
            handle.write(json.dumps(record) + "\n")
    built = forkserver.run(
        [sys.executable, "-c", TUTORIAL_KERAS2_SCRIPT, str(tmp_path), str(corpus), str(corpus)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    with open(tmp_path / "info.json", encoding="utf-8") as handle:
        info = json.load(handle)
    model = ["--model", str(tmp_path / "tutorial.h5"), "--tokenizer", str(tmp_path / "tokenizer.json")]
    model += ["--layer", "lstm", "--input_map", f"{info['input']}=content", *FLAGS]
    reference = str(tmp_path / "reference")
    assert run_export(["--input", str(corpus), "--output", reference, *model]).exit_code == 0

    output = str(tmp_path / "out")
    command = pipeline_command(corpus, output, *model)
    assert kill_group_when(command, lambda: len(durable_files(output)) >= 2), "finished before the kill"
    kept = rows_in(durable_files(output))
    assert main(["--input", str(corpus), "--output", output, *model]) == 0
    assert_same_export(output, reference)
    assert state_lib.read_manifest(output)["resumed"]["rows_kept"] >= kept > 0
    exported = rows(output)
    order = {document_id: index for index, document_id in enumerate(info["ids"])}
    expected = np.load(tmp_path / "reference.npy")[[order[i] for i in exported.column("id").to_pylist()]]
    vectors = np.array(exported.column("lstm").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_an_overwrite_killed_over_an_indexed_export_resumes_and_drops_the_index(
    corpus, reference, tiny_bundle, tmp_path
):
    """The index files are the old export's own (told by their metadata): a resumed --overwrite drops them."""
    output = str(tmp_path / "out")
    shutil.copytree(reference, output)
    data = open_documents(output)
    build_index(data, VECTOR_COLUMN, IndexSettings(recall_queries=0, connectivity=8, expansion_add=16))
    index_dir = os.path.join(output, layout_lib.INDEX_DIR)
    assert sorted(os.listdir(index_dir)) == [f"{VECTOR_COLUMN}.json", f"{VECTOR_COLUMN}.usearch"]
    command = pipeline_command(corpus, output, "--model", tiny_bundle[0], *FLAGS, "--overwrite")
    assert kill_group_when(command, lambda: len(durable_files(output)) >= 2)
    summary = run_export(
        ["--model", tiny_bundle[0], "--input", corpus, "--output", output, *FLAGS, "--overwrite"]
    )
    assert summary.exit_code == 0, summary.message
    assert state_lib.read_manifest(output)["resumed"] and summary.rows_kept > 0
    assert_same_export(output, reference)
    assert os.listdir(index_dir) == []
