"""Large corpora: files read in ranges (exact positions), ids-only de-duplication, limits, shards."""

import hashlib
import io
import json
import logging
import os
import re
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sizes import SIZES

from models.bundle import DEFAULT_BUNDLE
from models.train import SAMPLE_CORPUS
from pipeline.planning.plan import InputInfo
from pipeline.reading import corpus, parquet_rows, text_lines
from pipeline.reading.documents import Document
from pipeline.reading.ids import LineIndex
from pipeline.running import runners
from pipeline.running.export import run_export
from pipeline.running.progress import ProgressMonitor
from pipeline.running.runners import RANGES_PER_LOCAL_WORKER
from pipeline.writing import layout as layout_lib
from pipeline.writing import state as state_lib

# --- corpus.read_records on plain bytes ----------------------------------------------------------


def _plan(input_format, field="content"):
    return types.SimpleNamespace(
        input_format=input_format,
        max_record_bytes=60,
        id_field="id",
        keep_fields=(),
        inputs=(InputInfo("content", field, 8),),
        tokenizes=True,
    )


def _summary(item):
    if isinstance(item, Document):
        return item.position, item.id, item.texts
    return item["position"], item["reason"]


def _read_in_ranges(plan, data, bounds, block_size, path="c.jsonl"):
    """Reads `data` in the ranges [bounds[i], bounds[i+1]) as the pipeline does: index first, then ranges."""
    newlines = {}

    def count(offset):
        block = offset // block_size
        newlines[block] = newlines.get(block, 0) + 1

    def claimer(stop):
        return lambda offset: offset < stop

    scanned = []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        scanned += list(
            corpus.read_records(plan, path, lambda: io.BytesIO(data), start, claimer(stop), on_newline=count)
        )
    index = LineIndex(newlines, block_size)
    items = []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        items += [
            item
            for _, item in corpus.read_records(
                plan, path, lambda: io.BytesIO(data), start, claimer(stop), lines_before=index.lines_before
            )
        ]
    return [order for order, _ in scanned], items


def test_any_cut_into_ranges_reads_every_line_once_with_its_line_number():
    lines = [
        text_lines.BOM + b'{"id": "a", "content": "w"}',
        b"",
        b'{"id": "b", "content": "' + b"x" * 80 + b'"}',  # over the limit: skipped, never held
        b"not json",
        b'{"id": "c", "content": "w"}\r',
        b'{"id": "d", "content": "w"}',
    ]
    data = b"\n".join(lines)  # The last line has no newline.
    plan = _plan("jsonl")
    whole = [_summary(item) for item in corpus.read_file(plan, "c.jsonl", lambda: io.BytesIO(data))]
    assert [entry[0] for entry in whole] == [1, 2, 3, 4, 5, 6]
    for cut in range(1, len(data)):
        for second in (cut + 1, cut + 7, len(data) - 1):
            bounds = sorted({0, cut, min(second, len(data)), len(data)})
            # Small index blocks, so that ranges start in blocks past the first.
            orders, items = _read_in_ranges(plan, data, bounds, block_size=16)
            assert [_summary(item) for item in items] == whole, bounds
            # The scan orders records by byte offset: the offset of each line.
            assert orders == [sum(len(line) + 1 for line in lines[:n]) for n in range(len(lines))]


def test_text_ids_are_file_and_line_in_any_range():
    data = b"".join(b"line %d\n" % n for n in range(1, 200))
    plan = _plan("text", field="text")
    _, items = _read_in_ranges(plan, data, [0, 333, 334, 1000, len(data)], 256, path="notes.txt")
    assert [item.id for item in items] == [f"notes.txt:{n}" for n in range(1, 200)]


def test_parquet_ranges_split_by_row_group():
    table = pa.table({"id": [f"p{n}" for n in range(10)], "content": ["word"] * 10})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=3)
    data = sink.getvalue()
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    starts = [parquet_rows.row_group_offset(metadata.row_group(g)) for g in range(metadata.num_row_groups)]
    # A cut between the second and third row groups.
    middle = (starts[1] + starts[2]) // 2
    seen = []
    for start, stop in ((0, middle), (middle, len(data))):
        items = corpus.read_records(
            _plan("parquet"), "p.parquet", lambda: io.BytesIO(data), start, lambda o, stop=stop: o < stop
        )
        seen.append([(item.position, item.id) for _, item in items])
    assert seen == [[(n + 1, f"p{n}") for n in range(6)], [(n + 1, f"p{n}") for n in range(6, 10)]]


# --- one file, two worker processes --------------------------------------------------------------

