"""`pipeline.reading` on plain bytes, without Beam: positions, limits, byte-order marks and broken streams."""

import gzip
import io
import json
import types

import pytest

from pipeline.planning.plan import InputInfo
from pipeline.reading import corpus, listing, text_lines
from pipeline.reading.documents import Document


def _plan(input_format, limit=1000, field="content"):
    return types.SimpleNamespace(
        input_format=input_format,
        max_record_bytes=limit,
        id_field="id",
        keep_fields=(),
        inputs=(InputInfo("content", field, 8),),
        tokenizes=True,
    )


def _read(plan, data, path="corpus"):
    return list(corpus.read_file(plan, path, lambda: io.BytesIO(data)))


def _summary(items):
    """(position, reason or the document's texts) per item."""
    return [
        (item.position, item.texts) if isinstance(item, Document) else (item["position"], item["reason"])
        for item in items
    ]


class _ReadsSizes(io.BytesIO):
    """A stream that remembers the largest single read asked of it."""

    largest = 0

    def readline(self, size=-1):
        self.largest = max(self.largest, size)
        return super().readline(size)


def test_a_line_over_the_limit_is_skipped_without_being_held():
    stream = _ReadsSizes(b"x" * 5_000_000 + b"\n" + b'{"id": "a", "content": "word"}\n')
    items = list(corpus.read_file(_plan("jsonl"), "c.jsonl", lambda: stream))
    assert _summary(items) == [(1, "too_large"), (2, ("word",))]
    # The dead letter keeps the start of the record: what was read before it was found too large.
    # (The first line's read has room for a byte-order mark too: limit + 2 + 3 bytes.)
    assert "5000000 bytes" in items[0]["message"] and items[0]["raw"] == "x" * 1005
    assert 0 < stream.largest <= 1 << 20


def test_a_record_of_exactly_the_limit_is_read():
    line = b'{"id": "a", "content": "' + b"w" * 70 + b'"}'
    assert _summary(_read(_plan("jsonl", limit=len(line)), line + b"\r\n")) == [(1, ("w" * 70,))]
    assert _summary(_read(_plan("jsonl", limit=len(line) - 1), line + b"\r\n")) == [(1, "too_large")]


def test_a_byte_order_mark_starting_any_text_line_is_dropped():
    """`cat a.txt b.txt` of files Notepad saved with a mark: the next file's first line started with U+FEFF,
    a first word no TextVectorization or Keras 2 tokenizer knows, where JSONL and CSV drop the mark."""
    items = _read(_plan("text", field="text"), text_lines.BOM + b"first\n" + text_lines.BOM + b"second\n")
    assert _summary(items) == [(1, ("first",)), (2, ("second",))]
    line = b"w" * 20  # Of exactly the limit after its mark, as in JSONL.
    assert _summary(_read(_plan("text", limit=20), b"a\n" + text_lines.BOM + line + b"\n")) == [
        (1, ("a",)),
        (2, ("w" * 20,)),
    ]
    csv_items = _read(_plan("csv"), text_lines.BOM + b"id,content\r\na,word\r\n")
    assert [item.id for item in csv_items] == ["a"]


def test_a_byte_order_mark_starting_a_later_jsonl_line_is_dropped():
    """`cat a.jsonl b.jsonl` of files saved with a mark lost b's first record: malformed_json, no word why."""
    first, second = b'{"id": "a", "content": "one"}\n', b'{"id": "b", "content": "two"}\n'
    data = text_lines.BOM + first + text_lines.BOM + second
    assert _summary(_read(_plan("jsonl"), data)) == [(1, ("one",)), (2, ("two",))]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_a_later_jsonl_line_of_exactly_the_limit_after_a_byte_order_mark_is_read(ending):
    """The mark of a joined file's first line counted against --max_record_bytes: too_large, though the
    record (line 1 of its own file, and read so there) was exactly the limit."""
    line = b'{"id": "b", "content": "' + b"w" * 70 + b'"}'
    data = text_lines.BOM + b'{"id": "a", "content": "x"}' + ending + text_lines.BOM + line + ending
    assert _summary(_read(_plan("jsonl", limit=len(line)), data)) == [(1, ("x",)), (2, ("w" * 70,))]
    assert _summary(_read(_plan("jsonl", limit=len(line) - 1), data)) == [(1, ("x",)), (2, "too_large")]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_a_first_line_of_exactly_the_limit_after_a_byte_order_mark_is_read_whole(ending):
    """The mark's 3 bytes took the read's room: the line lost its last character."""
    line = b'{"id": "a", "content": "' + b"w" * 70 + b'z"}'
    items = _read(
        _plan("jsonl", limit=len(line)), text_lines.BOM + line + ending + b'{"id": "b", "content": "x"}'
    )
    assert _summary(items) == [(1, ("w" * 70 + "z",)), (2, ("x",))]
    items = _read(_plan("jsonl", limit=len(line) - 1), text_lines.BOM + line + ending)
    assert _summary(items) == [(1, "too_large")]
    # The file's only line, without a line ending.
    assert _summary(_read(_plan("jsonl", limit=len(line)), text_lines.BOM + line)) == [(1, ("w" * 70 + "z",))]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_utf16_or_utf32_text_file_is_one_unreadable_file_not_lines_of_garbage(codec):
    """Notepad's "Unicode": read as UTF-8, every line but the first was text with NULs between its letters.

    UTF-32 big endian (00 00 FE FF) was not told at all, and UTF-32 little endian was told to
    convert with `iconv -f UTF-16`, which makes the same garbage.
    """
    data = "\ufefffirst line\nreturn a string value\nthird\n".encode(codec)
    (item,) = _read(_plan("text", field="text"), data, path="notes.txt")
    name = codec.upper().replace("-LE", "LE").replace("-BE", "BE")  # iconv's name: UTF-32BE
    assert item["reason"] == "unreadable_file" and f"iconv -f {name} -t UTF-8" in item["message"]
    # A range of it past its start (a large file is read in ranges) does not see the mark where it starts.
    ((_, ranged),) = corpus.read_records(
        _plan("text", field="text"), "notes.txt", lambda: io.BytesIO(data), 9
    )
    assert ranged["reason"] == "read_error" and f"iconv -f {name}" in ranged["message"]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("input_format", ["text", "jsonl", "csv"])
def test_utf16_or_utf32_without_a_byte_order_mark_is_one_unreadable_file(codec, input_format):
    """`iconv -t UTF-16LE` and Python's utf-16-le write no mark: a text corpus became rows of letters
    between NULs (single letters are words of the bundled vocabulary), JSONL and CSV dead letters
    that did not say why."""
    text = {
        "text": "first line\nreturn a string value\n",
        "jsonl": '{"id": "a", "content": "one"}\n{"id": "b", "content": "two"}\n',
        "csv": "id,content\r\na,one\r\n",
    }[input_format]
    data = text.encode(codec)
    (item,) = _read(_plan(input_format, field="text"), data, path=f"c.{input_format}")
    name = codec.upper().replace("-LE", "LE").replace("-BE", "BE")
    assert item["reason"] == "unreadable_file" and f"iconv -f {name} -t UTF-8" in item["message"]
    (item,) = _read(_plan(input_format, field="text"), gzip.compress(data), path=f"c.{input_format}.gz")
    assert item["reason"] == "unreadable_file" and f"iconv -f {name} -t UTF-8" in item["message"]
    if input_format != "csv":  # A range past the start tells it by the file's first bytes, as a whole read.
        ((_, ranged),) = corpus.read_records(_plan(input_format), "c", lambda: io.BytesIO(data), 9)
        assert ranged["reason"] == "read_error" and f"iconv -f {name}" in ranged["message"]


