"""A generated adversarial corpus: files that once broke the reader, and what each record must become.

Each case writes its files into a directory and returns an `Expected`: the ids
that must be rows, the (file name, position) -> reason of every dead letter,
and how many files are broken (read in part or not at all: exit status 5).
Cases of one format can share a directory and run as one export.
"""

import bz2
import dataclasses
import datetime
import gzip
import io
import json
import os
import tarfile
import zlib

import pyarrow as pa
import pyarrow.parquet as pq

BOM = b"\xef\xbb\xbf"
# Flags of the export of each format's cases (text: the tiny bundle's one-input layer).
FORMAT_FLAGS = {
    "jsonl": ["--input_format", "jsonl", "--keep_fields", "kind"],
    "csv": ["--input_format", "csv"],
    "text": ["--input_format", "text", "--layer", "lstm_content"],
    "parquet": ["--input_format", "parquet"],
}


@dataclasses.dataclass
class Expected:
    rows: set = dataclasses.field(default_factory=set)
    dead: dict = dataclasses.field(default_factory=dict)
    broken: int = 0

    def __or__(self, other):
        return Expected(self.rows | other.rows, {**self.dead, **other.dead}, self.broken + other.broken)

    @property
    def records(self):
        return len(self.rows) + len(self.dead)

    @property
    def exit_code(self):
        return 5 if self.broken else 0