SPLIT_RECORDS = 1200
BAD_EVERY = 97  # a prime: the bad lines fall anywhere in the ranges
# Lines that repeat the id of an earlier line in another range: {line: line whose id it repeats}.
REPEATS = {601: 7, 1199: 600}
# The launcher's smallest range, made small enough that a half-megabyte file is cut as a
# real run cuts a file of many megabytes; the line-index blocks follow (never larger).
SMALL_SPLIT_BYTES = 16 << 10


def _split_corpus(path):
    """SPLIT_RECORDS JSONL records of the sample corpus's text, new ids; bad lines and repeated ids.

    Returns the expected {line: reason} of the dead letters and the ids of the rows.
    """
    with open(SAMPLE_CORPUS, encoding="utf-8") as handle:
        sample = [json.loads(line) for line in handle if line.strip()]
    dead, ids = {}, set()
    with open(path, "w", encoding="utf-8") as handle:
        for line in range(1, SPLIT_RECORDS + 1):
            if line % BAD_EVERY == 0:
                handle.write('{"id": "broken", "content": \n')
                dead[line] = "malformed_json"
                continue
            doc_id = f"doc-{REPEATS.get(line, line)}"
            if line in REPEATS:
                dead[line] = "duplicate_id"
            else:
                ids.add(doc_id)
            document = sample[line % len(sample)]
            handle.write(
                json.dumps({"id": doc_id, "title": document["title"], "content": document["content"]})
            )
            handle.write("\n")
    return dead, ids


@pytest.fixture(scope="module")
def split_exports(tmp_path_factory):
    """One corpus file exported in ranges in memory and by two worker processes.

    The default bundle, at the tutorial's sizes: its results do not depend on which
    documents share a batch or on the thread count, so the two modes must agree bit for bit.
    """
    directory = tmp_path_factory.mktemp("split")
    corpus_path = str(directory / "corpus.jsonl")
    dead, ids = _split_corpus(corpus_path)
    outputs = {}
    with pytest.MonkeyPatch.context() as patch:
        # Read by the launcher, which hands the split size (and so the index block) to the
        # workers in the graph.
        patch.setattr(runners, "MIN_SPLIT_BYTES", SMALL_SPLIT_BYTES)
        for mode, flags in (
            ("in_memory", ["--direct_running_mode=in_memory"]),
            ("multi_processing", ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]),
        ):
            output = str(directory / mode)
            argv = [
                "--model",
                DEFAULT_BUNDLE,
                "--input",
                corpus_path,
                "--output",
                output,
                "--batch_size",
                "64",
            ]
            outputs[mode] = (output, run_export([*argv, *flags]))
    return corpus_path, dead, ids, outputs


def _rows(output):
    paths = sorted(os.path.join(output, name) for name in os.listdir(output) if name.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(path) for path in paths]).sort_by("id")


def _errors(output):
    directory = os.path.join(output, layout_lib.ERRORS_DIR)
    tables = [pq.read_table(os.path.join(directory, name)) for name in sorted(os.listdir(directory))]
    return pa.concat_tables(tables).sort_by("position")


@pytest.mark.slow
def test_one_file_is_read_in_ranges_by_two_processes_with_the_in_memory_rows(split_exports):
    corpus_path, dead, ids, outputs = split_exports
    size = os.path.getsize(corpus_path)
    assert size > 4 * RANGES_PER_LOCAL_WORKER * SMALL_SPLIT_BYTES
    for mode, workers in (("in_memory", 1), ("multi_processing", 2)):
        output, summary = outputs[mode]
        assert summary.exit_code == 0, (mode, summary.message)
        counts = state_lib.read_manifest(output)["counts"]
        # Each worker process gets several ranges of the one file.
        assert counts["ranges_read"] >= workers * RANGES_PER_LOCAL_WORKER, mode
        assert counts["records_read"] == SPLIT_RECORDS == counts["rows_written"] + counts["dead_letters"]
        assert (summary.rows_written, summary.dead_letters) == (len(ids), len(dead)), mode

    rows, expected = _rows(outputs["multi_processing"][0]), _rows(outputs["in_memory"][0])
    assert expected.column("id").to_pylist() == sorted(ids)
    assert rows.schema.equals(expected.schema, check_metadata=True)
    assert rows.column_names == ["id", "lstm_content", "lstm_title", "emb", "input_sha256"]
    for column in rows.column_names:
        assert rows.column(column).equals(expected.column(column)), column
    errors = {mode: _errors(output) for mode, (output, _) in outputs.items()}
    assert errors["multi_processing"].equals(errors["in_memory"])