def test_text_with_a_nul_or_starting_short_is_not_taken_for_utf16():
    """Only a NUL in every character of the start tells UTF-16/32; UTF-8 text never has one so."""
    for data in (b"a\nb\n", b"ab\x00cdefgh\n", "caf\u00e9 \u00e0 la carte\n".encode()):
        items = _read(_plan("text", field="text"), data)
        assert all(isinstance(item, Document) for item in items) and len(items) == data.count(b"\n")


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize(
    "start",
    [
        "\u201cquoted\u201d words",
        "\u2022 item",
        "\u2014 a dash",
        "\u4e2d\u6587 text",
        "Привет, мир",
        "مرحبا بالعالم",
    ],
)
def test_utf16_without_a_mark_whose_first_character_is_beyond_latin1_is_one_unreadable_file(codec, start):
    """A curly quote, a bullet, a dash or CJK first has no NUL byte: the file was read as UTF-8,
    a row of letters between NULs per line (and a row of the last newline's NUL), exit 0. Cyrillic and
    Arabic have none at all (0x04, 0x06 instead): every line was a row of garbage."""
    data = f"{start}\nsecond line of text\n".encode(codec)
    (item,) = _read(_plan("text", field="text"), data, path="notes.txt")
    name = codec.upper().replace("-LE", "LE").replace("-BE", "BE")
    assert item["reason"] == "unreadable_file" and f"iconv -f {name} -t UTF-8" in item["message"]


# Lines of scripts whose UTF-16 holds no control byte but whitespace ones: Devanagari's high byte is 0x09
# (tab), Telugu's 0x0C (form feed), Malayalam's 0x0D (return), Gujarati's and Gurmukhi's 0x0A (newline);
# CJK's and Hangul's none.
SCRIPTS = {
    "hindi": "नमस्ते दुनिया\nयह दूसरी पंक्ति है\n",
    "telugu": "తెలుగు భాష\nరెండవ పంక్తి\n",
    "malayalam": "മലയാളം ഭാഷ\nരണ്ടാം വരി\n",
    "gujarati": "ગુજરાતી ભાષા\nબીજી લીટી\n",
    "gurmukhi": "ਸਤ ਸ੍ਰੀ ਅਕਾਲ\nਦੂਜੀ ਲਾਈਨ\n",
    "korean": "안녕하세요 세계\n두 번째 줄\n",
    "chinese": "字字字字字字\n北京是中国的首都。\n",
    "japanese": "日本語のテキストです。\n東京都は日本の首都です。\n",
}


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_utf16_without_a_mark_in_any_script_is_one_unreadable_file(script, codec):
    """Hindi, Telugu, Gurmukhi or Chinese UTF-16 without a mark was read as UTF-8: rows of garbage
    ('(\t.\t8' per Hindi line, '\x00W[W[' for 字字, a row per Gurmukhi letter), exit 0. The same text in
    UTF-8 stays rows."""
    text = SCRIPTS[script]
    (item,) = _read(_plan("text", field="text"), text.encode(codec), path="notes.txt")
    name = codec.upper().replace("-LE", "LE").replace("-BE", "BE")
    assert item["reason"] == "unreadable_file" and f"iconv -f {name} -t UTF-8" in item["message"]
    # A range past the start (a large file, two workers) tells it by the file's first bytes too.
    ((_, ranged),) = corpus.read_records(_plan("text"), "c", lambda: io.BytesIO(text.encode(codec)), 9)
    assert ranged["reason"] == "read_error" and f"iconv -f {name}" in ranged["message"]
    items = _read(_plan("text", field="text"), (text * 3).encode())
    assert [item.texts for item in items] == [(line,) for line in (text * 3).splitlines()]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_without_a_mark_whose_first_line_is_longer_than_its_start_is_one_unreadable_file(codec):
    """A document per line of Hindi: no newline in the 512 bytes the file is told by, so its lines were
    rows of garbage (big endian) or dead letters of Python's codec message; its spaces' NULs tell it."""
    line = " ".join(["नमस्ते दुनिया यह दूसरी पंक्ति है"] * 12)
    (item,) = _read(_plan("text", field="text"), f"{line}\n{line}\n".encode(codec), path="notes.txt")
    assert item["reason"] == "unreadable_file" and "iconv -f UTF-16" in item["message"]
    # After a UTF-8 first line, they are lines appended to a UTF-8 file: that line stays a row.
    items = _read(_plan("text", field="text"), b"ab\n" + f"{line}\r\n{line}\r\n".encode("utf-16-le"))
    assert items[0].texts == ("ab",) and all(item["reason"] == "invalid_utf8" for item in items[1:3])


