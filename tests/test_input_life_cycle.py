"""The corpus a run reads is the launch listing: files that change, vanish, link or block after it.

Each test runs the real export in this process (Beam's in-memory runner, so a
test hook reaches the readers) on real files, and changes them at a chosen
point: after the listing (by wrapping the plan building), or while a file is
read (after the reader opened it).
"""

import json
import os
import re
import subprocess
import threading

import forkserver
import pytest
from pipeline_fixtures import REPOSITORY, pipeline_command, read_errors, read_rows

from pipeline.errors import EXIT_RECORDS_LOST
from pipeline.reading import ranges as ranges_lib
from pipeline.run import main
from pipeline.running import export
from pipeline.writing.state import read_manifest


def _line(doc_id):
    return (
        json.dumps({"id": doc_id, "content": f"word1 word2 word{len(doc_id) % 9}", "title": "word3"}) + "\n"
    )


def _write(path, ids):
    """Writes one JSONL record per id; returns the byte offset where each line starts."""
    offsets, offset = [], 0
    with open(path, "w", encoding="utf-8") as handle:
        for doc_id in ids:
            offsets.append(offset)
            line = _line(doc_id)
            handle.write(line)
            offset += len(line.encode())
    return offsets


def _run(bundle, pattern, output, *flags):
    return main(["--model", bundle, "--input", str(pattern), "--output", str(output), *map(str, flags)])


def _dead(output):
    table = read_errors(output)
    rows = table.to_pylist() if table is not None else []
    return {(os.path.basename(row["source"]), row["position"]): row for row in rows}


def _ids(output):
    return sorted(read_rows(output).column("id").to_pylist())


def _check_counts(output, broken):
    manifest = read_manifest(str(output))
    counts = manifest["counts"]
    assert counts["records_read"] == counts["rows_written"] + counts["dead_letters"]
    assert counts["files_broken"] == broken
    assert manifest["status"] == "completed_with_errors"


def _after_listing(monkeypatch, change):
    """Runs `change()` right after the launch listed --input and built the plan."""
    build_plan = export.build_plan

    def build_then_change(*args, **kwargs):
        result = build_plan(*args, **kwargs)
        change()
        return result

    monkeypatch.setattr(export, "build_plan", build_then_change)