@pytest.mark.slow
def test_dead_letters_of_a_split_file_name_their_line(split_exports):
    corpus_path, dead, _, outputs = split_exports
    with open(corpus_path, "rb") as handle:
        lines = handle.read().split(b"\n")
    for mode, (output, _) in outputs.items():
        errors = _errors(output).to_pylist()
        assert {error["position"]: error["reason"] for error in errors} == dead, mode
        for error in errors:
            assert error["source"] == corpus_path
            if error["reason"] == "malformed_json":  # Its raw text is the line at its position.
                assert lines[error["position"] - 1].decode() == error["raw"]
        duplicates = {e["position"]: e["message"] for e in errors if e["reason"] == "duplicate_id"}
        assert duplicates == {
            line: f"Id 'doc-{first}' was already used by {corpus_path}:{first}."
            for line, first in REPEATS.items()
        }


# --- --limit, shards, progress -------------------------------------------------------------------


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


# The words of the tiny bundle's tokenizer: word0, word1, ...
TINY_WORDS = SIZES["vocabulary_size"] - 2


def _record(doc_id, number=0):
    # Different texts: different vectors and fingerprints, which Parquet cannot compress away.
    content = " ".join(f"word{(number * k) % TINY_WORDS}" for k in range(1, 5)) + f" {number}"
    return json.dumps({"id": doc_id, "title": f"word{number % TINY_WORDS}", "content": content})


def test_limit_reads_the_first_records_by_file_then_position(tmp_path, tiny_bundle):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    # b.jsonl sorts after a.jsonl: its records come last whatever the listing order.
    _write_lines(corpus_dir / "b.jsonl", [_record(f"b{n}") for n in range(50)])
    _write_lines(corpus_dir / "a.jsonl", [_record("a0"), "not json", _record("a0"), _record("a3")])
    output = str(tmp_path / "out")
    flags = ["--model", tiny_bundle[0], "--input", str(corpus_dir / "*.jsonl"), "--max_error_fraction", "1"]
    summary = run_export([*flags, "--output", output, "--limit", "7"])

    assert summary.exit_code == 0, summary.message
    assert (summary.records_read, summary.rows_written, summary.dead_letters) == (7, 5, 2)
    assert sorted(_rows(output).column("id").to_pylist()) == ["a0", "a3", "b0", "b1", "b2"]
    assert {(os.path.basename(e["source"]), e["position"]) for e in _errors(output).to_pylist()} == {
        ("a.jsonl", 2),
        ("a.jsonl", 3),
    }
    manifest = state_lib.read_manifest(output)
    assert manifest["status"] == "succeeded" and manifest["limited"] is True and manifest["limit"] == 7
    assert sum(shard["rows"] for shard in manifest["shards"]["rows"]) == 5

    # A limit beyond the corpus reads it all; without --limit the manifest says so.
    everything = run_export([*flags, "--output", str(tmp_path / "all"), "--limit", "1000"])
    assert everything.records_read == 54
    full = run_export([*flags, "--output", str(tmp_path / "full")])
    assert full.records_read == 54
    assert state_lib.read_manifest(str(tmp_path / "full"))["limited"] is False


def test_limit_with_files_read_whole(tmp_path, tiny_bundle):
    """CSV and .gz files are one range each: one past the cut-off is skipped, one before it cut short."""
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for name in ("a.csv", "b.csv"):
        rows = "".join(f"{name[0]}{n},word1,word2 word{n}\r\n" for n in range(20))
        (corpus_dir / name).write_text("id,title,content\r\n" + rows)
    output = str(tmp_path / "out")
    summary = run_export(
        ["--model", tiny_bundle[0], "--input", str(corpus_dir / "*.csv"), "--output", output, "--limit", "5"]
    )
    assert summary.exit_code == 0, summary.message
    assert sorted(_rows(output).column("id").to_pylist()) == [f"a{n}" for n in range(5)]


def test_limit_must_be_positive(tmp_path, tiny_bundle, capsys):
    from pipeline.run import EXIT_CONFIG_ERROR, main

    code = main(["--model", tiny_bundle[0], "--output", str(tmp_path / "o"), "--limit", "0"])
    assert code == EXIT_CONFIG_ERROR and "--limit must be an integer from 1 to" in capsys.readouterr().err