@pytest.mark.parametrize("input_format", ["text", "csv"])
@pytest.mark.parametrize("ending", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_utf16_lines_of_any_script_after_utf8_ones_are_dead_letters(input_format, ending):
    """PowerShell's >> of Hindi or Chinese lines: each was a row of garbage ('\x00/\t9\t', a CSV id 'b\x00'),
    exit 0, for want of control bytes other than tabs between the letters; a stray NUL in UTF-8 stays text."""
    first = "id,content\na,first line\n" if input_format == "csv" else "first line\n"
    texts = ["यह दूसरी पंक्ति है\nतीसरी पंक्ति\n", "北京是中国的首都 2024\n字字字字字字\n"]
    if input_format == "text":  # Malayalam's high byte is 0x0D: lines of many \r, read_error 'old Mac'.
        texts.append("മലയാളം ഭാഷ ഇത്\nരണ്ടാം വരി ആണ്\n")
    for text in texts:
        lines = text.splitlines()
        lines = lines if input_format == "text" else [f"b{i},{line}" for i, line in enumerate(lines)]
        appended = "".join(line + ending for line in lines).encode("utf-16-le")
        items = _read(_plan(input_format), first.encode() + appended)
        assert isinstance(items[0], Document) and items[0].texts == ("first line",)
        assert all(
            item["reason"] == "invalid_utf8" and "UTF-16LE" in item["message"] for item in items[1:]
        ), _summary(items)
    items = _read(_plan(input_format), first.encode() + b"c,a stray\x00 NUL\n")
    assert all(isinstance(item, Document) for item in items)
    # Nor is a UTF-8 file whose first line a NUL follows (a C string's end) taken for UTF-16.
    assert isinstance(_read(_plan("text"), b"abcd\n\x00")[0], Document)


# CJK prose without spaces, with a U+XX0D character (不): a 0x0D byte, what old Mac files end lines with.
CJK_PROSE = {
    "chinese": "北京是中华人民共和国的首都，不是全国的政治中心、文化中心，不是世界著名古都和现代化国际城市。",
    "japanese": "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。不思議。",
}


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("script", CJK_PROSE)
def test_utf16_cjk_prose_of_long_lines_is_told_utf16_not_old_mac_line_ends(script, codec):
    """An article per line of Chinese in UTF-16 without a mark: no newline in the 512 bytes the file is
    told by, and no NUL, so it was an unreadable_file 'ends its lines with a carriage return alone' (tr,
    which garbles it more); appended to a UTF-8 file, read_error dead letters: exit 5, 'records may be
    lost'."""
    text, name = CJK_PROSE[script], codec.upper().replace("-LE", "LE").replace("-BE", "BE")
    (item,) = _read(_plan("text", field="text"), (text * 6 + "\n" + text * 5 + "\n").encode(codec))
    assert item["reason"] == "unreadable_file" and f"iconv -f {name} -t UTF-8" in item["message"]
    items = _read(
        _plan("text", field="text"), b"first line\n" + (text * 4 + "\n" + text * 3 + "\n").encode(codec)
    )
    assert items[0].texts == ("first line",)
    assert all(item["reason"] == "invalid_utf8" and "UTF-16" in item["message"] for item in items[1:])


@pytest.mark.parametrize("encoding", ["shift_jis", "euc-jp", "gbk", "big5", "euc-kr", "cp1252", "mac-roman"])
def test_text_in_a_legacy_encoding_is_not_taken_for_utf16(encoding):
    """Shift-JIS, GBK or Big5 prose reads as CJK ideographs in UTF-16 too, Latin-1 as CJK and U+20xx: their
    lines stay invalid_utf8 dead letters of their own (the run's hint names the conversion), not UTF-16."""
    text = {"shift_jis": "japanese", "euc-jp": "japanese", "gbk": "chinese", "big5": "chinese"}.get(encoding)
    if text is not None:
        line = CJK_PROSE[text].replace("不", "").encode(encoding, "replace") * 8
    elif encoding == "euc-kr":
        line = (
            "대한민국은동아시아의한반도남부에위치한민주공화국이다.서쪽으로는서해,남쪽으로는남해.".encode(
                encoding
            )
            * 8
        )
    else:
        line = (
            "Le cœur a ses raisons que la raison ne connaît point. Où est la bibliothèque? ".encode(encoding)
            * 8
        )
    items = _read(_plan("text", field="text"), line + b"\n" + line + b"\n")
    assert [(item["reason"], "UTF-16" in item["message"]) for item in items] == [("invalid_utf8", False)] * 2


@pytest.mark.parametrize("input_format", ["text", "csv"])
@pytest.mark.parametrize("ending", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_utf16be_lines_after_utf8_ones_are_dead_letters_not_rows_of_garbage(input_format, ending):
    """UTF-16BE appended to a UTF-8 file (`cat a.txt b_utf16be.txt`): each Hindi line was a row
    '\t/\t9\x00 \t&...', Chinese with spaces or digits a row of letters between NULs, exit 0. A stray NUL
    ending a UTF-8 line stays text."""
    first = "id,content\na,first line\n" if input_format == "csv" else "first line\n"
    for text in ("यह दूसरी पंक्ति है\nतीसरी पंक्ति\n", "北京是中国的首都 2024\n东京 12 字字\n"):
        lines = text.splitlines()
        lines = lines if input_format == "text" else [f"b{i},{line}" for i, line in enumerate(lines)]
        appended = "".join(line + ending for line in lines).encode("utf-16-be")
        items = _read(_plan(input_format), first.encode() + appended)
        # (A CSV reader ends a record at the \r of the CR unit 00 0D too: its 00 0A is a record of its own.)
        assert items[0].texts == ("first line",)
        assert all(item["reason"] == "invalid_utf8" and "UTF-16" in item["message"] for item in items[1:])
        assert sum("UTF-16BE text" in item["message"] for item in items[1:]) == 2
    items = _read(_plan(input_format), first.encode() + b"c,a C string's end\x00\nc2,and its NUL \x00\n")
    assert all(isinstance(item, Document) for item in items) and len(items) == 3


@pytest.mark.parametrize("input_format", ["text", "jsonl", "csv"])
def test_utf16_lines_after_utf8_ones_are_dead_letters_not_rows(input_format):
    """Windows PowerShell's >> appends UTF-16LE to a UTF-8 file: past its UTF-8 start, every line was a
    row of letters between NULs (a CSV id 'b\\x00'), or in JSONL a malformed_json that said nothing why."""
    first, appended = {
        "text": ("first line\n", "appended line\r\nanother one\r\n"),
        "jsonl": ('{"id": "a", "content": "x"}\n', '{"id": "b", "content": "y"}\r\n'),
        "csv": ("id,content\na,first\n", "b,second\r\nc,third\r\n"),
    }[input_format]
    for mark, text in ((b"", appended), (b"\xff\xfe", appended), (b"", appended.replace("line", "строка"))):
        items = _read(_plan(input_format), first.encode() + mark + text.encode("utf-16-le"))
        rows, letters = (
            [item for item in items if isinstance(item, Document)],
            [item for item in items if not isinstance(item, Document)],
        )
        assert [row.position for row in rows] == [1] and "\x00" not in "".join(rows[0].texts)
        assert letters and all(
            letter["reason"] == "invalid_utf8" and "UTF-16" in letter["message"] for letter in letters
        )
    # A short UTF-8 first line: the file is not told UTF-16 by the bytes after it.
    items = _read(_plan(input_format), first[:2].encode() + b"\n" + appended.encode("utf-16-le"))
    assert not any(not isinstance(item, Document) and item["reason"] == "unreadable_file" for item in items)


@pytest.mark.parametrize(
    "first", [b"\x1b[0m", b"ok\x1b", b"1\x01a\x01x"], ids=["colour_reset", "escape", "ctrl_a_fields"]
)
def test_a_short_first_line_with_a_control_byte_is_text_not_utf16(first):
    """A log starting with a terminal's colour reset, or a Hive export's Ctrl-A between one-letter fields:
    half the first line's bytes are control bytes on one side, so the whole file was one unreadable_file
    'UTF-16BE without a byte-order mark' (its first range only, when split). UTF-16's newline has its NUL."""
    data = first + b"\nThe build started at noon\n" + b"".join(b"line %d of the log\n" % i for i in range(40))
    items = _read(_plan("text", field="text"), data, path="build.log.txt")
    assert [item.texts for item in items][:2] == [(first.decode(),), ("The build started at noon",)]
    assert all(isinstance(item, Document) for item in items) and len(items) == 42
    ranged = corpus.read_records(_plan("text"), "c", lambda: io.BytesIO(data), 0, claim=lambda at: at < 60)
    assert all(isinstance(item, Document) for _, item in ranged)
    # A short first line in UTF-16 is still told so, by its newline's NUL.
    for codec in ("utf-16-le", "utf-16-be"):
        (item,) = _read(_plan("text", field="text"), "ok\nsecond\n".encode(codec))
        assert item["reason"] == "unreadable_file" and "UTF-16" in item["message"]
    # A line of odd length without a NUL is UTF-16LE when cut after a character's 0A byte (Њ is 0A 04).
    items = _read(_plan("text", field="text"), b"first\n" + "a Његош\nЊегош\n".encode("utf-16-le"))
    assert [item.texts for item in items if isinstance(item, Document) and any(item.texts)] == [("first",)]


@pytest.mark.parametrize("input_format", ["text", "jsonl", "csv"])
def test_a_dos_end_of_file_mark_is_said_to_be_one_not_utf16(input_format):
    """DOS tools end a file with Ctrl-Z (and `copy /b a+b` leaves one between the files): its line was an
    invalid_utf8 dead letter calling it UTF-16 to convert with iconv, which would make garbage of the file."""
    first = {
        "text": "a doc\r\n",
        "jsonl": '{"id": "a", "content": "a doc"}\r\n',
        "csv": "id,content\r\na,a doc\r\n",
    }[input_format]
    field = "text" if input_format == "text" else "content"
    items = _read(_plan(input_format, field=field), f"{first}\x1a".encode())
    assert items[0].texts == ("a doc",)
    ((_, reason),) = _summary(items[1:])
    assert reason == "empty_record" and "DOS end-of-file mark (Ctrl-Z" in items[1]["message"]
    assert "UTF-16" not in items[1]["message"]


@pytest.mark.parametrize("input_format", ["text", "jsonl", "csv"])
def test_a_dos_end_of_file_mark_right_after_the_last_record_is_no_part_of_it(input_format):
    """`copy /a` ends a file with Ctrl-Z, right after a last record without its newline: that record was a
    malformed_json 'Extra data', a malformed_csv (after a quoted field) or, in text, an invalid_utf8 'UTF-16'
    dead letter."""
    data = {
        "text": b"x\r\ny\x1a",
        "jsonl": b'{"id": "a", "content": "x"}\r\n{"id": "b", "content": "y"}\x1a',
        "csv": b'id,content\r\na,x\r\nb,"y"\x1a',
    }[input_format]
    items = _read(_plan(input_format, field="text" if input_format == "text" else "content"), data)
    assert [item.texts for item in items] == [("x",), ("y",)]


@pytest.mark.parametrize("input_format", ["text", "jsonl", "csv"])
def test_a_dos_end_of_file_mark_starting_a_joined_files_first_line_is_no_part_of_it(input_format):
    """`copy /b a+b` of DOS files: a's closing Ctrl-Z, which no newline follows, starts b's first line. That
    record was a malformed_json 'Expecting value', a CSV row of id '\\x1ab' (b's header a row of id
    '\\x1aid'), or a text row starting with the mark; a line of nothing but marks stays its dead letter."""
    data = {
        "text": b"x\r\n\x1a" + text_lines.BOM + b"y\r\n\x1a\x1a\r\n",
        "jsonl": b'{"id": "a", "content": "x"}\r\n\x1a{"id": "b", "content": "y"}\r\n\x1a\x1a\r\n',
        "csv": b"id,content\r\na,x\r\n\x1aid,content\r\n\x1a\x1ab,y\r\n\x1a\r\n",
    }[input_format]
    items = _read(_plan(input_format, field="text" if input_format == "text" else "content"), data)
    summary = [item.texts if isinstance(item, Document) else item["reason"] for item in items]
    joined = ["repeated_header"] if input_format == "csv" else []
    assert summary == [("x",), *joined, ("y",), "empty_record"]
    assert [item.id for item in items if isinstance(item, Document)][-1] in ("b", "corpus:2")


def test_compressed_data_whose_bytes_look_like_utf16_is_told_by_its_magic_number():
    """Binary data holds NULs: a zip of a UTF-16 file must be told zip data, not UTF-16 to convert."""
    (item,) = _read(_plan("jsonl"), b"PK\x03\x04" + "stored member".encode("utf-16-le"), path="c.jsonl")
    assert item["reason"] == "unreadable_file" and "zip data" in item["message"]


def test_utf8_text_with_nuls_here_and_there_is_read():
    """A stray NUL, or control bytes at no steady place, is no UTF-16: the file's lines are rows as before,
    single letters between tabs, a terminal's colours, a page break and man's bold (overstruck) included."""
    data = b"ab\x00cdefgh ijk\n" + b"one\x00 two three\x00 four five six\x00\nplain\n"
    data += b"a\tb\tc\td\te\n\x1b[31mred\x1b[0m words\n\x0c\nN\bNA\bAM\bME\bE\n"
    items = _read(_plan("text", field="text"), data)
    assert [item.position for item in items if isinstance(item, Document)] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("codec", ["utf-32-le", "utf-32-be"])
def test_utf32_lines_after_utf8_ones_name_utf32_to_convert_from(codec):
    """`cat a.txt b_utf32.txt`: each UTF-32 line was a dead letter saying to convert with iconv -f UTF-16LE,
    which garbles UTF-32. A later line reads as either byte order: both are named."""
    items = _read(_plan("text", field="text"), b"first line\n" + "second line\nthe third\n".encode(codec))
    letters = [item for item in items[1:] if len(item["raw"]) > 4]
    assert len(letters) == 2 and all(
        "UTF-16" not in letter["message"].split("(e.g.")[1] for letter in letters
    )
    if codec == "utf-32-le":  # Its first line starts with its first letter, no NUL: little endian.
        assert "iconv -f UTF-32LE -t UTF-8)" in letters[0]["message"]
    assert all("UTF-32BE" in letter["message"] for letter in letters[1 if codec == "utf-32-le" else 0 :])


@pytest.mark.parametrize("input_format", ["text", "csv"])
def test_a_short_utf8_line_with_a_stray_nul_is_text(input_format):
    """One stray NUL in a line of a word or two was a quarter of its 'high bytes' read as UTF-16LE, and the
    \r put back for an odd line another control byte: 'and\x00then', 'fox\x00', a CSV row 'b,x\x00y' were
    invalid_utf8 dead letters calling them UTF-16LE text. Appended UTF-16LE of two letters stays one, and
    so does CJK with a space ('你 好' is 60 4F 20 00 7D 59: one NUL, in a space's unit)."""
    first = "id,content\na,first line\n" if input_format == "csv" else "first line\n"
    lines = [b"and\x00then", b"fox\x00", b"brown\x00\x00", b"x\x00y", b"over the\x00"]
    if input_format == "csv":
        lines = [b"b,x\x00y", b"c,fox\x00", b"d,a\x00b", b"e,and\x00then"]
    items = _read(_plan(input_format), first.encode() + b"".join(line + b"\n" for line in lines))
    assert all(isinstance(item, Document) for item in items), _summary(items)
    assert [item.texts[0].encode() for item in items[1:]] == [line.split(b",")[-1] for line in lines]
    items = _read(
        _plan(input_format),
        first.encode() + ("b,ok\r\n" if input_format == "csv" else "ok\n").encode("utf-16-le"),
    )
    assert not isinstance(items[-1], Document) and "UTF-16LE" in items[-1]["message"]
    if input_format == "text":
        items = _read(_plan("text"), first.encode() + "你 好\n".encode("utf-16-le"))
        assert not isinstance(items[1], Document) and "UTF-16LE" in items[1]["message"]


def test_utf16_whose_first_character_is_nul_is_not_told_utf32():
    """FF FE, then U+0000 as 00 00, starts as UTF-32LE's mark does: it was told to convert with
    `iconv -f UTF-32LE`, which makes garbage of UTF-16."""
    data = "\ufeff\x00first line\nsecond\n".encode("utf-16-le")
    for path in ("notes.txt", "notes.jsonl"):
        (item,) = _read(_plan("text" if path.endswith("txt") else "jsonl", field="text"), data, path=path)
        assert "iconv -f UTF-16LE -t UTF-8" in item["message"]


@pytest.mark.parametrize("compressed", [False, True], ids=["csv", "csv_gz"])
def test_a_file_read_whole_stops_at_its_listed_size(compressed):
    """Appended to while read: its new records (a duplicate id among them) were exported unlisted."""
    listed = b"id,content\r\na,one\r\nb,two\r\n"
    appended = b"a,again\r\nc,three\r\n"
    if compressed:
        listed = gzip.compress(listed)
        appended = gzip.compress(appended)  # a second gzip member, as `gzip >> file` writes
    path = "c.csv.gz" if compressed else "c.csv"
    checks = []

    def verify():  # The listing's check: the file's size is no longer the listed one after the read.
        checks.append(1)
        if len(checks) == 2:
            raise listing.InputChanged("size 99, the launch listed 46")

    grown = lambda: io.BytesIO(listed + appended)  # noqa: E731
    items = [
        item for _, item in corpus.read_records(_plan("csv"), path, grown, verify=verify, size=len(listed))
    ]
    assert _summary(items) == [(1, ("one",)), (2, ("two",)), (3, "read_error")]
    assert "InputChanged" in items[-1]["message"]


def test_a_parquet_row_over_the_limit_is_too_large_as_in_every_format():
    """--max_record_bytes was ignored for Parquet: a 3 MB row was embedded where JSONL's is a dead letter."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": ["a", "big", "c", "d"],
            "content": pa.array(["word", "w" * 2000, "two words", None]).dictionary_encode(),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    items = _read(_plan("parquet", limit=1000), buffer.getvalue())
    assert _summary(items) == [(1, ("word",)), (2, "too_large"), (3, ("two words",)), (4, "missing_field")]
    assert items[1]["message"] == "Record of 2003 bytes exceeds --max_record_bytes=1000."


def test_a_parquet_id_column_of_integral_decimals_holds_integers():
    """Snowflake writes NUMBER(38,0) as decimal(38,0): every row was bad_id ("found Decimal"), exit 4.
    Its ids are integers, and meet the same id written as an int or a string as its duplicate."""
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [decimal.Decimal(7), decimal.Decimal(12345678901234567890123456789), decimal.Decimal("-0")]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(ids, pa.decimal128(38, 0)), "content": ["a", "b", "c"]}), buffer)
    assert [item.id for item in _read(_plan("parquet"), buffer.getvalue())] == [
        "7",
        "12345678901234567890123456789",
        "0",
    ]
    # BigQuery writes NUMERIC as decimal(38,9): its integral values are the integers (every record was
    # bad_id, exit 4, "Check --id_field"); a fraction is no id, as a float is not.
    buffer = io.BytesIO()
    values = [decimal.Decimal("7.000000000"), decimal.Decimal("-12"), decimal.Decimal("7.5")]
    pq.write_table(
        pa.table({"id": pa.array(values, pa.decimal128(38, 9)), "content": ["a", "b", "c"]}), buffer
    )
    items = _read(_plan("parquet"), buffer.getvalue())
    assert [item.id for item in items[:2]] == ["7", "-12"]
    assert items[2]["reason"] == "bad_id" and "the decimal 7.500000000 (a fraction)" in items[2]["message"]


def test_a_float_id_says_how_pandas_made_it_and_how_to_write_integers():
    """pandas stores integer ids holding a null as float64: every record was bad_id 'found float.', and
    the run's exit 4 said to check --id_field, which was right."""
    import pandas as pd

    buffer = io.BytesIO()
    pd.DataFrame({"id": [1, 2, None], "content": ["a", "b", "c"]}).to_parquet(buffer)
    items = _read(_plan("parquet"), buffer.getvalue())
    assert [item["reason"] for item in items] == ["bad_id", "bad_id", "missing_id"]
    assert "found the float 1.0" in items[0]["message"] and "astype('Int64')" in items[0]["message"]


@pytest.mark.parametrize("dictionary", [False, True], ids=["plain", "dictionary"])
def test_a_parquet_value_python_cannot_read_fails_its_row_only(dictionary):
    """One non-UTF-8 string (a writer that did not check) or out-of-range date lost the whole file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"good one", b"bad \xff text", b"also good", b"last"], pa.binary())
    table = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            # A UTF8 column holding a Latin-1 byte, as pyarrow never writes but other writers do.
            "content": pa.Array.from_buffers(pa.string(), len(raw), raw.buffers()),
            "published": pa.array([0, 0, 0, 2**62], pa.date64()),
        }
    )
    buffer = io.BytesIO()
    # Without pyarrow's own schema in the file, as Spark and parquet-mr write it (dictionary pages: default).
    pq.write_table(table, buffer, use_dictionary=dictionary, store_schema=False)
    plan = _plan("parquet")
    plan.keep_fields = ("published",)
    items = _read(plan, buffer.getvalue())
    expected = [(1, ("good one",)), (2, "invalid_utf8"), (3, ("also good",)), (4, "parse_failed")]
    assert _summary(items) == expected
    assert "'content'" in items[1]["message"] and "'published'" in items[3]["message"]


def test_a_json_object_naming_a_read_field_twice_is_a_dead_letter_not_its_last_value():
    """`{"id": "a", ..., "id": "b"}` was silently the row "b": json.loads keeps the last of a name."""
    data = (
        b'{"id": "a", "content": "first", "id": "b"}\n'
        b'{"id": "c", "content": "x", "content": "y"}\n'
        # The same name in a nested object, or an unread field repeated, is no ambiguity.
        b'{"id": "d", "content": "say \\"id\\"", "meta": {"id": 1}, "other": 1, "other": 2}\n'
    )
    items = _read(_plan("jsonl"), data)
    assert _summary(items) == [(1, "malformed_json"), (2, "malformed_json"), (3, ('say "id"',))]
    assert "names 'id' more than once" in items[0]["message"]
    assert "names 'content' more than once" in items[1]["message"]


def test_a_read_field_repeated_in_another_spelling_is_a_dead_letter_too():
    """`"\\u0069d"` is `"id"` to every JSON parser: the check searched the line for two spellings
    of each name, so an escaped repeat was silently read with its last value."""
    data = (
        b'{"id": "a", "content": "first", "\\u0069d": "b"}\n'
        b'{"\\u0069\\u0064": "c", "id": "d", "content": "x"}\n'
        b'{"id": "f", "content": "x", "meta": {"source": "web"}, "\\u0069d": "g"}\n'
        # An escaped name that is no repeat, and escapes in values, are no ambiguity.
        b'{"\\u0069d": "e", "content": "caf\\u00e9 \\u003c\\"id\\": 1\\u003e"}\n'
    )
    items = _read(_plan("jsonl"), data)
    assert _summary(items) == [
        (1, "malformed_json"),
        (2, "malformed_json"),
        (3, "malformed_json"),
        (4, ('café <"id": 1>',)),
    ]
    assert "names 'id' more than once" in items[1]["message"]


def test_blank_csv_lines_are_empty_records_and_none_is_taken_for_the_header():
    """A blank line was "wrong_field_count: Row has 0 fields"; one before the header made the header
    empty, so every row of the file was a dead letter ("the header has 0")."""
    data = b"\r\n \r\nid,content\r\na,hello\r\n\r\n  \r\nb,world\r\n,\r\n\r\n"
    items = _read(_plan("csv"), data)
    assert _summary(items) == [
        (1, ("hello",)),
        (2, "empty_record"),
        (3, "empty_record"),
        (4, ("world",)),
        (5, "missing_id"),  # Two empty fields: a row, not a blank line.
        (6, "empty_record"),
    ]
    assert items[1]["message"] == "Blank line where a CSV row was expected."


def test_a_csv_header_repeated_by_joined_files_is_a_dead_letter_not_a_row():
    """`cat a.csv b.csv`: b's header was a row, id "id" and text "content", a document no file holds."""
    data = b"id,content\r\na,one\r\n" + text_lines.BOM + b"id,content\r\nb,two\r\ncontent,id\r\n"
    items = _read(_plan("csv"), data)
    assert _summary(items) == [(1, ("one",)), (2, "repeated_header"), (3, ("two",)), (4, "repeated_header")]
    assert "cat a.csv b.csv" in items[1]["message"]
    # A row that holds a column's name as a value, but not the header again, is a row.
    assert _summary(_read(_plan("csv"), b"id,content\r\nid,one\r\n")) == [(1, ("one",))]


def test_the_rows_after_a_header_repeated_in_another_order_are_read_by_it():
    """`cat a.csv b.csv` of the same columns in another order: b's rows were read by a's header, each id
    taken from the text column and each text from the id column, exit 0."""
    data = b"id,content,title\r\na,one,t\r\n" + b"content,title,id\r\ntwo,u,b\r\n"
    items = _read(_plan("csv"), data)
    assert [(item.id, item.texts) for item in items if isinstance(item, Document)] == [
        ("a", ("one",)),
        ("b", ("two",)),
    ]
    assert items[1]["reason"] == "repeated_header" and "read by its order" in items[1]["message"]


@pytest.mark.parametrize(
    "second",
    ["ID,Content\r\nb,two\r\n", "id, content\r\nb,two\r\n", "title,content,id\r\nt,two,b\r\n"],
    ids=["case", "spaces", "other_columns"],
)
def test_the_header_of_a_joined_file_spelt_otherwise_or_with_other_columns_is_no_row(second):
    """`cat a.csv b.csv` where b's header is 'ID,Content' or 'id, content': it was exported as a row of id
    'ID', a document no file holds; with a column more, b's header and every row of b were
    wrong_field_count. Its rows are now read by it; a record whose id is the id column's name stays one."""
    items = _read(_plan("csv"), ("id,content\r\na,one\r\n" + second).encode())
    assert _summary(items) == [(1, ("one",)), (2, "repeated_header"), (3, ("two",))]
    assert items[2].id == "b" and "cat a.csv b.csv" in items[1]["message"]
    assert _summary(_read(_plan("csv"), b"id,content\r\nID,one\r\n")) == [(1, ("one",))]


def test_a_csv_row_holding_the_field_names_as_values_is_a_row_not_a_header():
    """Under 'id,f1,content' the record 'b,id,content' was taken for a joined file's header with other
    columns: a repeated_header, and every later row read by it ('c,y,two' got the id 'y'), exit 0. A joined
    header of as many other columns has a column's name in the id's column ('content,id,kind'): still one."""
    data = b"id,f1,content\r\na,x,one\r\nb,id,content\r\nc,y,two\r\n"
    items = _read(_plan("csv"), data)
    assert [(item.id, item.texts) for item in items] == [
        ("a", ("one",)),
        ("b", ("content",)),
        ("c", ("two",)),
    ]
    items = _read(_plan("csv"), b"id,content,topic\r\na,one,t\r\ncontent,id,kind\r\ntwo,b,k\r\n")
    assert _summary(items) == [(1, ("one",)), (2, "repeated_header"), (3, ("two",))] and items[2].id == "b"


def test_a_byte_order_mark_starting_a_later_csv_record_is_dropped():
    """Joined files saved with a mark: the next file's first id was "\\ufeffb1", which no later record
    of b1 matched as its duplicate."""
    data = text_lines.BOM + b"id,content\r\na1,one\r\n" + text_lines.BOM + b'b1,two\r\n\xef\xbb\xbf"b2",x\r\n'
    assert [item.id for item in _read(_plan("csv"), data)] == ["a1", "b1", "b2"]
    # Nor does it take room of --max_record_bytes: a record of exactly the limit after it is read whole.
    row = b"b1," + b"x" * 40
    for ending in (b"\r\n", b"\n"):
        data = b"id,content" + ending + text_lines.BOM + row + ending + b"c,y" + ending
        assert _summary(_read(_plan("csv", limit=len(row)), data)) == [(1, ("x" * 40,)), (2, ("y",))]


@pytest.mark.parametrize("separator", [";", "\t", "|"])
def test_a_csv_file_separated_otherwise_says_so_in_each_dead_letter(separator):
    """Excel's ";" (or a TSV) made every row "Field 'id' is missing or null": the header starts with it."""
    data = f"id{separator}content\na{separator}hello\n".encode()
    (item,) = _read(_plan("csv"), data)
    assert item["reason"] == "missing_id" and "the reader takes comma-separated values" in item["message"]
    assert "csvformat" in item["message"]
    # A one-column header that splits into no field the export reads is just a missing id.
    (item,) = _read(_plan("csv"), b"name;title\na;hello\n")
    assert item["message"] == "Field 'id' is missing or null."


def test_a_missing_field_names_the_column_that_differs_only_in_case_or_spaces():
    """`id, content` (a space after the comma) or `ID,Content` made every row "Field ... is missing or null",
    with the column plainly in the header."""
    (item,) = _read(_plan("csv"), b"id, content\na, hello\n")
    assert item["reason"] == "missing_field"
    assert "'content' is no column, but ' content' is: rename the column" in item["message"]
    (item,) = _read(_plan("csv"), b"ID,content\na,hello\n")
    assert item["reason"] == "missing_id" and "'id' is no column, but 'ID' is" in item["message"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"Id": ["a"], "content": ["x"]}), buffer)
    (item,) = _read(_plan("parquet"), buffer.getvalue())
    assert item["reason"] == "missing_id" and "'id' is no column, but 'Id' is" in item["message"]
    (item,) = _read(_plan("csv"), b"name,content\na,hello\n")  # Plainly missing: nothing to add.
    assert item["message"] == "Field 'id' is missing or null."