def escaped(text):
    """How a dead letter shows text with lone surrogates (a file name that is not UTF-8)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def record(doc_id, content="word1 word2 word3", title="word4", **extra):
    return {"id": doc_id, "content": content, "title": title, **extra}


def jsonl_bytes(lines):
    """JSONL: dicts are encoded, bytes are written as they are."""
    encoded = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
    return b"".join(line + b"\n" for line in encoded)


def csv_bytes(header, rows):
    return "".join(",".join(row) + "\r\n" for row in [header, *rows]).encode()


def truncated_gzip(data):
    """`data` gzipped and cut in half, and how many whole lines the half holds."""
    compressed = gzip.compress(data, mtime=0)
    half = compressed[: len(compressed) // 2]
    complete = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(half).count(b"\n")
    return half, complete


def _write(directory, name, data):
    path = os.path.join(os.fsencode(directory), name if isinstance(name, bytes) else name.encode())
    with open(path, "wb") as handle:
        handle.write(data)
    return os.fsdecode(path)


# JSONL ------------------------------------------------------------------------------------------


def recursion_bomb(directory):
    """Records that raise in json.loads (not JSONDecodeError) end only themselves."""
    bomb = b"[" * 100_000 + b"]" * 100_000  # 200 KB, under --max_record_bytes
    huge_integer_id = b'{"id": ' + b"9" * 5000 + b', "content": "word1", "title": "word2"}'
    _write(directory, "bomb.jsonl", jsonl_bytes([record("bomb-1"), bomb, record("bomb-2"), huge_integer_id]))
    return Expected(
        {"bomb-1", "bomb-2"}, {("bomb.jsonl", 2): "malformed_json", ("bomb.jsonl", 4): "malformed_json"}
    )


def lone_surrogates(directory):
    """A lone surrogate escape anywhere Parquet would have to store it is a dead letter."""
    lines = [
        b'{"id": "sur-\\ud800", "content": "word1", "title": "word2"}',
        b'{"id": "sur-2", "content": "word1 \\udfff", "title": "word2"}',
        b'{"id": "sur-3", "content": "word1", "title": "word2", "kind": "\\ud800"}',
        b'{"id": "sur-4", "content": "word1", "title": "word2", "kind": {"x": ["\\udc80"]}}',
        json.dumps(record("sur-5", kind="fine")).encode(),
    ]
    _write(directory, "surrogates.jsonl", jsonl_bytes(lines))
    # A file name that is not UTF-8: its dead letters' `source` holds a surrogate too.
    name = b"name-\xff.jsonl"
    _write(directory, name, jsonl_bytes([record("sur-6"), b"{broken"]))
    dead = {("surrogates.jsonl", n): "invalid_utf8" for n in (1, 2, 3, 4)}
    dead[escaped(os.fsdecode(name)), 2] = "malformed_json"
    return Expected({"sur-5", "sur-6"}, dead)


def token_id_range(directory):
    """Token ids outside int32 (the model's input) are dead letters, not an OverflowError."""
    lines = [
        record("ids-1", [5, 6, 7], [8]),
        record("ids-2", [1, 2**31], [3]),
        record("ids-3", [1, 2], [2**40]),
        record("ids-4", [1, -1], [3]),
        record("ids-5", [1, 2.5], [3]),
    ]
    _write(directory, "ids.jsonl", jsonl_bytes(lines))
    return Expected(
        {"ids-1"},
        {
            ("ids.jsonl", 2): "bad_token_id",
            ("ids.jsonl", 3): "bad_token_id",
            ("ids.jsonl", 4): "bad_token_id",
            ("ids.jsonl", 5): "wrong_type",
        },
    )


def gzip_jsonl(directory):
    _write(directory, "data.jsonl.gz", gzip.compress(jsonl_bytes([record("gz-1"), record("gz-2")])))
    return Expected({"gz-1", "gz-2"})


def truncated_jsonl(directory):
    """A .gz cut in half: the whole lines before the cut are rows, the cut one dead letter."""
    data, complete = truncated_gzip(jsonl_bytes([record(f"cut-{n}") for n in range(1, 301)]))
    _write(directory, "cut.jsonl.gz", data)
    return Expected(
        {f"cut-{n}" for n in range(1, complete + 1)}, {("cut.jsonl.gz", complete + 1): "read_error"}, 1
    )


def not_gzip(directory):
    """Named .gz but not gzip, or compressed another way: a file nothing can be read from."""
    _write(directory, "fake.jsonl.gz", jsonl_bytes([record("fake-1")]))
    _write(directory, "other.jsonl.bz2", bz2.compress(jsonl_bytes([record("bz2-1")])))
    dead = {("fake.jsonl.gz", None): "unreadable_file", ("other.jsonl.bz2", None): "unreadable_file"}
    return Expected(dead=dead, broken=2)


def bom_jsonl(directory):
    _write(directory, "bom.jsonl", BOM + jsonl_bytes([record("bom-j1"), record("bom-j2")]))
    return Expected({"bom-j1", "bom-j2"})


def broken_symlink(directory):
    _write(directory, "beside-link.jsonl", jsonl_bytes([record("link-1")]))
    os.symlink(os.path.join(directory, "nowhere.jsonl"), os.path.join(directory, "link.jsonl"))
    return Expected({"link-1"}, {("link.jsonl", None): "unreadable_file"}, 1)


def blank_first_of_an_id(directory):
    """A blank record cannot hold its id: the next record of the id is its row (it had none)."""
    lines = [record("blank-1", content="  ", title=""), record("blank-1"), record("blank-1", content="word5")]
    _write(directory, "blank-first.jsonl", jsonl_bytes(lines))
    dead = {("blank-first.jsonl", 1): "empty_document", ("blank-first.jsonl", 3): "duplicate_id"}
    return Expected({"blank-1"}, dead)


def _tar_of(data, compression=""):
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode=f"w:{compression}") as archive:
        for name in ("a.jsonl", "b.jsonl"):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return sink.getvalue()


def tar_archives(directory):
    """A tar archive, by its name or its first header, is one unreadable_file, not records of its headers."""
    data = jsonl_bytes([record("tar-1"), record("tar-2")])
    names = {
        "notes.tar.gz": _tar_of(data, "gz"),
        "notes.tgz": _tar_of(data, "gz"),
        "notes.tar": _tar_of(data),
        "hidden.jsonl.gz": _tar_of(data, "gz"),
        "hidden.jsonl": _tar_of(data),
    }
    for name, archive in names.items():
        _write(directory, name, archive)
    return Expected(dead={(name, None): "unreadable_file" for name in names}, broken=len(names))


