"""Build the sample text-classification corpus from CPython standard-library docstrings.

The text is CPython's, not ours: the docstrings of the Python 3.11 standard
library, distributed under the PSF License Agreement version 2 (PSF-2.0),
which permits redistribution of derived works with the licence notice kept.
Source files are parsed with ``ast`` and never imported, because importing
some stdlib modules has side effects (``antigravity``, ``this``, GUI setup).
Regenerate with ``python -m models.make_sample_corpus``; the output is
deterministic for a given interpreter, but other Python versions ship other
docstrings, so use CPython 3.11 to reproduce ``models/data/sample_corpus.jsonl``.

Each line holds ``id`` (module path plus qualified name), ``title`` (the
summary paragraph, or its first sentence when the docstring has no blank line
or the paragraph is over 200 characters), ``content`` (the rest, whitespace
collapsed, at least 8 words, at most ~3000 characters), ``kind`` (``class`` or
``function``; methods are functions, module docstrings are left out) and
``topic`` (a coarse group of the top-level module, see ``TOPIC_OF_MODULE``;
modules in no group are dropped). Documents whose title and content repeat an
earlier one are dropped too, so no text sits on both sides of a split.

Capping: the stdlib documents about six functions per class (3,427 documents
pass the filters, 2,915 of them functions), so functions are thinned to 75% of
the corpus, leaving about 2,050 documents. The cut falls on the topics with the
most functions (each keeps at most a common number of them; text, data and
language lose none), which also evens out the topics; any topic still over 35%
would be thinned the same way. Thinning keeps every n-th document in sorted id
order, so it is deterministic. ``--max-kind-share 1`` keeps every document.
"""

from __future__ import annotations

import argparse
import ast
import collections
import inspect
import json
import os
import re
import sys
import sysconfig
import tempfile
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "data" / "sample_corpus.jsonl"

SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
MIN_CONTENT_WORDS = 8
MAX_TITLE_CHARS = 200
MAX_CONTENT_CHARS = 3000
MAX_KIND_SHARE = 0.75
MAX_TOPIC_SHARE = 0.35

# Groups are chosen so that each has its own vocabulary (sockets and headers,
# locks and futures, widgets and canvases...), which keeps the label learnable.
# Formatting is off so each group stays a block instead of one module per line.
# fmt: off
TOPIC_OF_MODULE = {
    **dict.fromkeys([
        "asynchat", "asyncore", "cgi", "cgitb", "email", "ftplib", "http",
        "imaplib", "ipaddress", "mailbox", "mailcap", "mimetypes", "netrc",
        "nntplib", "nturl2path", "poplib", "smtpd", "smtplib", "socket",
        "socketserver", "ssl", "telnetlib", "urllib", "webbrowser", "wsgiref",
        "xmlrpc"
    ], "network"),
    **dict.fromkeys([
        "_bootsubprocess", "_threading_local", "asyncio", "concurrent",
        "contextvars", "multiprocessing", "queue", "sched", "selectors", "signal",
        "subprocess", "threading"
    ], "concurrency"),
    **dict.fromkeys([
        "_compression", "_pyio", "bz2", "filecmp", "fileinput", "fnmatch",
        "genericpath", "glob", "gzip", "io", "lzma", "ntpath", "os", "pathlib",
        "posixpath", "shutil", "stat", "tarfile", "tempfile", "zipfile"
    ], "files"),
    **dict.fromkeys([
        "codecs", "difflib", "encodings", "gettext", "locale", "pprint", "re",
        "reprlib", "shlex", "sre_compile", "sre_constants", "sre_parse", "string",
        "stringprep", "textwrap", "unicodedata"
    ], "text"),
    **dict.fromkeys([
        "_compat_pickle", "aifc", "base64", "chunk", "configparser", "copyreg",
        "csv", "dbm", "hashlib", "hmac", "html", "imghdr", "json", "pickle",
        "pickletools", "plistlib", "quopri", "shelve", "sndhdr", "sqlite3",
        "struct", "sunau", "tomllib", "uu", "wave", "xdrlib", "xml"
    ], "data"),
    **dict.fromkeys([
        "_aix_support", "_osx_support", "argparse", "ast", "bdb", "cProfile", "cmd",
        "code", "codeop", "compileall", "dis", "distutils", "doctest", "ensurepip",
        "getopt", "imp", "importlib", "inspect", "keyword", "lib2to3", "linecache",
        "logging", "modulefinder", "opcode", "optparse", "pdb", "pkgutil",
        "platform", "profile", "pstats", "py_compile", "pyclbr", "pydoc",
        "rlcompleter", "runpy", "site", "symtable", "sysconfig", "tabnanny",
        "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc",
        "unittest", "venv", "warnings", "zipapp", "zipimport"
    ], "dev"),
    **dict.fromkeys([
        "curses", "idlelib", "tkinter", "turtle", "turtledemo"
    ], "gui"),
    **dict.fromkeys([
        "_pydecimal", "_strptime", "bisect", "calendar", "datetime", "decimal",
        "fractions", "heapq", "numbers", "random", "secrets", "statistics",
        "zoneinfo"
    ], "numeric"),
    **dict.fromkeys([
        "__future__", "_collections_abc", "_py_abc", "abc", "collections",
        "contextlib", "copy", "dataclasses", "enum", "functools", "graphlib",
        "operator", "types", "typing", "weakref"
    ], "language"),
}
# fmt: on