def test_an_oversized_csv_record_is_skipped_by_its_quotes():
    inside = "".join(f'{n},looks like a row,""q""\r\n' for n in range(20))
    data = f'id,content\r\nbig,"{inside}"\r\nnext,word\r\n'.encode()
    assert _summary(_read(_plan("csv", limit=100), data)) == [(1, "too_large"), (2, ("word",))]
    # Under the limit the same record is one row, its newlines kept.
    (big, following) = _read(_plan("csv", limit=10_000), data)
    assert big.texts == (inside.replace('""', '"'),) and following.id == "next"


def test_a_csv_record_one_past_the_limit_is_one_dead_letter_at_every_line_ending():
    """The read of limit + 2 characters ends between its "\r" and "\n": the "\n" is no record."""
    for ending in ("\r\n", "\r", "\n"):
        big = "1," + "w" * 49  # 51 bytes: one past the limit
        data = ending.join(["id,content", big, "2,two words", "3,three", ""]).encode()
        items = _read(_plan("csv", limit=50), data)
        assert _summary(items) == [(1, "too_large"), (2, ("two words",)), (3, ("three",))], repr(ending)
        assert items[0]["message"] == "Record of 51 bytes exceeds --max_record_bytes=50.", repr(ending)
    # Longer records, cut anywhere while they are skipped, and a quoted one over several lines.
    for length in range(50, 60):
        for ending in ("\r\n", "\r"):
            big = '1,"' + "w" * length + ending + "w" * length + '"'
            data = ending.join(["id,content", big, "2,two words", ""]).encode()
            assert _summary(_read(_plan("csv", limit=50), data)) == [(1, "too_large"), (2, ("two words",))]