class _Unblocker(threading.Thread):
    """After `seconds`, opens a named pipe for writing and closes it, every second until cancelled,
    so each reader blocked on it sees its end."""

    def __init__(self, path, seconds=90):
        super().__init__(daemon=True)
        self._path, self._seconds = path, seconds
        self._cancelled = threading.Event()
        self.fired = False

    def cancel(self):
        self._cancelled.set()

    def run(self):
        if self._cancelled.wait(self._seconds):
            return
        self.fired = True
        while not self._cancelled.wait(1):
            try:
                os.close(os.open(self._path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # No reader blocked right now, or no pipe any more.
                pass


def _unblock_later(path):
    """A started `_Unblocker`: a reader that blocks on `path` fails the test instead of hanging it."""
    unblocker = _Unblocker(path)
    unblocker.start()
    return unblocker


def test_files_deleted_truncated_or_rewritten_after_launch_are_dead_letters(
    tmp_path, tiny_bundle, monkeypatch, capsys
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    kept = [f"kept-{i}" for i in range(5)]
    _write(corpus / "a.jsonl", kept)
    _write(corpus / "b.jsonl", [f"deleted-{i}" for i in range(6)])
    _write(corpus / "c.jsonl", [f"cut-{i}" for i in range(6)])
    listed_size = os.path.getsize(corpus / "c.jsonl")
    _write(corpus / "d.jsonl", [f"swapped-{i}" for i in range(3)])
    _write(corpus / "e.jsonl", [f"piped-{i}" for i in range(3)])
    _write(corpus / "f.jsonl", [f"same-{i}" for i in range(2)])
    kept_time = os.stat(corpus / "f.jsonl")

    def change():
        os.remove(corpus / "b.jsonl")
        os.truncate(corpus / "c.jsonl", 10)  # as `logrotate copytruncate` does
        # The same size, new bytes and a new modification time: another file now.
        (corpus / "d.jsonl").write_text((corpus / "d.jsonl").read_text().replace("swapped", "SWAPPED"))
        stat = os.stat(corpus / "d.jsonl")
        os.utime(corpus / "d.jsonl", (stat.st_atime, stat.st_mtime + 10))
        os.remove(corpus / "e.jsonl")
        os.mkfifo(corpus / "e.jsonl")  # opening it would block the reader forever
        # Rewritten to the same size with its time kept (cp -p, rsync -t, touch -r): the id scan and the
        # read pass could see two files, and an id two rows.
        _write(corpus / "f.jsonl", ["kept-0", "kept-1"])
        os.utime(corpus / "f.jsonl", ns=(kept_time.st_atime_ns, kept_time.st_mtime_ns))

    _after_listing(monkeypatch, change)
    watchdog = _unblock_later(corpus / "e.jsonl")
    try:
        code = _run(tiny_bundle[0], corpus / "*.jsonl", tmp_path / "out")
    finally:
        watchdog.cancel()
    printed = capsys.readouterr()

    assert not watchdog.fired, "a reader blocked on the named pipe"
    assert code == EXIT_RECORDS_LOST, printed.err[-2000:]
    assert "records after a break may be lost" in printed.err
    assert _ids(tmp_path / "out") == kept
    dead = _dead(tmp_path / "out")
    assert {key: row["reason"] for key, row in dead.items()} == {
        ("b.jsonl", None): "unreadable_file",
        ("c.jsonl", None): "unreadable_file",
        ("d.jsonl", None): "unreadable_file",
        ("e.jsonl", None): "unreadable_file",
        ("f.jsonl", None): "unreadable_file",
    }
    assert "named pipe" in dead["e.jsonl", None]["message"]
    assert "status change time is not" in dead["f.jsonl", None]["message"]
    assert "no longer exists" in dead["b.jsonl", None]["message"]
    assert f"listed {listed_size} bytes" in dead["c.jsonl", None]["message"]
    assert "now 10 bytes" in dead["c.jsonl", None]["message"]
    assert "changed after the launch listed it" in dead["d.jsonl", None]["message"]
    _check_counts(tmp_path / "out", broken=5)


def _cut_while_reading(monkeypatch, path, keep_bytes, on_open):
    """Truncates `path` to `keep_bytes` just after the reader opens it for the `on_open`-th time."""
    opened = ranges_lib.RangeReader._open
    opens = []

    def open_then_cut(reader):
        handle = opened(reader)
        if reader._range.path == str(path):
            opens.append(reader._range.start)
            if len(opens) == on_open:
                os.truncate(path, keep_bytes)
        return handle

    monkeypatch.setattr(ranges_lib.RangeReader, "_open", open_then_cut)
    return opens


@pytest.mark.parametrize("split", [False, True], ids=["whole_file", "in_ranges"])
def test_a_file_truncated_while_it_is_read_ends_in_a_read_error_where_it_broke(
    tmp_path, tiny_bundle, monkeypatch, capsys, split
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    ids = [f"doc-{i:04d}" for i in range(400)]
    offsets = _write(corpus / "big.jsonl", ids)
    _write(corpus / "other.jsonl", ["other-1"])
    # The second open is the read pass (the first is the id scan): cut the file at line 201.
    opens = _cut_while_reading(monkeypatch, corpus / "big.jsonl", offsets[200], on_open=1 if split else 2)
    if split:
        # Four ranges of the file; the first range's open (the id scan) cuts it.
        monkeypatch.setattr(export, "split_bytes_for", lambda options, total: offsets[100] + 1)
    code = _run(tiny_bundle[0], corpus / "*.jsonl", tmp_path / "out")
    printed = capsys.readouterr()

    assert code == EXIT_RECORDS_LOST, printed.err[-2000:]
    dead = _dead(tmp_path / "out")
    if not split:
        assert opens == [0, 0]
        assert _ids(tmp_path / "out") == sorted(ids[:200] + ["other-1"])
        assert list(dead) == [("big.jsonl", 201)]
        assert dead["big.jsonl", 201]["reason"] == "read_error"
        assert "InputShorter" in dead["big.jsonl", 201]["message"]
        assert f"ends at byte {offsets[200]}" in dead["big.jsonl", 201]["message"]
        _check_counts(tmp_path / "out", broken=1)
    else:
        # Cut during the id scan: each of the 4 ranges of the read pass finds it changed.
        assert _ids(tmp_path / "out") == ["other-1"]
        rows = read_errors(tmp_path / "out").to_pylist()
        assert sorted(row["reason"] for row in rows) == ["read_error"] * 3 + ["unreadable_file"]
        assert all("changed after the launch listed it" in row["message"] for row in rows)
        starts = {row["message"].split(":")[0] for row in rows if row["reason"] == "read_error"}
        assert len(starts) == 3 and all(start.startswith("Reading stopped at byte ") for start in starts)
        assert opens == [0]  # the other ranges were found changed before they were opened
        manifest = read_manifest(str(tmp_path / "out"))
        assert manifest["counts"]["files_broken"] == 4
        assert manifest["counts"]["records_read"] == 5


def test_a_csv_file_truncated_while_it_is_read_ends_in_a_read_error(
    tmp_path, tiny_bundle, monkeypatch, capsys
):
    """CSV is read whole, to the size the launch listed: its data ending before that size breaks it there."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = ["id,content,title\r\n"] + [f"doc-{i:04d},word1 word2,word3\r\n" for i in range(400)]
    (corpus / "big.csv").write_text("".join(lines), newline="")
    cut = sum(len(line) for line in lines[:201])  # the header and 200 rows stay
    _cut_while_reading(monkeypatch, corpus / "big.csv", cut, on_open=2)
    code = _run(tiny_bundle[0], corpus / "*.csv", tmp_path / "out")
    printed = capsys.readouterr()

    assert code == EXIT_RECORDS_LOST, printed.err[-2000:]
    assert _ids(tmp_path / "out") == [f"doc-{i:04d}" for i in range(200)]
    dead = _dead(tmp_path / "out")
    assert list(dead) == [("big.csv", 201)] and dead["big.csv", 201]["reason"] == "read_error"
    assert f"the data ends at byte {cut}" in dead["big.csv", 201]["message"]
    _check_counts(tmp_path / "out", broken=1)


def test_a_range_that_ends_before_its_listed_end_is_a_read_error():
    """`corpus.read_records` on plain bytes: a range that meets the end of the data early says so."""
    import io
    import types

    from pipeline.reading import corpus

    plan = types.SimpleNamespace(
        input_format="jsonl", max_record_bytes=1000, id_field="id", keep_fields=(), inputs=(), tokenizes=True
    )
    data = b"".join(_line(f"d{i}").encode() for i in range(4))
    items = [
        item for _, item in corpus.read_records(plan, "f.jsonl", lambda: io.BytesIO(data), size=len(data) + 7)
    ]
    assert [getattr(item, "id", None) for item in items[:4]] == ["d0", "d1", "d2", "d3"]
    assert items[4]["reason"] == "read_error" and items[4]["position"] == 5
    # The listed size reached: nothing more.
    assert len(list(corpus.read_records(plan, "f.jsonl", lambda: io.BytesIO(data), size=len(data)))) == 4


@pytest.mark.parametrize("input_format", ["text", "jsonl", "csv"])
def test_a_file_cut_inside_a_record_while_it_is_read_makes_no_row_of_part_of_it(tmp_path, input_format):
    """A file cut mid-line after its check before reading (a writer's crash, `logrotate copytruncate`): the
    cut line was a row of part of its text ('third line ', a CSV 'second li'), and the read_error named the
    record after it; a line that runs past the listed end (appended to after a last line without newline)
    was read with the new bytes."""
    import contextlib
    import functools
    import types

    from pipeline.planning.plan import InputInfo
    from pipeline.reading import corpus, listing
    from pipeline.reading.documents import Document

    field = "text" if input_format == "text" else "content"
    plan = types.SimpleNamespace(
        input_format=input_format,
        max_record_bytes=1000,
        id_field="id",
        keep_fields=(),
        inputs=(InputInfo("content", field, 8),),
        tokenizes=True,
    )
    records = {
        "text": ["first line of text", "second line of text", "third line of text"],
        "jsonl": [json.dumps({"id": f"d{i}", "content": "some words"}) + "  " for i in range(3)],
        "csv": ["id,content", "a,first line", "b,second line", "c,third line"],
    }[input_format]
    path = tmp_path / f"c.{input_format}"
    data = "".join(line + "\n" for line in records).encode()

    def read(cut, grown=b""):
        path.write_bytes(data if grown else data[:-1])  # the listed file: a last line without newline
        (listed,), _ = listing.list_input(str(path))

        @contextlib.contextmanager
        def open_then_change():
            with open(path, "rb") as handle:
                if cut:
                    os.truncate(path, cut)
                else:
                    path.write_bytes(data[:-1] + grown)
                yield handle

        splittable = corpus.is_splittable(input_format, str(path))
        read = corpus.read_records(
            plan,
            str(path),
            open_then_change,
            claim=(lambda offset: offset < listed.size) if splittable else None,
            verify=functools.partial(listing.check_unchanged, listed),
            size=listed.size,
        )
        return [
            item.texts[0] if isinstance(item, Document) else (item["position"], item["reason"])
            for _, item in read
        ]

    # Records 1 and 2 are whole; record 3, the last, is cut (or grown).
    whole = {"jsonl": ["some words"] * 2, "csv": ["first line", "second line"]}.get(input_format, records[:2])
    assert read(len(data) - 6) == [*whole, (3, "read_error")]
    if input_format != "csv":  # a file read whole is read to its listed size only (above)
        assert read(0, grown=b" and more\n") == [*whole, (3, "read_error")]


def test_symlinked_directories_are_followed_as_the_shell_does(tmp_path, tiny_bundle, capsys):
    corpus, elsewhere = tmp_path / "in", tmp_path / "archive" / "2024"
    corpus.mkdir()
    elsewhere.mkdir(parents=True)
    _write(corpus / "top.jsonl", ["top-1"])
    _write(elsewhere / "old.jsonl", ["old-1", "old-2"])
    os.symlink(elsewhere, corpus / "2024")
    os.symlink(corpus, corpus / "loop")  # a loop: followed once, never forever

    assert _run(tiny_bundle[0], f"{corpus}/**.jsonl", tmp_path / "recursive") == 0
    assert _ids(tmp_path / "recursive") == ["old-1", "old-2", "top-1"]
    assert _run(tiny_bundle[0], f"{corpus}/*/*.jsonl", tmp_path / "one_level") == 0, capsys.readouterr().err
    assert _ids(tmp_path / "one_level") == ["old-1", "old-2", "top-1"]  # loop/top.jsonl is ../top.jsonl
    capsys.readouterr()


def test_listing_follows_links_with_beams_pattern_meaning(tmp_path, monkeypatch):
    from pipeline.reading import listing

    monkeypatch.chdir(tmp_path)
    os.makedirs("in/sub")
    os.makedirs("archive")
    for name in ("in/a.jsonl", "in/sub/b.jsonl", "archive/c.jsonl", "top.jsonl"):
        open(name, "w").close()
    os.symlink("../archive", "in/2024")
    os.symlink("..", "in/sub/up")

    def paths(pattern):
        files, other = listing.list_input(pattern)
        assert other == []
        return sorted(f.path for f in files)

    assert paths("in/*.jsonl") == ["in/a.jsonl"]
    assert paths("in/**.jsonl") == ["in/2024/c.jsonl", "in/a.jsonl", "in/sub/b.jsonl"]
    assert paths("in/*/*.jsonl") == ["in/2024/c.jsonl", "in/sub/b.jsonl"]
    assert paths("in/sub/up/*.jsonl") == ["in/sub/up/a.jsonl"]
    assert paths("*.jsonl") == ["top.jsonl"]
    assert paths("in/2024/c.jsonl") == ["in/2024/c.jsonl"]


def test_a_named_pipe_matched_by_the_pattern_is_refused_at_launch(tmp_path, tiny_bundle):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write(corpus / "a.jsonl", ["a-1"])
    os.mkfifo(corpus / "b.jsonl")
    command = pipeline_command(corpus / "*.jsonl", tmp_path / "out", "--model", tiny_bundle[0])
    try:
        result = forkserver.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the run blocked on the named pipe")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "b.jsonl" in error_lines[0] and "named pipe" in error_lines[0]
    assert not os.path.exists(tmp_path / "out")


def test_a_file_that_became_a_named_pipe_after_launch_is_unreadable_not_a_hang(tmp_path):
    from pipeline.reading import listing

    path = tmp_path / "a.jsonl"
    _write(path, ["a-1"])
    (listed,), _ = listing.list_input(str(path))
    os.remove(path)
    os.mkfifo(path)
    with pytest.raises(listing.InputChanged, match="named pipe"):
        listing.check_unchanged(listed)


def test_limit_with_a_dangling_symlink_in_the_pattern(tmp_path, tiny_bundle, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write(corpus / "b.jsonl", ["b-1", "b-2", "b-3"])
    os.symlink(corpus / "nowhere.jsonl", corpus / "a.jsonl")  # sorts first: inside the limit
    os.symlink(corpus / "nowhere.jsonl", corpus / "z.jsonl")  # after the limit: not read

    code = _run(tiny_bundle[0], corpus / "*.jsonl", tmp_path / "out", "--limit", 3)
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    assert code == EXIT_RECORDS_LOST, printed.err[-2000:]
    assert _ids(tmp_path / "out") == ["b-1", "b-2"]
    dead = _dead(tmp_path / "out")
    assert list(dead) == [("a.jsonl", None)]
    assert dead["a.jsonl", None]["reason"] == "unreadable_file"
    assert "which does not exist" in dead["a.jsonl", None]["message"]
    counts = read_manifest(str(tmp_path / "out"))["counts"]
    assert counts["records_read"] == 3 == counts["rows_written"] + counts["dead_letters"]


def test_a_pattern_matching_only_dangling_links_is_refused_at_launch(tmp_path, tiny_bundle, capsys):
    os.symlink(tmp_path / "nowhere.jsonl", tmp_path / "a.jsonl")
    assert _run(tiny_bundle[0], tmp_path / "a.jsonl", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "error: --input" in err and "symbolic links to nothing" in err and "nowhere.jsonl" in err
    assert not os.path.exists(tmp_path / "out")


def test_a_parquet_duplicate_names_the_first_row_by_number_across_ranges(tmp_path, tiny_bundle, monkeypatch):
    """A Parquet record's place is FILE:ROW, also when the first of its id is in another range."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"doc-{i:03d}" for i in range(200)]
    ids[150] = ids[120]  # row 151 repeats the id of row 121
    table = pa.table(
        {"id": ids, "content": [f"word{i % 9} word{i % 7}" for i in range(200)], "title": ["word1"] * 200}
    )
    path = tmp_path / "corpus.parquet"
    pq.write_table(table, path, row_group_size=10)
    monkeypatch.setattr(export, "split_bytes_for", lambda options, total: os.path.getsize(path) // 6)
    assert _run(tiny_bundle[0], path, tmp_path / "out") == 0
    dead = _dead(tmp_path / "out")
    assert list(dead) == [("corpus.parquet", 151)]
    assert dead["corpus.parquet", 151]["message"] == f"Id 'doc-120' was already used by {path}:121."
    assert read_manifest(str(tmp_path / "out"))["counts"]["ranges_read"] > 1


def test_a_symbolic_link_loop_is_named_as_a_loop_not_as_missing(tmp_path):
    """It was "a symbolic link to 'loop.jsonl', which does not exist": the file is there, a loop."""
    from pipeline.reading import listing

    (tmp_path / "loop.jsonl").symlink_to("loop.jsonl")
    (entry,), _ = listing.list_input(str(tmp_path / "*.jsonl"))
    with pytest.raises(
        listing.InputChanged, match="'loop.jsonl', which fails: Too many levels of symbolic links"
    ):
        listing.check_unchanged(entry)
    (tmp_path / "gone.jsonl").symlink_to("nowhere.jsonl")
    (entry,), _ = listing.list_input(str(tmp_path / "gone.jsonl"))
    with pytest.raises(listing.InputChanged, match="'nowhere.jsonl', which does not exist"):
        listing.check_unchanged(entry)


def test_a_globstar_slash_also_matches_the_files_directly_in_the_directory(tmp_path, tiny_bundle, capsys):
    """`DIR/**/*.jsonl` is "every .jsonl under DIR" in the shell, Python and Spark; Beam's: a subdirectory."""
    corpus = tmp_path / "in"
    (corpus / "sub" / "deeper").mkdir(parents=True)
    _write(corpus / "top.jsonl", ["top-1", "top-2"])
    _write(corpus / "sub" / "low.jsonl", ["low-1"])
    _write(corpus / "sub" / "deeper" / "lowest.jsonl", ["lowest-1"])
    assert _run(tiny_bundle[0], f"{corpus}/**/*.jsonl", tmp_path / "out") == 0, capsys.readouterr().err
    assert _ids(tmp_path / "out") == ["low-1", "lowest-1", "top-1", "top-2"]
    counts = read_manifest(str(tmp_path / "out"))["counts"]
    assert counts["records_read"] == 4 == counts["rows_written"]

    from pipeline.reading import listing

    def paths(pattern):
        return sorted(os.path.relpath(f.path, corpus) for f in listing.list_input(pattern)[0])

    # Each `**/` may match no directory; no file is listed twice.
    assert paths(f"{corpus}/**/sub/**/*.jsonl") == ["sub/deeper/lowest.jsonl", "sub/low.jsonl"]
    assert paths(f"{corpus}/**/top.jsonl") == ["top.jsonl"]


def test_an_unreadable_subdirectory_refuses_the_launch_naming_it(tmp_path, tiny_bundle):
    """It was skipped with a log warning: its records were in no count, and the run exited 0."""
    import shutil

    corpus = tmp_path / "in"
    for directory in ("locked", "also"):
        (corpus / directory).mkdir(parents=True)
    _write(corpus / "a.jsonl", ["a-1"])
    _write(corpus / "locked" / "b.jsonl", ["b-1"])
    _write(corpus / "also" / "c.jsonl", ["c-1"])
    os.chmod(corpus / "locked", 0)
    command = pipeline_command(f"{corpus}/**.jsonl", tmp_path / "out", "--model", tiny_bundle[0])
    # A directory the pattern's files cannot be in (a mount's lost+found) is no reason to refuse.
    listing_code = f"from pipeline.reading import listing; print(listing.list_input({f'{corpus}/a*/*'!r}))"
    beside = [command[0], "-c", listing_code]
    # Root reads any directory: each child runs as an ordinary user would, without that power.
    as_user = os.geteuid() == 0
    if as_user and not forkserver.ENABLED and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root's DAC capabilities")
    options = {"cwd": REPOSITORY, "capture_output": True, "text": True, "timeout": 120}
    try:
        result = forkserver.run(command, without_file_override=as_user, **options)
        listed = forkserver.run(beside, without_file_override=as_user, **options)
    finally:
        os.chmod(corpus / "locked", 0o700)
    assert listed.returncode == 0 and "c.jsonl" in listed.stdout, listed.stderr[-2000:]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert "locked" in error_lines[0] and "Permission denied" in error_lines[0]
    assert not os.path.exists(tmp_path / "out")


def test_an_existing_file_whose_name_holds_brackets_is_read(tmp_path, tiny_bundle, capsys):
    """`[1]` is a glob class that does not match the name "[1]"; the shell then takes the file, so do we."""
    _write(tmp_path / "data[1].jsonl", ["a-1", "a-2"])
    assert _run(tiny_bundle[0], tmp_path / "data[1].jsonl", tmp_path / "out") == 0, capsys.readouterr().err
    assert _ids(tmp_path / "out") == ["a-1", "a-2"]
    _write(tmp_path / "data1.jsonl", ["other"])
    from pipeline.reading import listing

    # The class now matches data1.jsonl: that was read instead of the file named, without a word.
    with pytest.raises(listing.AmbiguousPattern, match=re.escape("write each '[' as '[[]'")):
        listing.list_input(str(tmp_path / "data[1].jsonl"))
    listed = [f.path for f in listing.list_input(str(tmp_path / "data[[]1].jsonl"))[0]]
    assert listed == [str(tmp_path / "data[1].jsonl")]
    from pipeline.errors import ExportConfigError
    from pipeline.planning.locations import check_input

    # A folder named with "[" matches nothing as a pattern: the refusal says how to write it.
    (tmp_path / "in[a]").mkdir()
    _write(tmp_path / "in[a]" / "b.jsonl", ["b-1"])
    with pytest.raises(ExportConfigError, match=re.escape("in[[]a]/*.jsonl")):
        check_input(f"{tmp_path}/in[a]/*.jsonl")
    assert [f.path for f in listing.list_input(f"{tmp_path}/in[[]a]/*.jsonl")[0]] == [
        f"{tmp_path}/in[a]/b.jsonl"
    ]


def test_a_doubled_slash_in_a_pattern_is_one_slash(tmp_path):
    """`--input "$DIR/*.jsonl"` with DIR ending in "/" matched no files, where the shell lists them."""
    from pipeline.reading import listing

    _write(tmp_path / "a.jsonl", ["a-1"])
    for pattern in (f"{tmp_path}//*.jsonl", f"{tmp_path}//a.jsonl", f"{tmp_path}//**//*.jsonl"):
        assert [f.path for f in listing.list_input(pattern)[0]] == [f"{tmp_path}/a.jsonl"], pattern
