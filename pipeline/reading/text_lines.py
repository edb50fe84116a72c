"""Reads text and JSONL corpora: one record per line, each at its line number, ordered by byte offset.

A range that starts past the beginning of a file finds its first line (and
that line's number, through the line index) with `_align`; lines over
--max_record_bytes are skipped, never held in memory.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import threading
import typing
import unicodedata
from collections.abc import Callable, Iterator

from pipeline.reading.documents import (
    Document,
    Record,
    fields_to_document,
    guarded,
    read_fields,
    to_document,
    too_large,
)
from pipeline.writing import schema as schema_lib
from pipeline.writing.schema import (
    EMPTY_RECORD,
    INVALID_UTF8,
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    READ_ERROR,
    UNREADABLE_FILE,
)

if typing.TYPE_CHECKING:
    from pipeline.planning.plan import ExportPlan

BOM = b"\xef\xbb\xbf"
# Lines too long to keep are skipped in reads of this many bytes.
SKIP_CHUNK = 1 << 20

# What the record readers read: the file's bytes, or a .gz file's decompressed bytes.
ByteStream = typing.BinaryIO | gzip.GzipFile
# `claim(offset)`: whether the record starting at `offset` belongs to the range being read.
Claim = Callable[[int], bool]
# `offset -> (block start, newlines before it)`: the line index of a file (see `read_records`).
LinesBefore = Callable[[int], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class LineRange:
    """Which lines of a file to read, and what to report of them (see `corpus.read_records`)."""

    # The byte offset where the range starts: its first line is the first starting at or after it.
    start: int = 0
    # Called with the offset of each line before it is read; False stops reading.
    claim: Claim | None = None
    # Numbers the lines of a range that starts past 0; without it its first line is 1.
    lines_before: LinesBefore | None = None
    # Called with the offset of the newline ending each line read.
    on_newline: Callable[[int], None] | None = None
    # The size the launch listed: data that ends before it raises `InputShorter`.
    listed_size: int | None = None


# UTF-32 and UTF-16 byte-order marks, longest first (UTF-32 LE's starts like UTF-16 LE's), and
# each one's iconv name: what Windows tools write as "Unicode". Read as UTF-8, every line but the
# first would be text with NULs between the letters.
WIDE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32LE"),
    (b"\x00\x00\xfe\xff", "UTF-32BE"),
    (b"\xff\xfe", "UTF-16LE"),
    (b"\xfe\xff", "UTF-16BE"),
)


class NotUtf8(Exception):
    """A text or JSONL file in UTF-16 or UTF-32 (its byte-order mark says so): the readers take UTF-8."""


def _goes_on_as_utf32le(head: bytes) -> bool:
    """Whether `head`, starting FF FE 00 00, goes on as UTF-32LE: its next 4 bytes a code point (at most
    U+10FFFF), not UTF-16LE after a first character U+0000 (FF FE, then 00 00), as `68 00 65 00` is."""
    unit = head[4:8]
    return len(unit) < 4 or (unit[3] == 0 and unit[2] <= 0x10)


# C0 control bytes but the whitespace ones (tab, newline, vertical tab, form feed, carriage return). UTF-8
# text holds none but by accident, where UTF-16 has one in most characters of many scripts: NUL in ASCII and
# Latin-1 ones, 0x04 in Cyrillic, 0x05 in Hebrew, 0x06 in Arabic.
CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x20)])


def control_bytes(data: bytes) -> int:
    """How many `CONTROL_BYTES` `data` holds."""
    return len(data) - len(data.translate(None, CONTROL_BYTES))


def wide_encoding(data: bytes) -> str | None:
    """The UTF-16/32 encoding (iconv's name) the control bytes of `data` (at least 4 bytes) show, else None.

    UTF-8 text holds no control byte but tab, newline and the like, where UTF-16 puts one in each
    character of ASCII, Latin-1 (NUL), Cyrillic (0x04), Hebrew, Arabic..., and UTF-32 two or three NULs
    in each. So at least half the characters with their control byte on one side and few on the other
    is UTF-16, whatever the other characters are (a curly quote, a bullet or CJK first): a UTF-8 text
    with a stray NUL, or control bytes at random places, is none.
    """
    if len(data) < 4:
        return None
    whole = data[: len(data) // 4 * 4]
    units = len(whole) // 4
    zero = [whole[place::4].count(0) for place in range(4)]
    if zero[3] == units and zero[2] * 4 >= units * 3 and zero[0] < units:
        return "UTF-32LE"  # Each code point's top byte is 0, the next one too but beyond U+FFFF.
    if zero[0] == units and zero[1] * 4 >= units * 3 and zero[3] < units:
        return "UTF-32BE"
    if b"\n" in data and b"\x00" not in data:
        # UTF-16's newline is 0A 00 (00 0A): a line ended by a newline without that NUL is none, however
        # short (a colour reset ESC [ 0 m, Hive's Ctrl-A between one-letter fields: half control bytes).
        return None
    pairs = len(data) // 2
    even, odd = control_bytes(data[: pairs * 2 : 2]), control_bytes(data[1 : pairs * 2 : 2])
    if odd * 2 >= pairs and even * 4 <= odd:
        return "UTF-16LE"
    if even * 2 >= pairs and odd * 4 <= even:
        return "UTF-16BE"
    return None


# Every C0 control byte, whitespace ones included: UTF-16's high byte in Devanagari and Bengali is 0x09 (tab),
# in Gurmukhi and Gujarati 0x0A, Oriya and Tamil 0x0B, Telugu and Kannada 0x0C, Malayalam and Sinhala 0x0D.
C0_BYTES = bytes(range(0x20))
# A character no text holds: NUL, and the C0 controls but tab, newline, vertical tab, form feed and return.
_NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1f]")
# Each UTF-16 encoding: iconv's name, its newline (a code unit: at an even offset) and Python's codec.
UTF16_NEWLINES = (("UTF-16LE", b"\n\x00", "utf-16-le"), ("UTF-16BE", b"\x00\n", "utf-16-be"))


def utf16_text(data: bytes, codec: str) -> bool:
    """Whether `data` decodes as `codec` (utf-16-le or -be) to text: some characters, every one assigned
    (by Python's Unicode database), none NUL or a control but whitespace, no surrogate left alone.

    UTF-8 text of two or more characters seldom does: with no NUL in it, each 2 bytes of ASCII or a
    multi-byte character make a code unit, and across a line some pair lands on an unassigned code point,
    a lone surrogate or a control; none where an odd NUL sits (`unmarked_utf16` and `utf16_line` ask more).
    """
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        return False
    return bool(text) and not _NOT_TEXT.search(text) and all(unicodedata.category(c) != "Cn" for c in text)


def _even_find(data: bytes, unit: bytes) -> int:
    """The first even offset of `data` where `unit` (a UTF-16 code unit) is, else -1."""
    place = data.find(unit)
    while place >= 0 and place % 2:
        place = data.find(unit, place + 1)
    return place


def _whole_units(data: bytes, codec: str) -> bytes:
    """`data` (of even length) without a last high surrogate, whose low one the end of the read cut."""
    if len(data) >= 2 and 0xD8 <= data[-1 if codec == "utf-16-le" else -2] <= 0xDB:
        return data[:-2]
    return data


def _wide_units(data: bytes, codec: str) -> bool:
    """Whether the high bytes of `data` read as `codec` are C0 control bytes (whitespace ones included) in a
    quarter of its code units or more, a NUL among them: ASCII, spaces and digits between CJK, or
    Devanagari's 0x09. A stray NUL in UTF-8 text is one high byte of many."""
    high = data[1::2] if codec == "utf-16-le" else data[0::2]
    controls = len(high) - len(high.translate(None, C0_BYTES))
    return b"\x00" in high and controls * 4 >= len(high)


def _clean_utf8(data: bytes) -> bool:
    """Whether `data` is UTF-8 text without a control byte (but whitespace ones)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not control_bytes(data)


# CJK text's code points: Hangul Jamo, CJK radicals, CJK symbols and punctuation, kana, Bopomofo, Hangul
# compatibility Jamo, CJK Extension A and unified ideographs, Hangul syllables, compatibility ideographs,
# fullwidth forms.
CJK_RANGES = (
    (0x1100, 0x11FF),
    (0x2E80, 0x2FDF),
    (0x3000, 0x31FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xF900, 0xFAFF),
    (0xFF00, 0xFFEF),
)
# CJK prose's punctuation (、。「」，), kana and fullwidth forms: a few in every line of it.
_CJK_MARKS = re.compile("[\u3000-\u30ff\uff00-\uffef]")
# What else CJK prose in UTF-16 holds: ASCII and Latin-1 (digits, Latin words), and the general punctuation
# CJK uses (— ‘’ “” … ‰ ※), not U+2028 on (what a Latin-1 space before a letter or a comma reads as).
_BESIDE_CJK = re.compile("[\x00-\xff\u2010-\u2027\u2030-\u203f]")


def _is_cjk(character: str) -> bool:
    """Whether `character` is in `CJK_RANGES`."""
    code = ord(character)
    return any(low <= code <= high for low, high in CJK_RANGES)


def cjk_utf16(data: bytes, codec: str) -> bool:
    """Whether `data` (whole code units), not UTF-8, reads as `codec` (utf-16-le or -be) to CJK prose: half
    its characters or more CJK (`CJK_RANGES`), all but 2% of the others ASCII, Latin-1 or the general
    punctuation CJK uses, and 2% or more CJK punctuation, kana or fullwidth forms (，。、).

    CJK in UTF-16 holds no control byte nor, without spaces, NUL (`_wide_units`). Latin-1 text reads as
    CJK too, but each space after a letter reads as a U+2041..U+20FF character; a Shift-JIS, GBK or EUC-KR
    file reads as ideographs too, but never as punctuation or kana.
    """
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError as error:
        if error.reason == "unexpected end of data":
            return False  # UTF-8 text that the end of `data` cut in a character.
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        return False
    cjk = sum(map(_is_cjk, text))
    others = len(text) - cjk - len(_BESIDE_CJK.findall(text))
    marks = len(_CJK_MARKS.findall(text))
    return bool(text) and cjk * 2 >= len(text) and others * 50 <= len(text) and marks * 50 >= len(text)


def cjk_utf16_line(line: bytes) -> str | None:
    """The UTF-16 encoding (iconv's name) of a line (without its \\n) of CJK prose (`cjk_utf16`) cut out
    of UTF-16 text at its 0A bytes, whichever byte it starts with (after UTF-16LE's newline: 00); else None.

    A line of CJK appended to a UTF-8 file holds no control byte (`wide_line_row`), nor, ended by \\n, a NUL.
    """
    for start in (0, 1):
        body = line[start:]
        body = body[: len(body) // 2 * 2]
        for name, _, codec in UTF16_NEWLINES:
            units = _whole_units(body, codec)
            if cjk_utf16(units, codec) and utf16_text(units, codec):
                return name
    return None


def unmarked_utf16(head: bytes) -> str | None:
    """The UTF-16 encoding (iconv's name) of a file whose first bytes `head` are UTF-16 without a byte-order
    mark in any script, else None.

    `wide_encoding` tells one by control bytes between the letters, which CJK, Hangul and the Indic
    scripts lack (or have whitespace ones: Devanagari's high byte is a tab); so such a file is told by
    its newline, the code unit 0A 00 (00 0A) at an even offset, which UTF-8 text does not hold, and all of
    `head` decoding to text (`utf16_text`; zeros where data was never written do not). A UTF-8 first
    line (two bytes or more, then a newline of its own) is a UTF-8 file that may go on as UTF-16 (the
    appended lines are `wide_line_row`'s), as PowerShell's >> makes one.
    """
    first = head.find(b"\n")
    utf8_start = first >= 2 and _clean_utf8(head[:first])
    for name, newline, codec in UTF16_NEWLINES:
        place = _even_find(head, newline)
        if place < 0:
            continue
        if utf8_start and first != place + newline.index(b"\n"):
            continue
        if len(head) == place + 2 and _clean_utf8(head[:place]):
            continue  # A UTF-8 line, then a NUL (a C string's end): nothing more says UTF-16.
        if utf16_text(_whole_units(head[: len(head) // 2 * 2], codec), codec):
            return name
    if b"\n\x00" not in head and b"\x00\n" not in head and not utf8_start:
        # A first line longer than `head` (a document per line): its high bytes tell it, NULs (spaces) among
        # the Indic scripts' whitespace ones (`_wide_units`); CJK alone, its characters (`cjk_utf16`).
        body = head[: len(head) // 2 * 2]
        for name, _, codec in UTF16_NEWLINES:
            units = _whole_units(body, codec)
            if (_wide_units(body, codec) or cjk_utf16(units, codec)) and utf16_text(units, codec):
                return name
    return None


# What a UTF-16LE code unit of NUL high byte is between CJK characters: a space, a digit.
_SEPARATORS = frozenset(b" 0123456789")


def _first_utf16_units(line: bytes) -> bool:
    """Whether the high bytes of a line of even length (the first past a UTF-8 start: no NUL before it)
    show UTF-16LE: a quarter or more of them C0 control bytes (`_wide_units`), with two NULs among them or
    a NUL whose code unit is a space or digit (20 00, 31 00), as between CJK words ('你 好').

    One NUL after a letter is a stray one in UTF-8 text ('and\x00then', 'fox\x00'): a quarter of a short
    line's high bytes, but neither of those.
    """
    nul_units = [line[place] for place in range(0, len(line) - 1, 2) if line[place + 1] == 0]
    separated = len(nul_units) >= 2 or any(low in _SEPARATORS for low in nul_units)
    return separated and _wide_units(line, "utf-16-le")


def utf16_line(line: bytes) -> bool:
    """Whether a line (without its \\n) of a UTF-8 file is UTF-16LE text appended to it, in any script.

    Such a line starts with the NUL ending the previous line's newline (0A 00), the first one of all
    (right after the last UTF-8 line) has high bytes that show it (`_first_utf16_units`: ASCII, spaces
    and digits between CJK; Devanagari's tab), or ends with the CR unit 0D 00 (a Windows line end); and
    it decodes to text (`utf16_text`). UTF-8 text does neither: a stray NUL in it is read as text, in a
    short line too (where one NUL is a quarter of the high bytes, and the \r put back below would be
    another control byte). A first line of CJK alone, ended by 0A 00, holds no NUL: it is read as UTF-8
    (mostly invalid_utf8).
    """
    if b"\x00" not in line:
        return False
    own = line
    if len(line) % 2 != (line[0] == 0):
        line += b"\r"  # Taking off the \n took the 0x0D before it: a last character's high byte.
    if len(line) % 2:
        if line[0]:
            return False
        body = line[1:]
    else:
        body = line
        if not line.endswith(b"\r\x00") and not _first_utf16_units(own):
            return False
    return utf16_text(body, "utf-16-le")


def utf16be_line(line: bytes) -> bool:
    """Whether a line (without its \\n) of a UTF-8 file is UTF-16BE text appended to it (`utf16_line`'s twin).

    Such a line ends with the NUL starting its newline (00 0A), so its length is odd; its high bytes are
    C0 control bytes in a quarter of its code units or more, a NUL among them (ASCII, spaces and digits
    between CJK; Devanagari's 0x09), or it ends with the CR unit 00 0D; and it decodes to text. A UTF-8
    line ended by a stray NUL (a C string's end) has no NUL among its high bytes. A line of CJK alone
    has none either: it is CJK prose (`cjk_utf16_line`), or read as UTF-8.
    """
    if len(line) % 2 == 0 or not line.endswith(b"\x00"):
        return False
    body = line[:-1]
    if not body.endswith(b"\x00\r") and not _wide_units(body, "utf-16-be"):
        return False
    return utf16_text(body, "utf-16-be")


def _first_line(head: bytes) -> bytes:
    """A file's first line in `head` (its first bytes), with the newline and the byte after it.

    UTF-16LE's newline is 0A 00: the 00 follows the 0A. Only the first line tells the file's
    encoding: a UTF-8 file may go on as UTF-16 (`wide_line_row`), even after a short first line.
    """
    newline = head.find(b"\n")
    return head if newline < 0 else head[: newline + 2]


# A line this share of whose bytes are control bytes is no UTF-8 text (`wide_line_row`).
WIDE_LINE_CONTROLS = 0.4
# What DOS tools end a text file with (Ctrl-Z), and `copy /b a.txt+b.txt` leaves between the files joined.
DOS_END_OF_FILE = b"\x1a"
DOS_END_OF_FILE_MESSAGE = (
    "The line is a DOS end-of-file mark (Ctrl-Z, 0x1A), no record: nothing of the file is lost. To be rid of "
    "this dead letter, remove it (e.g. tr -d '\\032' < FILE > FILE.txt)."
)


def without_joining_marks(line: bytes) -> bytes:
    """`line` without the marks that joining files leaves at its start: a byte-order mark (`cat a.txt b.txt`
    of files saved with one), DOS's end-of-file marks (`copy /b a.txt+b.txt` of DOS files: a's closing
    Ctrl-Z, which no newline follows, starts b's first line), or both. Neither is part of the record.

    A line of nothing but Ctrl-Z (and its line end) keeps them: it is its own dead letter (`wide_line_row`).
    """
    if line.startswith(BOM):
        line = line[len(BOM) :]
    if line.startswith(DOS_END_OF_FILE) and line.strip(DOS_END_OF_FILE + b"\r\n"):
        line = line.lstrip(DOS_END_OF_FILE)
        if line.startswith(BOM):
            line = line[len(BOM) :]
    return line


def wide_line_row(
    source: str, number: int, controls: int, size: int, raw: str | bytes, line: bytes
) -> schema_lib.ErrorRow | None:
    """The `invalid_utf8` dead letter of a line (or CSV record) of `size` bytes, `controls` of them
    `CONTROL_BYTES`, that is UTF-16/32 text or zeros, not UTF-8 text; None for any other line.

    Such a line has 40% or more control bytes (UTF-16 of ASCII or Cyrillic has half;
    a text of letters overstruck by backspaces, as `man` prints bold to a terminal, a
    third), or is UTF-16LE or UTF-16BE text whose characters hold none (CJK, Hangul) or
    whitespace ones (the Indic scripts): `utf16_line`, `utf16be_line`, asked of a line with
    a control byte only (its bytes `line`, without the line end). A UTF-8 file that goes on
    as UTF-16 (Windows PowerShell's `>>` appends UTF-16LE to any file; `cat a.txt
    b_utf16.txt`) has such lines past its first; a disk's zeros where data was never
    written are NULs. UTF-8 text holds none but by accident. A line of nothing but DOS's
    end-of-file mark (Ctrl-Z) is its own `empty_record` dead letter.
    """
    if not controls:
        return None
    if not line.strip(DOS_END_OF_FILE):
        return schema_lib.error_row(source, number, None, EMPTY_RECORD, DOS_END_OF_FILE_MESSAGE, raw)
    big_endian = utf16be_line(line)
    encoding = "UTF-16BE" if big_endian else "UTF-16LE"
    # Without a NUL, a line of odd length is UTF-16LE only as cut after a character's 0A low byte (Њ is
    # 0A 04), so starting with its control high byte: '1^Aa^Ax', one-letter fields between Ctrl-A, is text.
    halves = b"\x00" in line or len(line) % 2 == 0 or line[:1] in CONTROL_BYTES
    if controls >= size * WIDE_LINE_CONTROLS and halves:
        conversion = f"iconv -f {encoding} -t UTF-8"
        utf32 = _utf32_line(line)
        if utf32 is not None:
            conversion = f"iconv -f {utf32} -t UTF-8" if utf32 else "iconv -f UTF-32LE -t UTF-8, or UTF-32BE"
        message = (
            f"{controls} of the record's {size} bytes are control bytes (NUL and the like): it is UTF-16 or "
            "UTF-32 text (a control byte between the letters: Windows PowerShell's >> appends UTF-16LE to a "
            "file), or zeros where data was never written, not UTF-8. Convert that part of the file to UTF-8 "
            f"(e.g. {conversion}), or remove the zeros."
        )
    elif big_endian or utf16_line(line):
        message = _utf16_record(encoding)
    else:
        return None
    return schema_lib.error_row(source, number, None, INVALID_UTF8, message, raw)


def _utf32_line(line: bytes) -> str | None:
    """For a line of UTF-32 text cut at its 0A bytes (`wide_encoding` tells UTF-32 by its NULs), iconv's name
    of its encoding, or "" when its byte order cannot be told; None for any other line.

    The first line of UTF-32LE after UTF-8 ones starts with its first character; any other starts with
    NULs (UTF-32BE's characters, or the newline before it: 0A 00 00 00) and reads as either byte order.
    """
    if len(line) < 4 or not any(wide_encoding(line[start:]) in ("UTF-32LE", "UTF-32BE") for start in (0, 3)):
        return None
    return "UTF-32LE" if line[0] else ""


def _utf16_record(encoding: str) -> str:
    """The message of a line or record that is UTF-16 text (`encoding`, iconv's name) past a UTF-8 start."""
    return (
        f"The record is {encoding} text (its bytes read so: Windows PowerShell's >> appends UTF-16LE to a "
        f"file), not UTF-8. Convert that part of the file to UTF-8 (e.g. iconv -f {encoding} -t UTF-8)."
    )


def check_encoding(head: bytes) -> None:
    """Raises `NotUtf8` for a file whose first bytes `head` are a UTF-16/32 byte-order mark, or UTF-16/32
    text without one (the control bytes of its first line say so: `wide_encoding`; else its newline and
    characters: `unmarked_utf16`)."""
    for mark, encoding in WIDE_BOMS:
        if head.startswith(mark) and (encoding != "UTF-32LE" or _goes_on_as_utf32le(head)):
            raise NotUtf8(
                f"the file is {encoding[:6]} (it starts with the byte-order mark {mark.hex(' ').upper()}); "
                f"the readers take UTF-8: convert it, e.g. iconv -f {encoding} -t UTF-8 FILE > FILE.utf8"
            )
    unmarked = wide_encoding(_first_line(head[:HEAD_BYTES]))
    why = "control bytes such as NUL between the letters of its first line"
    if unmarked is None:
        unmarked, why = unmarked_utf16(head[:HEAD_BYTES]), "its first bytes read as UTF-16 text, not UTF-8"
    if unmarked is not None:
        raise NotUtf8(
            f"the file is {unmarked} without a byte-order mark ({why}); "
            f"the readers take UTF-8: convert it, e.g. iconv -f {unmarked} -t UTF-8 FILE > FILE.utf8"
        )


# Compressed data by its first bytes (the formats' magic numbers), none of which UTF-8 text can start
# with: a file of them whose name does not say so would be read as lines of garbage.
COMPRESSED_MAGICS = (
    (re.compile(rb"\x1f\x8b"), "gzip"),
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2"),
    (re.compile(rb"\xfd7zXZ\x00"), "xz"),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd"),
    (re.compile(rb"\x04\x22\x4d\x18"), "lz4"),
    (re.compile(rb"PK\x03\x04"), "zip"),
    (re.compile(rb"7z\xbc\xaf\x27\x1c"), "7z"),
    (re.compile(rb"\x1f\x9d"), "compress (.Z)"),
    (re.compile(rb"LZIP[\x00\x01]"), "lzip"),
)
# Parquet data by its start alone: the magic, then the thrift header of the first page. Inside a .gz only,
# whose end cannot be read without decompressing it all (a plain file is told by both ends).
PARQUET_START = re.compile(rb"PAR1\x15")
# A tar member header's magic and version (POSIX, GNU) at this offset of the (decompressed) data:
# with their NULs, unlike text that happens to hold "ustar" there ("mustard").
TAR_MAGICS, TAR_MAGIC_AT = (b"ustar\x0000", b"ustar  \x00"), 257
# The bytes a file's start must be read for to tell it by its byte-order mark, magic number or tar header
# (a range past the start reads them too, so that every range of a file tells it alike).
HEAD_BYTES = 512


class CompressedData(Exception):
    """A file named as uncompressed whose data is compressed (by its magic number): not lines of text."""


class TarArchive(Exception):
    """A tar archive (by its name or its first header): its member headers are not records."""


# What a Parquet file starts and ends with.
PARQUET_MAGIC = b"PAR1"


def file_tail(stream: ByteStream) -> bytes:
    """The last bytes of a seekable `stream` (as many as `PARQUET_MAGIC`), which is left where it was."""
    position = stream.tell()
    try:
        size = stream.seek(0, 2)
        stream.seek(max(0, size - len(PARQUET_MAGIC)))
        return stream.read(len(PARQUET_MAGIC))
    finally:
        stream.seek(position)


def check_start(head: bytes, tail: bytes = b"", gunzipped: bool = False) -> None:
    """Raises for a file's first bytes `head` (and last, `tail`) that no line reader takes.

    `head` is the file's own data, or with `gunzipped` a .gz file's decompressed data.

    Raises:
        NotUtf8: UTF-16/32 (`check_encoding`).
        TarArchive: a tar member header at the start of the data.
        CompressedData: a compressed format's magic number (gzip data named .jsonl, say; inside a .gz:
            data compressed twice, as a .gz download that kept its Content-Encoding is), or a Parquet
            file's (starting and ending with PAR1; inside a .gz, by its start) read as text, JSONL or CSV.
    """
    for magic, name in COMPRESSED_MAGICS:
        if not magic.match(head):
            continue
        if gunzipped:
            raise CompressedData(
                f"the file's data, once gunzipped, is {name} data again: it was compressed twice (a .gz "
                "download that kept its Content-Encoding: gzip, say); decompress it fully, e.g. "
                "gunzip -c FILE | gunzip > FILE.txt for gzip twice, and gzip the result if you like."
            )
        fix = {
            "gzip": "rename it to end in .gz, which is read through gzip",
            "zip": "decompress it (an Excel .xlsx workbook is zip data: save it as CSV)",
        }.get(name, "decompress it (or gzip it: .gz is read through gzip)")
        raise CompressedData(f"the file is {name} data, though its name does not say so: {fix}.")
    if gunzipped and PARQUET_START.match(head):
        raise CompressedData(
            "the file's data, once gunzipped, is Parquet, not lines of text: read it with --input_format "
            "parquet, or name it .parquet.gz."
        )
    if head[TAR_MAGIC_AT : TAR_MAGIC_AT + 8] in TAR_MAGICS:
        raise TarArchive("the file is a tar archive; extract it (tar -xf FILE) and read its files.")
    if head.startswith(PARQUET_MAGIC) and tail == PARQUET_MAGIC:
        raise CompressedData(
            "the file is Parquet (it starts and ends with PAR1), not lines of text: read it with "
            "--input_format parquet, or name it .parquet."
        )
    # Last: binary data has NUL bytes too, which must not read as UTF-16 before its magic number is told.
    check_encoding(head)


class InputShorter(Exception):
    """A file, or range of one, ended before the size the launch listed: it was cut while it was read."""


class InputLonger(Exception):
    """A line of a file ran past the size the launch listed: the file was appended to while it was read."""


def _check_listed_end(number: int, ended: int, newline: bool, listed_size: int) -> None:
    """Raises for line `number`, read up to byte `ended`, when it is not a line of the file as listed.

    Such a line was cut by the end of the data before the listed size (no newline ends it), or runs
    past that size: a row of it would be part of a record, or one the launch never listed, so the
    read breaks there instead, and that line is the first record not read.

    Raises:
        InputShorter: the data ended inside the line.
        InputLonger: the line runs past the listed end.
    """
    if ended < listed_size and not newline:
        raise InputShorter(
            f"the data ends at byte {ended}, inside line {number}, but the launch listed {listed_size} bytes"
        )
    if ended > listed_size:
        raise InputLonger(
            f"line {number} runs past byte {listed_size}, the end the launch listed: the file was appended "
            "to while it was read"
        )


def _skip_line(stream: ByteStream) -> tuple[int, bytes]:
    """Reads to the end of the current line without keeping it: (bytes skipped, last chunk read)."""
    skipped, chunk = 0, b""
    while chunk := stream.readline(SKIP_CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped, chunk


def _align(stream: ByteStream, start: int, lines_before: LinesBefore | None) -> tuple[int, int]:
    """Moves `stream` to the first line starting at or after `start` > 0: (its offset, lines before it)."""
    block_start, newlines = lines_before(start - 1) if lines_before else (start - 1, 0)
    stream.seek(block_start)
    remaining = start - 1 - block_start
    while remaining > 0:
        chunk = stream.read(min(remaining, SKIP_CHUNK))
        if not chunk:
            break
        newlines += chunk.count(b"\n")
        remaining -= len(chunk)
    # The line holding byte start - 1 belongs to the range before (a newline there: to nobody).
    skipped, end = _skip_line(stream)
    return start - 1 + skipped, newlines + end.endswith(b"\n")


def line_records(
    plan: ExportPlan, source: str, stream: ByteStream, lines: LineRange
) -> Iterator[tuple[int, Record]]:
    """Text or JSONL: one record per line of `lines`, ordered by byte offset.

    Lines over --max_record_bytes are skipped, never held. With `lines.listed_size`
    (the size the launch listed), data that ends before it raises `InputShorter`.
    """
    limit = plan.max_record_bytes
    claim, on_newline, listed_size = lines.claim, lines.on_newline, lines.listed_size
    if lines.start:  # A range past the start: the file's first bytes say its encoding, or compression.
        stream.seek(0)
        head = stream.read(HEAD_BYTES)
        check_start(head, file_tail(stream) if head.startswith(PARQUET_MAGIC) else b"")
    offset, number = (0, 0) if not lines.start else _align(stream, lines.start, lines.lines_before)
    spellings = field_spellings(plan)  # Once per range, not per line.
    while True:
        # Room for the record and its "\r\n" (and a byte-order mark): a longer read means a longer line.
        # A mark starting any line is dropped (files joined with `cat`): it is no part of the record, so
        # it takes no room of --max_record_bytes, nor starts the text (a first word no vocabulary knows).
        want = limit + 2 + len(BOM)
        line = stream.readline(want)
        if not line:
            break
        if claim is not None and not claim(offset):
            return
        number += 1
        if offset == 0:  # With the byte after its newline, as `_first_line` takes it: UTF-16LE's NUL.
            check_encoding(line + _next_byte(stream))
        cut = len(line) == want and not line.endswith(b"\n")
        consumed = len(line)
        line = without_joining_marks(line)
        if not cut and line.endswith(DOS_END_OF_FILE) and line.strip(DOS_END_OF_FILE):
            # DOS's end-of-file mark right after the last record (`copy /a`): no part of it (a JSON object
            # would not parse); a line of nothing but the mark is its own dead letter (`wide_line_row`).
            line = line.rstrip(DOS_END_OF_FILE)
        size, end = len(line), line
        if cut:
            skipped, end = _skip_line(stream)
            size += skipped
            consumed += skipped
        size -= len(end) - len(end.rstrip(b"\r\n"))
        if on_newline is not None and end.endswith(b"\n"):
            on_newline(offset + consumed - 1)
        if listed_size is not None:
            _check_listed_end(number, offset + consumed, end.endswith(b"\n"), listed_size)
        item: Record
        # The only line of a file starts it, and nothing follows it.
        only_line = offset == 0 and (not end.endswith(b"\n") or _at_end(stream))
        if _holds_carriage_return_lines(plan, line, cut, only_line):
            item = _carriage_returns(source, number, line)
        elif size > limit:
            item = too_large(source, number, size, limit, line[: schema_lib.RAW_LIMIT * 4])
            if number == 1 and plan.input_format != "text" and line.lstrip(BOM + b" \t\r\n").startswith(b"["):
                # A JSON array on one line, larger than any record: raising the bound would not help.
                item["message"] += " " + JSON_ARRAY_HINT
        else:
            item = guarded(parse_line, plan, source, number, line.rstrip(b"\r\n"), spellings)
            if _split_jsonl_records(plan, item, line):
                item = _carriage_returns(source, number, line)
        yield offset, item
        offset += consumed
    if listed_size is not None and offset < listed_size:
        raise InputShorter(f"the data ends at byte {offset}, but the launch listed {listed_size} bytes")


# What a JSONL file's first line that is, or starts, a JSON array says about converting the file.
JSON_ARRAY_HINT = (
    "The file looks like one JSON array, not JSON Lines (one object per line): convert it, e.g. "
    "jq -c '.[]' FILE > FILE.jsonl"
)
# In JSONL, a carriage return before the next object's brace: records split by \r alone.
_JSONL_CARRIAGE_RETURN = re.compile(rb"\r[ \t]*[{\[]")
# The same after a record parsed from a line's start (`_split_jsonl_records`).
_NEXT_JSONL_RECORD = re.compile(r"[ \t]*\r[ \t\r]*[{\[]")
_JSON_WHITESPACE = " \t\r\n"
_DECODER = json.JSONDecoder()


def _next_byte(stream: ByteStream) -> bytes:
    """The byte that follows what was read of `stream` (b"" at its end, or where it cannot be told); the
    stream stays where it was."""
    peek = getattr(stream, "peek", None)
    if peek is not None:
        return bytes(peek(1)[:1])
    if not stream.seekable():
        return b""
    position = stream.tell()
    following = stream.read(1)
    stream.seek(position)
    return following


def _at_end(stream: ByteStream) -> bool:
    """Whether no byte follows what was read of `stream`, which stays where it was."""
    peek = getattr(stream, "peek", None)
    if peek is not None:
        return not peek(1)
    if not stream.seekable():
        return False  # Cannot tell: the \r is taken for text, as in any line but a file's only one.
    position = stream.tell()
    following = stream.read(1)
    stream.seek(position)
    return not following


def _holds_carriage_return_lines(plan: ExportPlan, line: bytes, cut: bool, only_line: bool) -> bool:
    """Whether a line (`line`; its first part if `cut`) holds lines ended by \r alone (old Mac line ends).

    Decided on the line's own bytes (and, for a file's first line, whether it is its
    only one), so each range of a split file decides its lines as a whole read would,
    with or without a newline after them. A text line holding two or more \r (line
    ends aside) is such lines, unless it is UTF-16LE text (`utf16_line`: 0x0D is the high
    byte of Malayalam and Sinhala); so is one holding one \r when it is the file's only
    line (a file of two \r-ended records looks so). Any other \r is text. A JSONL
    line is decided once parsed (`_split_jsonl_records`), unless it is too long to.
    """
    body = line.rstrip(b"\r\n")
    if plan.input_format != "text":
        return cut and bool(_JSONL_CARRIAGE_RETURN.search(body))
    returns = body.count(b"\r")
    if returns >= 2 and not cut and (utf16_line(body) or utf16be_line(body) or cjk_utf16_line(body)):
        # UTF-16 text appended (`wide_line_row`): 0x0D is Malayalam's and Sinhala's high byte, and a byte of
        # CJK characters (不 is 0D 4E).
        return False
    return returns >= 2 or (returns == 1 and only_line)


def _split_jsonl_records(plan: ExportPlan, item: Record, line: bytes) -> bool:
    """Whether a JSONL line that is not JSON is records split by \r alone.

    So it is when it starts with a JSON value followed by a \r and a brace: a raw
    \r inside a string (malformed JSON too) stays that line's `malformed_json`.
    """
    if plan.input_format == "text" or isinstance(item, Document) or item["reason"] != MALFORMED_JSON:
        return False
    try:
        text = line.rstrip(b"\r\n").decode("utf-8")
        start = len(text) - len(text.lstrip(_JSON_WHITESPACE))
        _, end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return False
    return bool(_NEXT_JSONL_RECORD.match(text, end))


def _carriage_returns(source: str, number: int, line: bytes) -> Record:
    """The dead letter of a line holding lines ended by \r alone: a file of old Mac line endings.

    Such lines read as one line of every record run together, with or without a
    newline after them: how many records it holds is unknown, so it breaks the file
    (an `unreadable_file` when it is the first line, else a `read_error` there).
    """
    return schema_lib.error_row(
        source,
        None if number == 1 else number,
        None,
        UNREADABLE_FILE if number == 1 else READ_ERROR,
        "The file ends its lines with a carriage return (\\r) alone, so its records would be "
        "read as one. Convert the line endings (e.g. tr '\\r' '\\n' < FILE > FILE.txt).",
        line[: schema_lib.RAW_LIMIT * 4],
    )


def parse_line(
    plan: ExportPlan, source: str, number: int, line: bytes, spellings: Spellings | None = None
) -> Record:
    """One text or JSONL line (bytes, no line terminator) -> `Document` or dead-letter row.

    `spellings` are `field_spellings(plan)`, made once by a caller parsing many lines.
    """
    wide = wide_line_row(source, number, control_bytes(line), len(line), line, line)
    if wide is not None:  # UTF-16 past a UTF-8 start: control bytes between letters.
        return wide
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        cjk = cjk_utf16_line(line)
        if cjk is not None:  # UTF-16 CJK appended: a line of it holds no control byte (`wide_line_row`).
            return schema_lib.error_row(source, number, None, INVALID_UTF8, _utf16_record(cjk), line)
        return schema_lib.error_row(source, number, None, INVALID_UTF8, str(error), line)
    if plan.input_format == "text":
        fields = {plan.inputs[0].field: text} if plan.inputs else {}
        # A file name that is not UTF-8 (surrogate-escaped) is written as backslash escapes.
        document_id = f"{schema_lib.writable_text(source)}:{number}"
        return fields_to_document(plan, source, number, document_id, fields, text)
    # A byte-order mark mid-file is a joined file's (`cat a.jsonl b.jsonl`): no JSON starts with one.
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return schema_lib.error_row(
            source, number, None, EMPTY_RECORD, "Blank line where a JSON object was expected.", text
        )
    try:
        # One object (no nested one): parsed noting the names it repeats, which costs next to nothing.
        flat = text.count("{") == 1
        record = _NAMES_DECODER.decode(text) if flat else json.loads(text)
    except RecursionError:
        return schema_lib.error_row(
            source, number, None, MALFORMED_JSON, "JSON nested too deeply to parse.", text
        )
    except ValueError as error:  # JSONDecodeError, or an integer of too many digits.
        message = str(error)
        if number == 1 and text.lstrip().startswith("["):
            message += ". " + JSON_ARRAY_HINT
        elif number == 1 and text.rstrip().endswith("{"):
            message += (
                ". The file looks like pretty-printed JSON (an object over many lines), not JSON Lines "
                "(one object per line): convert it, e.g. jq -c . FILE > FILE.jsonl"
            )
        return schema_lib.error_row(source, number, None, MALFORMED_JSON, message, text)
    if not isinstance(record, dict):
        message = f"Expected a JSON object, found {type(record).__name__}."
        if number == 1 and isinstance(record, list):  # json.dump(list, file): an array on one line.
            message += " " + JSON_ARRAY_HINT
        return schema_lib.error_row(source, number, None, NOT_AN_OBJECT, message, text)
    if flat:
        repeated = _noted_repeats(plan)
    else:
        repeated = _repeated_fields(plan, text, field_spellings(plan) if spellings is None else spellings)
    if repeated:
        names = ", ".join(repr(name) for name in repeated)
        return schema_lib.error_row(
            source,
            number,
            None,
            MALFORMED_JSON,
            f"The object names {names} more than once: which value to read is ambiguous (JSON parsers "
            "keep the last, others the first). Remove the repeated field.",
            text,
        )
    return to_document(plan, source, number, record, text)


# Each read field's spellings as a JSON string: `json.dumps`'s escaped one and the plain one.
Spellings = tuple[tuple[str, ...], ...]
# A \u escape inside a JSON string that a colon follows: a key spelt with escapes ("\u0069d" for "id").
_ESCAPED_KEY = re.compile(r'\\u[0-9a-fA-F]{4}(?:[^"\\]|\\.)*"\s*:')
# The names the object `_NAMES_DECODER` made last repeats, per thread (Beam runs bundles in threads).
_LAST_OBJECT = threading.local()


def _object(pairs: list[tuple[str, typing.Any]]) -> dict[str, typing.Any]:
    """A JSON object's dict; notes in `_LAST_OBJECT` the names it repeats (None when it repeats none).

    The outermost object is made last, so after a parse the note is that object's.
    """
    record = dict(pairs)
    _LAST_OBJECT.names = [name for name, _ in pairs] if len(record) != len(pairs) else None
    return record


# `json.loads`, noting repeated names: as fast for one object, a third slower with many nested ones.
_NAMES_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def field_spellings(plan: ExportPlan) -> Spellings:
    """Each field the export reads (`read_fields`) as JSON strings: escaped (`json.dumps` default) and not."""
    return tuple(
        tuple({json.dumps(name), json.dumps(name, ensure_ascii=False)}) for name in sorted(read_fields(plan))
    )


def _repeated_fields(plan: ExportPlan, text: str, spellings: Spellings) -> list[str]:
    """The fields the export reads (`read_fields`) that the JSON object `text` names more than once.

    `json.loads` keeps a repeated name's last value without a word, as the id or the
    text of a row that a CSV header or Parquet columns would make `ambiguous_header`.
    The object is parsed again, noting its names as parsed (whatever escapes spell
    them), only when one of those names occurs more than once in the line's text (a
    nested object of the same key, say) or a key is spelt with a \\u escape.
    """
    if all(sum(map(text.count, spelled)) < 2 for spelled in spellings) and (
        "\\u" not in text or not _ESCAPED_KEY.search(text)
    ):
        return []
    _NAMES_DECODER.decode(text)
    return _noted_repeats(plan)


def _noted_repeats(plan: ExportPlan) -> list[str]:
    """The fields the export reads that the object `_NAMES_DECODER` parsed last names more than once."""
    names = _LAST_OBJECT.names
    if names is None:
        return []
    wanted = read_fields(plan)
    return sorted({name for name in names if name in wanted and names.count(name) > 1})