def test_a_quote_never_closed_sets_aside_its_row_only_and_every_line_is_accounted_for():
    lines = [f"r{n},word{n}\r\n" for n in range(1, 8)]
    lines[2] = 'r3,"word3 opens a quote\r\n'
    items = _read(_plan("csv"), ("id,content\r\n" + "".join(lines)).encode())
    assert _summary(items) == [
        (1, ("word1",)),
        (2, ("word2",)),
        (3, "malformed_csv"),
        *[(n, (f"word{n}",)) for n in range(4, 8)],
    ]
    assert items[2]["raw"] == lines[2]
    assert "never closed" in items[2]["message"] and "4 later line(s) are read again" in items[2]["message"]
    # Two stray quotes: the second would close the first and glue two lines into one row.
    data = b'id,content\r\na,"x\r\nb,"y\r\nc,z'
    assert _summary(_read(_plan("csv"), data)) == [(1, "malformed_csv"), (2, "malformed_csv"), (3, ("z",))]
    # Text after a closing quote, on one line: that row alone.
    data = b'id,content\r\na,"x"y\r\nb,z\r\n'
    assert _summary(_read(_plan("csv"), data)) == [(1, "malformed_csv"), (2, ("z",))]


def test_a_quote_never_closed_in_a_record_over_the_limit_breaks_the_file():
    """The skipped bytes were not kept, so they cannot be read again: a read_error, exit 5."""
    data = ('id,content\r\na,word\r\nb,"' + "word " * 50 + "\r\nc,word\r\n" * 5).encode()
    items = _read(_plan("csv", limit=100), data)
    assert _summary(items) == [(1, ("word",)), (2, "read_error")]
    assert "UnclosedQuote" in items[-1]["message"]