# A summary sentence ends at terminal punctuation followed by what looks like
# the start of the next sentence; requiring that start avoids splitting "e.g. x".
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`\"'*])")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

# The labels a document carries, which `balance` evens out.
Label = typing.Literal["kind", "topic"]
LABELS: tuple[Label, ...] = ("kind", "topic")


class CorpusRow(typing.TypedDict):
    """One line of the sample corpus."""

    id: str
    title: str
    content: str
    kind: str
    topic: str


def collapse(text: str) -> str:
    """`text` with every run of whitespace one space, none at either end."""
    return " ".join(text.split())


def split_docstring(raw: str) -> tuple[str, str] | None:
    """Split a docstring into its summary and the rest.

    Args:
        raw: the docstring as written in the source, indentation included.

    Returns:
        ``(title, content)``, both whitespace-collapsed, or None when no
        summary of at most ``MAX_TITLE_CHARS`` characters can be found.
    """
    doc = inspect.cleandoc(raw)
    parts = _PARAGRAPH_BREAK.split(doc, maxsplit=1)
    title = collapse(parts[0])
    rest = collapse(parts[1]) if len(parts) == 2 else ""
    if rest and len(title) <= MAX_TITLE_CHARS:
        return title, rest
    # Much of the older stdlib runs summary and body together without a blank
    # line; the first sentence is then the closest thing to a summary.
    match = _SENTENCE_END.search(title)
    if match is None or match.start() > MAX_TITLE_CHARS:
        return None
    return title[: match.start()], collapse(title[match.end() :] + " " + rest)


def truncate_words(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at a space."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0]


def iter_source_files(stdlib: str) -> list[tuple[str, str]]:
    """Yield ``(dotted module name, path)`` for every stdlib source file, sorted by module."""
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        # Directories that are not identifiers (lib-dynload, config-3.11-...)
        # cannot be imported packages, so they hold no library docstrings.
        dirnames[:] = [d for d in dirnames if d.isidentifier() and d not in SKIPPED_DIRS]
        package = Path(dirpath).relative_to(stdlib).parts
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if ext != ".py" or not stem.isidentifier():
                continue
            parts = package if stem == "__init__" else package + (stem,)
            found.append((".".join(parts), os.path.join(dirpath, name)))
    return sorted(found)


def iter_definitions(
    body: Iterable[ast.AST], prefix: str
) -> Iterator[tuple[str, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Yield ``(qualname, node)`` for classes and functions, with ``__qualname__`` spelling."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qualname = f"{prefix}{node.name}"
            yield qualname, node
            inner = "." if isinstance(node, ast.ClassDef) else ".<locals>."
            yield from iter_definitions(node.body, qualname + inner)
        else:
            # Definitions guarded by platform or version checks (if/try) are
            # still part of the module's documented surface.
            for field in ("body", "orelse", "finalbody"):
                yield from iter_definitions(getattr(node, field, []), prefix)
            for handler in getattr(node, "handlers", []):
                yield from iter_definitions(handler.body, prefix)


def collect_documents(stdlib: str) -> list[CorpusRow]:
    """Parse every mapped stdlib module under ``stdlib`` into corpus rows, sorted by id."""
    docs: list[CorpusRow] = []
    seen_ids: set[str] = set()
    seen_texts: set[tuple[str, str]] = set()
    for module, path in iter_source_files(stdlib):
        topic = TOPIC_OF_MODULE.get(module.split(".")[0])
        if topic is None:
            continue
        try:
            tree = ast.parse(Path(path).read_bytes(), filename=path)
        except (SyntaxError, ValueError) as exc:
            print(f"skipping unparsable {path}: {exc}", file=sys.stderr)
            continue
        for qualname, node in iter_definitions(tree.body, ""):
            raw = ast.get_docstring(node, clean=False)
            if not raw:
                continue
            split = split_docstring(raw)
            if split is None:
                continue
            title, content = split
            if len(content.split()) < MIN_CONTENT_WORDS:
                continue
            content = truncate_words(content, MAX_CONTENT_CHARS)
            doc_id = f"{module}.{qualname}"
            if doc_id in seen_ids or (title, content) in seen_texts:
                continue
            try:
                (title + content).encode("utf-8")
            except UnicodeEncodeError:
                # Lone surrogates in a few codec docstrings cannot be written as UTF-8.
                continue
            seen_ids.add(doc_id)
            seen_texts.add((title, content))
            docs.append(
                {
                    "id": doc_id,
                    "title": title,
                    "content": content,
                    "kind": "class" if isinstance(node, ast.ClassDef) else "function",
                    "topic": topic,
                }
            )
    docs.sort(key=lambda doc: doc["id"])
    return docs


def water_level(counts: Mapping[str, int], total: int) -> dict[str, int]:
    """Largest per-group allowances, no group over a common level, that sum to ``total``."""
    level = 0
    while level < max(counts.values()) and sum(min(c, level + 1) for c in counts.values()) <= total:
        level += 1
    allowance = {group: min(c, level) for group, c in counts.items()}
    # Hand the remainder to groups still above the level, in sorted order, so
    # the total is met exactly and deterministically.
    spare = total - sum(allowance.values())
    for group in sorted(counts):
        if spare and counts[group] > level:
            allowance[group] += 1
            spare -= 1
    return allowance


def evenly_spaced(items: Sequence[int], keep: int) -> list[int]:
    """Every n-th of ``items`` (n fractional), so ``keep`` of them survive."""
    return [items[j * len(items) // keep] for j in range(keep)]


def cap_share(
    docs: list[CorpusRow], field: Label, max_share: float, spread_by: Label | None = None
) -> list[CorpusRow]:
    """Thin the most common value of ``field`` down to ``max_share`` of the documents.

    Args:
        docs: corpus rows sorted by id.
        field: the label to balance, ``"kind"`` or ``"topic"``.
        max_share: the largest allowed share of one value, in (0, 1].
        spread_by: another label; when given, the cut falls on its groups that
            hold the most documents of the over-represented value, so small
            groups are left whole.

    Returns:
        The surviving rows, still sorted by id.
    """
    value, count = collections.Counter(doc[field] for doc in docs).most_common(1)[0]
    if max_share >= 1 or count <= max_share * len(docs):
        return docs
    # Solve keep / (keep + others) <= max_share for the largest integer keep.
    keep = int(max_share * (len(docs) - count) / (1 - max_share))
    groups: collections.defaultdict[str, list[int]] = collections.defaultdict(list)
    for i, doc in enumerate(docs):
        if doc[field] == value:
            groups[doc[spread_by] if spread_by else ""].append(i)
    allowance = water_level({group: len(members) for group, members in groups.items()}, keep)
    dropped: set[int] = set()
    for group, members in groups.items():
        dropped.update(set(members) - set(evenly_spaced(members, allowance[group])))
    return [doc for i, doc in enumerate(docs) if i not in dropped]


def balance(docs: list[CorpusRow], max_kind_share: float, max_topic_share: float) -> list[CorpusRow]:
    """`docs` thinned until no kind and no topic is over its largest share."""
    # Thinning one label shifts the other's shares, so repeat until both hold;
    # every pass only removes documents, so this terminates.
    while True:
        before = len(docs)
        docs = cap_share(docs, "kind", max_kind_share, spread_by="topic")
        docs = cap_share(docs, "topic", max_topic_share)
        if len(docs) == before:
            return docs


def write_whole(path: Path, docs: Sequence[CorpusRow]) -> None:
    """Writes `docs` as JSON Lines to `path` so that a reader sees the old file or the whole new one.

    Through a temporary file beside it, renamed over it once complete: written in place, a kill or
    an error part-way left the shipped sample corpus (the default --output) cut short, and the
    no-argument `python -m pipeline.run` exported that part without a word.
    """
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as out:
            out.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
            out.flush()
            os.fsync(out.fileno())
        # mkstemp's file is private (0600): the corpus gets the mode a plain open() gives.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m models.make_sample_corpus`: writes the sample corpus."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON Lines file to write")
    parser.add_argument(
        "--max-kind-share",
        type=float,
        default=MAX_KIND_SHARE,
        help="largest share of one kind; 1 disables the cap",
    )
    parser.add_argument(
        "--max-topic-share",
        type=float,
        default=MAX_TOPIC_SHARE,
        help="largest share of one topic; 1 disables the cap",
    )
    args = parser.parse_args(argv)
    for flag in ("max_kind_share", "max_topic_share"):
        share = getattr(args, flag)
        if not 0 < share <= 1:
            parser.error(f"--{flag.replace('_', '-')} must be in (0, 1], got {share}")

    if sys.version_info[:2] != (3, 11):
        print(
            "warning: not CPython 3.11; output will differ from the checked-in corpus",
            file=sys.stderr,
        )
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = balance(collect_documents(stdlib), args.max_kind_share, args.max_topic_share)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_whole(args.output, docs)

    print(f"wrote {len(docs)} documents to {args.output}")
    for field in LABELS:
        counts = collections.Counter(doc[field] for doc in docs)
        print(f"{field}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