def carriage_return_jsonl(directory):
    """Records split by \r alone read as one line: how many the file holds is unknown, so it is broken."""
    lines = [json.dumps(record(f"cr-{n}")).encode() for n in range(5)]
    _write(directory, "mac.jsonl", b"\r".join(lines) + b"\r")
    return Expected(dead={("mac.jsonl", None): "unreadable_file"}, broken=1)


def carriage_return_jsonl_with_newlines(directory):
    """The same with one final newline (6 records were one malformed_json, exit 0), and amid newline lines."""
    lines = [json.dumps(record(f"crn-{n}")).encode() for n in range(8)]
    _write(directory, "mac-final.jsonl", b"\r".join(lines[:5]) + b"\n")
    # Lines 1 and 3 end with newlines; line 2 is three records split by \r.
    _write(directory, "mac-mid.jsonl", lines[5] + b"\n" + b"\r".join(lines[:3]) + b"\n" + lines[6] + b"\n")
    dead = {("mac-final.jsonl", None): "unreadable_file", ("mac-mid.jsonl", 2): "read_error"}
    return Expected({"crn-5", "crn-6"}, dead, broken=2)


def carriage_return_text(directory):
    """Text lines ended by \r alone, with a final newline: 3 documents were 1 row, exit 0.

    A single stray \r in a line of a file of many lines is text, the last line (no
    newline after it) included: it was a read_error there.
    """
    _write(directory, "mac-final.txt", b"first document\rsecond document\rthird document\n")
    _write(directory, "mac-two.txt", b"first document\rsecond document\n")
    stray = _write(directory, "stray.txt", b"first\nsecond with a stray \r in it\nlast with a stray \r in it")
    mixed = _write(directory, "mixed.txt", b"word1\nword2\rword3\rword4\nword5\n")
    rows = {f"{stray}:1", f"{stray}:2", f"{stray}:3", f"{mixed}:1", f"{mixed}:3"}
    dead = {
        ("mac-final.txt", None): "unreadable_file",
        ("mac-two.txt", None): "unreadable_file",
        ("mixed.txt", 2): "read_error",
    }
    return Expected(rows, dead, broken=3)


def pretty_printed_jsonl(directory):
    """`jq .` output: every line a malformed_json; the first says how to convert the file."""
    text = "".join(json.dumps(record(f"pretty-{n}"), indent=2) + "\n" for n in range(2))
    _write(directory, "pretty.jsonl", text.encode())
    lines = text.count("\n")
    return Expected(dead={("pretty.jsonl", n): "malformed_json" for n in range(1, lines + 1)})


# CSV --------------------------------------------------------------------------------------------

HEADER = ["id", "title", "content"]


def csv_field_sizes(directory):
    """A field over csv's own limit (128 KiB) is read; one over --max_record_bytes is skipped alone."""
    over_csv_limit = "word1 " * 40_000  # 240 KB
    over_record_limit = "word1 " * 200_000  # 1.2 MB
    # Quoted, over several lines, holding lines that look like rows: all one record.
    quoted = '"' + ('x,fake-id,"" quoted ""\r\nword2 ' * 60_000) + '"'
    rows = [
        ["big-1", "word2", "word3"],
        ["big-2", "word2", over_csv_limit],
        ["big-3", "word2", over_record_limit],
        ["big-4", "word2", quoted],
        ["big-5", "word2", "word3"],
        ["big-6", over_record_limit, quoted],
        ["big-7", "word2", "word3"],
    ]
    _write(directory, "sizes.csv", csv_bytes(HEADER, rows))
    return Expected(
        {"big-1", "big-2", "big-5", "big-7"},
        {("sizes.csv", 3): "too_large", ("sizes.csv", 4): "too_large", ("sizes.csv", 6): "too_large"},
    )


def bom_csv(directory):
    _write(directory, "bom.csv", BOM + csv_bytes(HEADER, [["bom-c1", "word1", "word2"]]))
    return Expected({"bom-c1"})