def test_a_header_whose_quote_never_closes_is_an_unreadable_file():
    items = _read(_plan("csv"), b'id,"content\r\na,word\r\n')
    assert _summary(items) == [(None, "unreadable_file")]


class _BreaksAfter(io.BytesIO):
    """A stream whose reads fail once `good` bytes were read, as a failing disk or network does."""

    def __init__(self, data, good):
        super().__init__(data)
        self._good = good

    def readline(self, size=-1):
        if self.tell() >= self._good:
            raise OSError("connection reset")
        return super().readline(size)


def test_a_stream_that_breaks_keeps_the_records_before_and_names_the_break():
    data = b"".join(b'{"id": "%d", "content": "w"}\n' % n for n in range(1, 5))
    items = list(corpus.read_file(_plan("jsonl"), "c.jsonl", lambda: _BreaksAfter(data, len(data) // 2)))
    assert _summary(items) == [(1, ("w",)), (2, ("w",)), (3, "read_error")]
    assert items[-1]["message"].startswith("Reading stopped after record 2: OSError: connection reset")


def test_a_file_that_cannot_be_opened_or_decompressed_is_one_unreadable_file():
    def refuse():
        raise PermissionError("denied")

    (item,) = corpus.read_file(_plan("jsonl"), "c.jsonl", refuse)
    assert (item["position"], item["reason"], item["message"]) == (
        None,
        "unreadable_file",
        "PermissionError: denied",
    )
    (item,) = _read(_plan("jsonl"), b'{"id": "a"}\n', path="c.jsonl.gz")
    assert item["reason"] == "unreadable_file" and "Not a gzipped file" in item["message"]


@pytest.mark.parametrize("input_format", ["jsonl", "csv", "text"])
def test_an_empty_gz_file_is_unreadable_not_an_empty_corpus(input_format):
    """A 0-byte .gz (a writer killed before its first flush) read as no records: no word of a lost file."""
    (item,) = _read(_plan(input_format), b"", path=f"part-0.{input_format}.gz")
    assert item["reason"] == "unreadable_file" and "empty, which is no gzip data" in item["message"]
    # An empty file compressed is gzip data of no records; an empty plain file holds none either.
    assert _read(_plan(input_format), gzip.compress(b""), path=f"part-0.{input_format}.gz") == []
    assert _read(_plan(input_format), b"", path=f"part-0.{input_format}") == []


@pytest.mark.parametrize("compression", ["gzip", "bz2", "lzma"])
@pytest.mark.parametrize("input_format", ["jsonl", "text", "csv"])
def test_compressed_data_in_a_file_not_named_so_is_unreadable_not_lines_of_garbage(compression, input_format):
    """A gzip file saved as .jsonl (a download kept its Content-Encoding) was read as text: a few
    invalid_utf8 dead letters for hundreds of records, garbage documents from bz2, and often exit 0."""
    import importlib

    lines = [b"id,content"] if input_format == "csv" else []
    lines += [b'{"id": "r%d", "content": "alpha beta gamma %d"}' % (n, n) for n in range(300)]
    data = importlib.import_module(compression).compress(b"\n".join(lines) + b"\n")
    (item,) = _read(_plan(input_format), data, path=f"c.{input_format}")
    name = {"gzip": "gzip", "bz2": "bzip2", "lzma": "xz"}[compression]
    assert item["reason"] == "unreadable_file" and f"the file is {name} data" in item["message"]
    if input_format != "csv":  # A range of a split file past its start tells it by the file's first bytes.
        ((_, ranged),) = corpus.read_records(_plan(input_format), "c", lambda: io.BytesIO(data), 100)
        assert ranged["reason"] == "read_error" and f"the file is {name} data" in ranged["message"]


@pytest.mark.parametrize("inner", ["gzip", "bz2", "lzma", "parquet"])
@pytest.mark.parametrize("input_format", ["jsonl", "text", "csv"])
def test_data_compressed_again_inside_a_gz_is_unreadable_not_lines_of_garbage(inner, input_format):
    """A .gz download that kept its Content-Encoding is gzip twice: read as lines of the inner gzip data,
    hundreds of invalid_utf8 dead letters and, from text, rows of garbage; bzip2 or Parquet alike."""
    import importlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [b"id,content"] if input_format == "csv" else []
    lines += [b'{"id": "r%d", "content": "alpha beta gamma %d"}' % (n, n) for n in range(300)]
    if inner == "parquet":
        buffer = io.BytesIO()
        pq.write_table(pa.table({"id": [f"r{n}" for n in range(300)], "content": ["alpha"] * 300}), buffer)
        data = buffer.getvalue()
    else:
        data = importlib.import_module(inner).compress(b"\n".join(lines) + b"\n")
    (item,) = _read(_plan(input_format), gzip.compress(data), path=f"c.{input_format}.gz")
    assert item["reason"] == "unreadable_file" and "once gunzipped, is" in item["message"]


@pytest.mark.parametrize("magic", [b"\x1f\x9d\x90", b"LZIP\x01"], ids=["compress", "lzip"])
def test_unix_compress_and_lzip_data_not_named_so_are_unreadable(magic):
    """Told by neither name nor magic: a .Z file renamed .txt was lines of garbage."""
    (item,) = _read(_plan("text", field="text"), magic + b"\x00\x01garbage\nmore\n", path="c.txt")
    assert item["reason"] == "unreadable_file" and "data, though its name does not say so" in item["message"]
    (item,) = _read(_plan("text", field="text"), b"plain text\n", path="c.txt.Z")
    assert item["reason"] == "unreadable_file" and "compressed in a format" in item["message"]


@pytest.mark.parametrize("input_format", ["jsonl", "text", "csv"])
def test_a_parquet_file_read_as_lines_is_unreadable_not_garbage(input_format):
    """A Parquet file among `--input 'data/*' --input_format jsonl` made garbage dead letters (and
    garbage documents from text, 98 missing_id rows from CSV), its records never read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": [f"r{n}" for n in range(300)], "content": ["alpha beta"] * 300}), buffer)
    data = buffer.getvalue()
    (item,) = _read(_plan(input_format), data, path="c.jsonl")
    assert item["reason"] == "unreadable_file" and "--input_format parquet" in item["message"]
    if input_format != "csv":
        ((_, ranged),) = corpus.read_records(_plan(input_format), "c", lambda: io.BytesIO(data), 100)
        assert ranged["reason"] == "read_error" and "--input_format parquet" in ranged["message"]
    # Text that merely starts with the magic is text.
    assert _summary(_read(_plan("text", field="text"), b"PAR1 is a name\n")) == [(1, ("PAR1 is a name",))]


def test_gzip_is_read_by_extension():
    data = gzip.compress(b'{"id": "a", "content": "word"}\n')
    assert _summary(_read(_plan("jsonl"), data, path="c.JSONL.GZ")) == [(1, ("word",))]


def test_any_failure_while_parsing_a_record_ends_that_record_only(monkeypatch):
    original = text_lines.to_document

    def fails_on_b(plan, source, number, record, raw=None):
        if record["id"] == "b":
            raise KeyError("surprise")
        return original(plan, source, number, record, raw)

    monkeypatch.setattr(text_lines, "to_document", fails_on_b)
    lines = b"".join(b'{"id": "%s", "content": "w"}\n' % name for name in (b"a", b"b", b"c"))
    items = _read(_plan("jsonl"), lines)
    assert _summary(items) == [(1, ("w",)), (2, "parse_failed"), (3, ("w",))]
    assert items[1]["message"] == "KeyError: 'surprise'"


def test_a_csv_header_over_the_limit_makes_the_file_unreadable_and_says_so():
    header = "id,content," + ",".join(f"column{n}" for n in range(20))
    (item,) = _read(_plan("csv", limit=50), f"{header}\r\na,word\r\n".encode())
    assert item["reason"] == "unreadable_file"
    assert "the header is over --max_record_bytes=50 bytes" in item["message"], item["message"]


def test_a_json_array_file_says_it_is_not_json_lines():
    items = _read(_plan("jsonl"), b'[\n  {"id": "a", "content": "word"},\n  {"id": "b", "content": "x"}\n]\n')
    assert items[0]["reason"] == "malformed_json" and "jq -c '.[]'" in items[0]["message"]
    assert "JSON array" not in items[1]["message"]


def test_a_json_array_on_one_line_says_it_is_not_json_lines_whatever_its_size():
    """json.dump(list, file) writes one line: "found list" with no hint, or over the bound "too_large"
    (whose advice, raise --max_record_bytes, then only gave "found list")."""
    line = json.dumps([{"id": f"a{n}", "content": "word " * 5} for n in range(3)]).encode()
    for limit, reason in ((1000, "not_an_object"), (len(line) - 1, "too_large")):
        (item,) = _read(_plan("jsonl", limit=limit), text_lines.BOM + line)
        assert item["reason"] == reason and "jq -c '.[]' FILE > FILE.jsonl" in item["message"]
    # A later line that is a list is no sign of an array file; neither is a text file's long line.
    items = _read(_plan("jsonl"), b'{"id": "a", "content": "w"}\n' + line + b"\n")
    assert items[1]["reason"] == "not_an_object" and "jq" not in items[1]["message"]
    (item,) = _read(_plan("text", limit=10, field="text"), line)
    assert item["reason"] == "too_large" and "jq" not in item["message"]


def test_a_text_file_with_carriage_returns_alone_is_not_one_document():
    """Old Mac line endings: 10 documents were embedded as one, succeeded."""
    data = "\r".join(f"document number {n}" for n in range(10)).encode() + b"\r"
    (item,) = _read(_plan("text", field="text"), data)
    # How many documents the file holds is unknown: it is broken as a whole (exit 5).
    assert item["reason"] == "unreadable_file" and "tr '\\r' '\\n'" in item["message"]
    assert item["position"] is None
    # CRLF line endings stay what they are, and so does a stray \r inside a line (pasted console output).
    assert _summary(_read(_plan("text", field="text"), b"one\r\ntwo\r\n")) == [(1, ("one",)), (2, ("two",))]
    items = _read(_plan("text", field="text"), b"50%\r100% done\nnext\n")
    assert _summary(items) == [(1, ("50%\r100% done",)), (2, ("next",))]


@pytest.mark.parametrize("final", [b"", b"\n", b"\r\n"], ids=["no_newline", "newline", "crlf"])
def test_carriage_return_line_ends_are_refused_with_or_without_a_final_newline(final):
    """With one final newline, 3 documents ended by \r alone were read as 1 (and 6 JSONL records as 1)."""
    text = _plan("text", field="text")
    for lines in (["first", "second", "third"], ["first", "second"]):
        (item,) = _read(text, "\r".join(lines).encode() + final)
        assert (item["position"], item["reason"]) == (None, "unreadable_file"), lines
        assert "carriage return (\\r) alone" in item["message"]
    records = [b'{"id": "%d", "content": "word"}' % n for n in range(6)]
    (item,) = _read(_plan("jsonl"), b"\r".join(records) + final)
    assert (item["position"], item["reason"]) == (None, "unreadable_file")
    # Records holding \r as JSON whitespace, split by \r too.
    spaced = [b'{"id": "%d",\r"content": "word"}' % n for n in range(3)]
    (item,) = _read(_plan("jsonl"), b"\r".join(spaced) + final)
    assert (item["position"], item["reason"]) == (None, "unreadable_file")
    # Amid lines ended by newlines, such a line is a read_error there, and reading goes on.
    data = b"one\ntwo\rthree\rfour\nfive" + final
    assert _summary(_read(text, data)) == [(1, ("one",)), (2, "read_error"), (3, ("five",))]
    data = records[0] + b"\n" + b"\r".join(records[1:4]) + b"\n" + records[4] + final
    assert _summary(_read(_plan("jsonl"), data)) == [(1, ("word",)), (2, "read_error"), (3, ("word",))]


@pytest.mark.parametrize("final", [b"", b"\n"], ids=["no_newline", "newline"])
def test_a_stray_carriage_return_is_text_on_every_line_the_last_included(final):
    """A stray \r in the last line, without a newline after it, was a read_error ("reading broke off")."""
    data = b"first\r line\nsecond\nlast\r line" + final
    expected = [(1, ("first\r line",)), (2, ("second",)), (3, ("last\r line",))]
    assert _summary(_read(_plan("text", field="text"), data)) == expected
    # In JSONL a \r between tokens is whitespace, on every line.
    data = b'{"id": "a",\r"content": "w"}\n{"id": "b",\r"content": "v"}' + final
    assert _summary(_read(_plan("jsonl"), data)) == [(1, ("w",)), (2, ("v",))]
    # A raw \r inside a JSON string is that line's malformed_json, not records split by \r.
    data = b'{"id": "a", "content": "x\r[y"}\n{"id": "b", "content": "v"}' + final
    assert _summary(_read(_plan("jsonl"), data)) == [(1, "malformed_json"), (2, ("v",))]
    # ... and a \r before a nested object in a line that parses is whitespace (no record boundary).
    data = b'{"id": "a", "content": "w", "meta":\r{"k": 1}}' + final
    assert _summary(_read(_plan("jsonl"), data)) == [(1, ("w",))]


def test_the_only_line_of_a_gzip_file_is_judged_as_the_plain_files():
    """Whether a first line is the file's only one is asked of the (gzip) stream without losing a byte."""
    text = _plan("text", field="text")
    (item,) = _read(text, gzip.compress(b"first\rsecond\n"), path="c.txt.gz")
    assert item["reason"] == "unreadable_file"
    assert _summary(_read(text, gzip.compress(b"a\rb\nnext\n"), path="c.txt.gz")) == [
        (1, ("a\rb",)),
        (2, ("next",)),
    ]


def test_parquet_record_sizes_count_lists_of_strings_and_of_ids():
    """A list<string> column (kept tags) made every row an unreadable_file: string types have no width."""
    import pyarrow as pa

    from pipeline.reading.parquet_rows import record_sizes

    batch = pa.record_batch(
        {
            "tags": pa.array([["ab", "cde"], [], None, ["x"]]),
            "ids": pa.array([[1, 2], [3], [], None], pa.list_(pa.int32())),
            "text": pa.array(["four", None, "", "é"]),
        }
    )
    assert record_sizes(batch).tolist() == [5 + 8 + 4, 0 + 4 + 0, 0 + 0 + 0, 1 + 0 + 2]


def test_parquet_record_sizes_count_view_fixed_size_and_struct_columns():
    """A string_view column counted 8 bytes a row: a 20 kB record passed --max_record_bytes 1000."""
    import pyarrow as pa

    from pipeline.reading.parquet_rows import record_sizes

    batch = pa.record_batch(
        {
            "text": pa.array(["four", None, "é"], pa.string_view()),
            "blob": pa.array([b"ab", b"", None], pa.binary_view()),
            "ids": pa.array([[1, 2], [3, 4], None], pa.list_(pa.int32(), 2)),
            "views": pa.array([["abc"], [], None], pa.list_view(pa.string())),
            "meta": pa.array([{"note": "xyz"}, {"note": None}, None], pa.struct([("note", pa.string())])),
        }
    )
    assert record_sizes(batch).tolist() == [4 + 2 + 8 + 3 + 3, 0 + 0 + 8 + 0 + 0, 2 + 0 + 0 + 0 + 0]
    # A slice counts its own rows only.
    assert record_sizes(batch.slice(1)).tolist() == [8, 2]


@pytest.mark.parametrize("input_format", ["jsonl", "text"])
def test_every_range_of_a_tar_archive_not_named_so_is_refused(input_format):
    """A large tar of JSONL named .jsonl is read in ranges: the first was an unreadable_file, the later
    ones read its member's lines as records, so half the archive was exported as rows."""
    import tarfile

    lines = b"".join(b'{"id": "r%d", "content": "alpha beta"}\n' % n for n in range(2000))
    member = tarfile.TarInfo("part.jsonl")
    member.size = len(lines)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.addfile(member, io.BytesIO(lines))
    data = buffer.getvalue()
    (item,) = _read(_plan(input_format), data, path="c.jsonl")
    assert item["reason"] == "unreadable_file" and "tar archive" in item["message"]
    ((_, ranged),) = corpus.read_records(
        _plan(input_format), "c.jsonl", lambda: io.BytesIO(data), len(data) // 2
    )
    assert ranged["reason"] == "read_error" and "tar archive" in ranged["message"]


def test_text_holding_ustar_where_a_tar_header_would_is_read_as_text():
    """Only a tar header's magic with its NULs marks an archive, not "mustard" at byte 257."""
    line = b"x" * 256 + b"mustard and more\n"
    assert _summary(_read(_plan("text", limit=10_000, field="text"), line)) == [(1, (line[:-1].decode(),))]


def test_jsonl_with_carriage_returns_alone_is_one_broken_file_also_over_the_limit():
    """It was one malformed_json (or too_large) standing for all its records, and exit 0."""
    records = [b'{"id": "%d", "content": "word"}' % n for n in range(50)]
    data = b"\r".join(records) + b"\r"
    for limit in (10_000, 100):  # the whole file over --max_record_bytes: still the line endings' fault
        (item,) = _read(_plan("jsonl", limit=limit), data)
        assert item["reason"] == "unreadable_file" and "carriage return" in item["message"]
    # A \r inside a JSONL line that ends with a newline is whitespace in JSON, and read.
    assert _summary(_read(_plan("jsonl"), b'{"id": "a",\r"content": "w"}\n')) == [(1, ("w",))]