def test_output_shards_are_cut_at_the_target_size(tmp_path, tiny_bundle):
    corpus_path = str(tmp_path / "c.jsonl")
    _write_lines(corpus_path, [_record(f"d{n}", n) for n in range(6000)])
    output = str(tmp_path / "out")
    target = 100_000
    summary = run_export(
        ["--model", tiny_bundle[0], "--input", corpus_path, "--output", output, "--shard_mb", "0.1"]
    )
    assert summary.exit_code == 0, summary.message
    names = sorted(name for name in os.listdir(output) if name.endswith(".parquet"))
    assert len(names) >= 3
    assert names == [f"part-{n:05d}-of-{len(names):05d}.parquet" for n in range(len(names))]
    sizes = [os.path.getsize(os.path.join(output, name)) for name in names]
    # A shard is closed once it reaches the target: at most one row group (half the target) beyond it.
    assert max(sizes) <= 1.5 * target + 16_384
    assert sorted(sizes)[len(sizes) // 2] >= target
    manifest = state_lib.read_manifest(output)
    assert [shard["file"] for shard in manifest["shards"]["rows"]] == names
    for shard in manifest["shards"]["rows"]:
        path = os.path.join(output, shard["file"])
        assert pq.ParquetFile(path).metadata.num_rows == shard["rows"]
        with open(path, "rb") as handle:
            assert shard["sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert sum(shard["rows"] for shard in manifest["shards"]["rows"]) == 6000


_PROGRESS = re.compile(
    r"progress: ([\d,]+) records read \((\d+)% of [^)]*\), ([\d,]+) rows written, ([\d,]+) dead letters, "
    r"(?:[\d,]+ docs/s|docs/s pending), (ETA [\d:]+|ETA unknown|done in [\d:]+)(, first row after [\d:]+)?"
)


def test_progress_lines_appear_and_add_up(tmp_path, tiny_bundle, caplog):
    corpus_path = str(tmp_path / "c.jsonl")
    _write_lines(corpus_path, [_record(f"d{n}") for n in range(3000)] + ["not json"] * 3)
    caplog.set_level(logging.INFO, logger="pipeline.running.progress")
    summary = run_export(
        [
            *("--model", tiny_bundle[0], "--input", corpus_path, "--output", str(tmp_path / "out")),
            *("--progress_seconds", "0.2"),
        ]
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.running.progress"]
    assert len(lines) >= 2, lines
    parsed = [_PROGRESS.fullmatch(line) for line in lines if "checking ids" not in line]
    assert parsed and all(parsed), lines
    final = parsed[-1]
    numbers = [int(final.group(n).replace(",", "")) for n in (1, 3, 4)]
    assert final.group(5).startswith("done in") and final.group(2) == "100"
    assert numbers == [summary.records_read, summary.rows_written, summary.dead_letters] == [3003, 3000, 3]
    # While it works the counts only grow.
    counts = [int(match.group(1).replace(",", "")) for match in parsed]
    assert counts == sorted(counts)


def test_progress_eta_is_input_bytes_consumed_against_the_total(tmp_path):
    monitor = ProgressMonitor(str(tmp_path), total_bytes=1_000_000)
    totals = dict.fromkeys(("scanned_bytes", "read_bytes", "records", "rows", "dead_letters"), 0)
    assert monitor.line(dict(totals, scanned_bytes=500_000)) == "progress: checking ids, 50% of 1 MB scanned"
    monitor.line(dict(totals, read_bytes=100_000, records=100))
    since, records, read = monitor._reading_start
    monitor._reading_start = (since - 10, records, read)  # ten seconds later: 100 kB/s and 10 docs/s
    line = monitor.line(dict(totals, read_bytes=200_000, records=200, rows=190, dead_letters=5))
    assert line == (
        "progress: 200 records read (20% of 1 MB), 190 rows written, 5 dead letters, 10 docs/s, ETA 0:01:20"
    )


def test_the_last_progress_line_of_a_limit_past_the_input_says_the_whole_input_was_read(tmp_path):
    """It said "18 records read (2% of --limit 1,000) ... done": a run that read it all, told as cut short."""
    monitor = ProgressMonitor(str(tmp_path), total_bytes=1_000, limit=1_000)
    totals = dict.fromkeys(("scanned_bytes", "read_bytes", "records", "rows", "dead_letters"), 0)
    line = monitor.line(dict(totals, read_bytes=1_000, records=18, rows=7, dead_letters=11), final=True)
    assert line.startswith("progress: 18 records read (the whole input, under --limit 1,000), 7 rows written")
    line = monitor.line(dict(totals, read_bytes=500, records=1_000, rows=1_000), final=True)
    assert line.startswith("progress: 1,000 records read (100% of --limit 1,000)")


def test_progress_shows_the_time_to_first_row_from_the_command_start(tmp_path):
    from pipeline.running import progress

    assert 0 < progress.process_seconds() < 24 * 3600  # this pytest process started a while ago
    monitor = ProgressMonitor(str(tmp_path), total_bytes=1_000)
    first, second = progress.ProgressRecorder(str(tmp_path)), progress.ProgressRecorder(str(tmp_path))
    first.add(read_bytes=100, records=10)
    first.flush()
    assert "first row" not in monitor.line(progress.read_totals(str(tmp_path)))
    second.add(read_bytes=100, records=10, rows=10)
    second.flush()
    first.add(read_bytes=100, records=10, rows=10)
    first.flush()
    totals = progress.read_totals(str(tmp_path))
    assert totals[progress.FIRST_ROW_AT] == second._counts[progress.FIRST_ROW_AT]  # the earliest process
    monitor._command_started = totals[progress.FIRST_ROW_AT] - 75  # the command started 75 s before
    assert monitor.line(totals).endswith(", first row after 0:01:15")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_live_bar(tmp_path, monkeypatch):
    from pipeline.running import progress

    monkeypatch.setenv("COLUMNS", "250")  # A wide terminal: rich cuts lines to the width.
    recorder = progress.ProgressRecorder(str(tmp_path))
    recorder.add(scanned_bytes=1000, read_bytes=1000, records=10, rows=9, dead_letters=1)
    recorder.flush()
    terminal = _Terminal()
    with ProgressMonitor(str(tmp_path), total_bytes=1000, stream=terminal):
        pass
    shown = terminal.getvalue()
    assert (
        "embedding" in shown and "10 records read (100% of 1.0 kB), 9 rows written, 1 dead letters" in shown
    )


class _FakeDataflowResult:
    """What `poll_dataflow` uses of a DataflowPipelineResult: two polls running, then done."""

    def __init__(self):
        self.states = ["RUNNING", "RUNNING", "DONE"]
        self.state = "RUNNING"

    def job_id(self):
        return "2026-11-27_job"

    def wait_until_finish(self, duration=None):
        self.state = self.states.pop(0)

    def metrics(self):
        def counter(name, value):
            metric = types.SimpleNamespace(name=name)
            return types.SimpleNamespace(
                key=types.SimpleNamespace(metric=metric), committed=value, attempted=value
            )

        counters = [counter("records_read", 1200), counter("rows_embedded", 1100), counter("failed_x", 7)]
        return types.SimpleNamespace(query=lambda _filter: {"counters": counters})


def test_dataflow_launcher_prints_the_console_url_and_the_counters(caplog):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.running.dataflow import poll_dataflow

    caplog.set_level(logging.INFO, logger="pipeline.running.dataflow")
    options = PipelineOptions(["--project", "proj", "--region", "europe-west1"])
    poll_dataflow(_FakeDataflowResult(), options, interval=0.01)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == (
        "Dataflow job 2026-11-27_job: https://console.cloud.google.com/dataflow/jobs/europe-west1/"
        "2026-11-27_job?project=proj"
    )
    running = "Dataflow job 2026-11-27_job: RUNNING, 1,200 records read, 1,100 rows embedded, 7 dead letters"
    assert lines[1:] == [running, running]


@pytest.mark.parametrize(
    ("argv", "cores", "total_bytes", "expected"),
    [
        ([], 2, runners.LOCAL_PROCESSES_MIN_BYTES, ("multi_processing", 2)),
        ([], 8, 10 * runners.LOCAL_PROCESSES_MIN_BYTES, ("multi_processing", 8)),
        ([], 2, runners.LOCAL_PROCESSES_MIN_BYTES - 1, None),  # done before workers load TensorFlow
        ([], 1, 10 * runners.LOCAL_PROCESSES_MIN_BYTES, None),  # one core: nothing to gain
        (["--direct_running_mode=in_memory"], 2, 10 * runners.LOCAL_PROCESSES_MIN_BYTES, None),
        (["--direct_num_workers", "3"], 2, 10 * runners.LOCAL_PROCESSES_MIN_BYTES, None),
        (["--runner=DataflowRunner"], 2, 10 * runners.LOCAL_PROCESSES_MIN_BYTES, None),
    ],
)
def test_a_local_run_uses_every_core_only_when_it_pays_and_was_not_told_otherwise(
    monkeypatch, argv, cores, total_bytes, expected
):
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    options = PipelineOptions(argv)
    direct = options.view_as(DirectOptions)
    before = (direct.direct_running_mode, direct.direct_num_workers)
    runners.use_local_cores(options, total_bytes, argv)
    after = (direct.direct_running_mode, direct.direct_num_workers)
    assert after == (expected or before)
