"""Benchmark corpora of real English text at realistic lengths (not the short sample corpus repeated).

    python -m benchmarks.corpora OUT.jsonl --documents 61089 [--seed 0] [--overwrite]

The sample corpus is short (median about 30 tokens of content), so costs that
scale with length or padding hide in it. Real descriptions and articles are
longer: Debian's package descriptions, for instance, have a median of 46 words
and a mean of 57. This module writes documents of that shape from real text
that ships with every CPython: the language reference and library topics of
`pydoc_data.topics` and the standard library's docstrings (parsed with `ast`,
never imported), split into sentences.

Each document's content length in words is drawn from a log-normal
distribution with median `MEDIAN_WORDS` and sigma `SIGMA` (mean about 55),
capped at `MAX_WORDS`; its content is that many words of consecutive
sentences starting at a random sentence of the pool, so the text reads as
prose, and no two documents are the same passage. The title is the first 4 to
12 words of another random sentence. Fields: `id`, `title`, `content`, `kind`,
`topic` (the fields the bundled model and `--keep_fields` examples use).
The output is deterministic for a given `--seed` and Python version.
"""

import argparse
import ast
import errno
import json
import math
import os
import random
import re
import sys
import sysconfig
from collections.abc import Iterator
from typing import BinaryIO

from pipeline.writing.files import write_whole_local

MEDIAN_WORDS = 46
SIGMA = 0.6
MAX_WORDS = 1500
MIN_WORDS = 5
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
_KINDS = ("class", "function")
_TOPICS = ("text", "data", "language", "system", "network", "numeric")


def _docstrings(stdlib: str) -> Iterator[str]:
    for root, directories, names in os.walk(stdlib):
        # Tests and vendored packages hold little prose and many fixtures.
        directories[:] = sorted(
            d for d in directories if d not in ("test", "tests", "site-packages", "idlelib")
        )
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_docstring(node)
                    if text:
                        yield text


def sentence_pool() -> list[str]:
    """Sentences of real English prose, in reading order, from CPython's own documentation."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    texts += list(_docstrings(sysconfig.get_paths()["stdlib"]))
    sentences = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            flat = " ".join(paragraph.split())
            # Code samples and tables are not prose: keep paragraphs that are mostly words.
            if len(flat) < 40 or sum(c.isalpha() or c == " " for c in flat) < 0.85 * len(flat):
                continue
            sentences += [s for s in _SENTENCE_END.split(flat) if len(s.split()) >= 3]
    return sentences


def content_words(rng: random.Random) -> int:
    """A document length in words: log-normal, median MEDIAN_WORDS, within [MIN_WORDS, MAX_WORDS]."""
    words = int(round(rng.lognormvariate(math.log(MEDIAN_WORDS), SIGMA)))
    return max(MIN_WORDS, min(MAX_WORDS, words))


def documents(count: int, seed: int = 0) -> Iterator[dict[str, str]]:
    """`count` documents of real text at realistic lengths (see the module docstring)."""
    pool = sentence_pool()
    rng = random.Random(seed)
    for index in range(count):
        wanted = content_words(rng)
        start = rng.randrange(len(pool))
        words: list[str] = []
        position = start
        while len(words) < wanted:
            words += pool[position % len(pool)].split()
            position += 1
        title_words = pool[rng.randrange(len(pool))].split()[: rng.randint(4, 12)]
        yield {
            "id": f"doc-{seed}-{index}",
            "title": " ".join(title_words),
            "content": " ".join(words[:wanted]),
            "kind": _KINDS[index % len(_KINDS)],
            "topic": _TOPICS[rng.randrange(len(_TOPICS))],
        }


def write_real_corpus(path: str, count: int, seed: int = 0, overwrite: bool = False) -> str:
    """Writes `count` real-length documents as JSONL to `path`; returns `path`.

    The file is written whole beside `path` and then renamed into place, so a kill
    leaves the old file or the new one, and a link at `path` is replaced, never
    written through.  Without `overwrite`, a file or link already at `path` (the
    user's own corpus, perhaps) is refused with FileExistsError.
    """
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(errno.EEXIST, "it already exists; pass --overwrite to replace it", path)

    def write(handle: BinaryIO) -> None:
        for document in documents(count, seed):
            handle.write((json.dumps(document, ensure_ascii=False) + "\n").encode("utf-8"))

    write_whole_local(path, write, replace=overwrite)
    return path


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1: a corpus needs at least one document")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.corpora", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("output", help="the JSONL file to write (never replaced without --overwrite)")
    parser.add_argument(
        "--documents",
        type=_at_least_one,
        default=61089,
        help="how many documents, at least 1 (default 61,089)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a file or link already at OUTPUT")
    args = parser.parse_args(argv)
    try:
        write_real_corpus(args.output, args.documents, args.seed, overwrite=args.overwrite)
    except OSError as error:
        # One line, as every other tool refuses its output: what is wrong with which path.
        print(f"error: {args.output}: {error.strerror or error}", file=sys.stderr)
        sys.exit(2)
    lengths = sorted(len(d["content"].split()) for d in documents(min(args.documents, 20000), args.seed))
    print(
        f"wrote {args.documents:,} documents to {args.output}: content words median "
        f"{lengths[len(lengths) // 2]}, mean {sum(lengths) / len(lengths):.1f}, max {lengths[-1]}"
    )


if __name__ == "__main__":
    main()