def duplicate_header(directory):
    """Two columns named like a field the export reads: every row is a dead letter, none a guess."""
    _write(
        directory,
        "twice.csv",
        csv_bytes(
            ["id", "title", "content", "content"], [["dup-1", "a", "b", "c"], ["dup-2", "a", "b", "c"]]
        ),
    )
    # A repeated column the export does not read is harmless.
    _write(
        directory,
        "unused-twice.csv",
        csv_bytes(["id", "title", "content", "note", "note"], [["dup-3", "word1", "word2", "x", "y"]]),
    )
    return Expected({"dup-3"}, {("twice.csv", 1): "ambiguous_header", ("twice.csv", 2): "ambiguous_header"})


def gzip_csv(directory):
    rows = [["gzc-1", "word1", "word2"], ["gzc-2", "word1", "word2"]]
    _write(directory, "data.csv.gz", gzip.compress(BOM + csv_bytes(HEADER, rows)))
    return Expected({"gzc-1", "gzc-2"})


def truncated_csv(directory):
    rows = [[f"cutc-{n}", "word1", "word2 word3"] for n in range(1, 301)]
    data, complete = truncated_gzip(csv_bytes(HEADER, rows))
    _write(directory, "cut.csv.gz", data)
    # The header is line 1, so the whole lines hold rows 1 to complete - 1.
    return Expected({f"cutc-{n}" for n in range(1, complete)}, {("cut.csv.gz", complete): "read_error"}, 1)


def unclosed_quote_csv(directory):
    """Row 10 opens a quote that never closes: that row alone is set aside, rows 11 to 100 are read."""
    rows = [[f"ucq-{n}", "word1", "word2"] for n in range(1, 101)]
    data = csv_bytes(HEADER, rows).replace(b"ucq-10,word1,", b'ucq-10,"word1,')
    _write(directory, "unclosed.csv", data)
    return Expected({f"ucq-{n}" for n in range(1, 101) if n != 10}, {("unclosed.csv", 10): "malformed_csv"})


def unclosed_quote_header_csv(directory):
    """A header whose quote never closes: no row can be told apart, so the file is unreadable."""
    _write(directory, "header.csv", b'id,"title,content\r\nuqh-1,word1,word2\r\n')
    return Expected(dead={("header.csv", None): "unreadable_file"}, broken=1)


def utf16_csv(directory):
    """Excel's "Unicode" CSV is UTF-16: one unreadable_file saying so, not rows of NULs."""
    _write(directory, "wide.csv", "id,title,content\r\nw-1,word1,word2\r\n".encode("utf-16"))
    return Expected(dead={("wide.csv", None): "unreadable_file"}, broken=1)


# Text -------------------------------------------------------------------------------------------


def gzip_text(directory):
    path = _write(directory, "lines.txt.gz", gzip.compress(BOM + b"word1 word2\nword3\n"))
    return Expected({f"{path}:1", f"{path}:2"})


def truncated_text(directory):
    data, complete = truncated_gzip(b"".join(b"word%d word2\n" % n for n in range(2000)))
    path = _write(directory, "cut.txt.gz", data)
    return Expected(
        {f"{path}:{n}" for n in range(1, complete + 1)}, {("cut.txt.gz", complete + 1): "read_error"}, 1
    )


def text_name_not_utf8(directory):
    """Text ids are FILE:LINE: a file name that is not UTF-8 is written with backslash escapes."""
    name = b"lines-\xfe.txt"
    path = _write(directory, name, b"word1\nword2\n")
    return Expected({f"{escaped(path)}:1", f"{escaped(path)}:2"})


# Parquet ----------------------------------------------------------------------------------------


def _parquet_bytes(ids, id_type=None):
    table = pa.table(
        {
            "id": pa.array(ids, type=id_type),
            "content": ["word1 word2"] * len(ids),
            "title": ["word3"] * len(ids),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def parquet_ids(directory):
    """Ids are strings or integers (the README); bytes and timestamps are bad_id, not "b'...'"."""
    _write(directory, "strings.parquet", _parquet_bytes(["pq-1", "pq-2"]))
    _write(directory, "integers.parquet", _parquet_bytes([7, 8]))
    _write(directory, "binary.parquet", _parquet_bytes([b"pq-3", b"pq-4"], pa.binary()))
    stamps = [datetime.datetime(2024, 1, 1), datetime.datetime(2024, 1, 2)]
    _write(directory, "stamps.parquet", _parquet_bytes(stamps, pa.timestamp("us")))
    dead = {(name, n): "bad_id" for name in ("binary.parquet", "stamps.parquet") for n in (1, 2)}
    return Expected({"pq-1", "pq-2", "7", "8"}, dead)


def _parquet_of(columns):
    """Parquet bytes of (name, values) columns, names possibly repeated."""
    table = pa.Table.from_arrays([pa.array(values) for _, values in columns], names=[n for n, _ in columns])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def duplicate_columns_parquet(directory):
    """Two columns named like a field the export reads: every row an ambiguous_header, as in a CSV."""
    words = ["word1", "word2"]
    twice = [("id", ["pqd-1", "pqd-2"]), ("title", words), ("content", words), ("content", words)]
    _write(directory, "twice.parquet", _parquet_of(twice))
    # A repeated column the export does not read is harmless.
    unused = [("id", ["pqd-3"]), ("title", ["word1"]), ("content", ["word2"])] + [("note", ["x"])] * 2
    _write(directory, "unused-twice.parquet", _parquet_of(unused))
    return Expected({"pqd-3"}, {("twice.parquet", n): "ambiguous_header" for n in (1, 2)})


def empty_row_group_parquet(directory):
    """A writer given an empty batch writes an empty row group (offsets 0): the groups after it are read."""
    schema = pa.schema([("id", pa.string()), ("content", pa.string()), ("title", pa.string())])
    with pq.ParquetWriter(os.path.join(directory, "gaps.parquet"), schema) as writer:
        for ids in (["gap-1", "gap-2"], [], ["gap-3", "gap-4", "gap-5"]):
            columns = {"id": ids, "content": ["word1"] * len(ids), "title": ["w"] * len(ids)}
            writer.write_table(pa.table(columns, schema=schema))
    return Expected({f"gap-{n}" for n in range(1, 6)})


def view_types_parquet(directory):
    """string_view columns count their bytes against --max_record_bytes, as string columns do."""
    big = "word1 " * 200_000  # 1.2 MB: over the default 1 MiB
    table = pa.table(
        {
            "id": pa.array(["view-1", "view-2"], pa.string_view()),
            "content": pa.array([big, "word2"], pa.string_view()),
            "title": pa.array(["word3", "word4"], pa.string_view()),
        }
    )
    pq.write_table(table, os.path.join(directory, "views.parquet"))
    return Expected({"view-2"}, {("views.parquet", 1): "too_large"})


def gzip_parquet(directory):
    _write(directory, "data.parquet.gz", gzip.compress(_parquet_bytes(["gzp-1", "gzp-2"])))
    return Expected({"gzp-1", "gzp-2"})


CASES = {
    "jsonl": [
        recursion_bomb,
        lone_surrogates,
        token_id_range,
        gzip_jsonl,
        truncated_jsonl,
        not_gzip,
        bom_jsonl,
        broken_symlink,
        blank_first_of_an_id,
        tar_archives,
        carriage_return_jsonl,
        carriage_return_jsonl_with_newlines,
        pretty_printed_jsonl,
    ],
    "csv": [
        csv_field_sizes,
        bom_csv,
        duplicate_header,
        gzip_csv,
        truncated_csv,
        unclosed_quote_csv,
        unclosed_quote_header_csv,
        utf16_csv,
    ],
    "text": [gzip_text, truncated_text, text_name_not_utf8, carriage_return_text],
    "parquet": [
        parquet_ids,
        duplicate_columns_parquet,
        gzip_parquet,
        empty_row_group_parquet,
        view_types_parquet,
    ],
}


def write(directory, cases):
    """Writes `cases` into `directory`; returns their merged `Expected`."""
    expected = Expected()
    for case in cases:
        expected = expected | case(str(directory))
    return expected
