"""Command line: `python -m pipeline.analyze OUTPUT_DIR COMMAND` queries, plots and scores exported vectors.

Commands:
  neighbors   the k nearest neighbours (cosine similarity, or --metric) of one document
              (--id) of an export, or of one word (--word) of a
              `python -m pipeline.vocabulary` output or of the table an
              export with --token_storage ids wrote
  plot        a PNG of the 2-D PCA projection of a vector column, coloured by
              a label field kept with --keep_fields
  knn-score   the fraction of each document's k nearest neighbours that share
              its label, averaged, against the chance level
  index       an approximate-nearest-neighbour index of a vector column, with
              its recall@k measured against the exact scan (pipeline/analysis/index_build.py)

The Parquet files are read with pyarrow.dataset, which reads only the columns
and row groups a query needs and streams record batches.  `neighbors` keeps a
running top-k, so it never holds more than one batch of vectors whatever the
size of the export; `plot` and `knn-score` draw a uniform random sample of at
most --sample rows and work on that in memory.  Where a column has an index,
`neighbors` (one query, or a batch from --queries) and `knn-score --all` search
it instead (`--exact` scans).
"""

from __future__ import annotations

from models import stopping

# Before the imports below, which take seconds (Beam): a Ctrl-C during them is one line too.
if __name__ == "__main__":
    stopping.stop_at_once("python -m pipeline.analyze")

import argparse
import errno
import logging
import os
import sys
import urllib.parse
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.fs as pafs
from apache_beam.io.filesystems import FileSystems

from models.command_line import CommandParser
from models.paths import file_kind, removed_working_directory, unexpanded_home
from pipeline import object_storage
from pipeline.analysis import index_build
from pipeline.analysis.batch_queries import batch_neighbors
from pipeline.analysis.dataset import (
    DEFAULT_SAMPLE,
    DEFAULT_SEED,
    AnalysisError,
    VectorDataset,
    check_read_unchanged,
    check_vector_column,
    data_is_vocabulary,
    forget_opened,
    has_token_tables,
    open_documents,
    open_documents_or_vocabulary,
    open_vocabulary,
    uri_filesystem,
    vector_columns,
)
from pipeline.analysis.exact import DEFAULT_METRIC
from pipeline.analysis.index_store import INSTALL_HINT
from pipeline.analysis.knn import format_knn_score, knn_score, knn_score_indexed
from pipeline.analysis.neighbors import (
    DEFAULT_K,
    SCORE_NAMES,
    describe_index,
    find_neighbors,
    format_neighbors,
    index_metric,
    indexed_neighbors,
    open_index,
)
from pipeline.analysis.plot import MATPLOTLIB_MISSING, plot_pca
from pipeline.errors import EXIT_CONFIG_ERROR, ExportConfigError
from pipeline.uris import is_local
from pipeline.writing.layout import MANIFEST, STAGING, TABLES_DIR
from pipeline.writing.schema import VECTOR_COLUMN, VOCABULARY_FILE

DEFAULT_PLOT = "plot.png"
DEFAULT_NEIGHBORS_OUT = "neighbors.parquet"


def non_negative_int(text: str) -> int:
    """argparse type of --seed: numpy's generators take seeds of 0 and up."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 0, received {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command's parser: OUTPUT_DIR, then one of the commands and its flags."""
    parser = CommandParser(
        prog="python -m pipeline.analyze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m pipeline.analyze OUT neighbors --id json.dumps --column lstm_content -k 10\n"
        "  python -m pipeline.analyze VOCAB_DIR neighbors --word socket\n"
        "  python -m pipeline.analyze OUT plot --column lstm_title --label topic --out plot.png\n"
        "  python -m pipeline.analyze OUT knn-score --column lstm_title --label topic\n"
        "  python -m pipeline.analyze OUT index --column lstm_content\n"
        "  python -m pipeline.analyze OUT neighbors --queries ids.txt --column lstm_content --out n.parquet",
    )
    parser.add_argument(
        "directory",
        metavar="OUTPUT_DIR",
        help="The --output of `python -m pipeline.run` (of `pipeline.vocabulary` for --word).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sampled = CommandParser(add_help=False)
    sampled.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        help="Work on a uniform random sample of at most this many rows, read in one streaming pass, "
        "so memory stays bounded whatever the export's size (default: %(default)s).",
    )
    sampled.add_argument(
        "--seed", type=non_negative_int, default=DEFAULT_SEED, help="Sample seed (default: %(default)s)."
    )
    column_help = "Vector column to use (default: the first vector column; 'vector' in a vocabulary)."

    neighbors = commands.add_parser(
        "neighbors",
        help="nearest neighbours (cosine) of a document or a word",
        description="Nearest neighbours by cosine similarity (or --metric), through the column's index "
        "where it has one, else in one streaming pass over the dataset with a running top-k (the data is "
        "never loaded whole).",
    )
    query = neighbors.add_mutually_exclusive_group(required=True)
    query.add_argument("--id", help="Document id in an export of `python -m pipeline.run`.")
    query.add_argument(
        "--word",
        help=f"Token in the {VOCABULARY_FILE} of `python -m pipeline.vocabulary`, or in the "
        f"{TABLES_DIR}/ table of an export made with --token_storage ids.",
    )
    query.add_argument(
        "--queries",
        metavar="FILE",
        help="Batch mode: many queries from a file (.txt: one id or word a line; .npy: an (n, dim) "
        "array of vectors; .parquet: a vector column, or an 'id' column), answered into --out.",
    )
    neighbors.add_argument("--column", default=None, help=column_help)
    neighbors.add_argument(
        "-k", type=int, default=DEFAULT_K, help="Neighbours to list (default: %(default)s)."
    )
    neighbors.add_argument(
        "--exact",
        action="store_true",
        help="Scan every row even when the column has an index (python -m pipeline.analyze OUT index); "
        "the ranking is the index's own metric, so --exact answers the same question exactly.",
    )
    neighbors.add_argument(
        "--metric",
        choices=sorted(index_build.METRICS),
        default=None,
        help="cos: cosine similarity; ip: dot product; l2: Euclidean distance (default: the metric of "
        f"the column's index, {DEFAULT_METRIC} where it has none). Another than the index's scans every row.",
    )
    neighbors.add_argument(
        "--out",
        default=DEFAULT_NEIGHBORS_OUT,
        help="Parquet file batch mode (--queries) writes: query, rank, id, score, kept fields, problem "
        "(default: %(default)s). Never inside an export or vocabulary directory.",
    )
    neighbors.add_argument("--overwrite", action="store_true", help="Replace an existing --out file.")

    plot = commands.add_parser(
        "plot",
        parents=[sampled],
        help="PNG of a 2-D PCA projection coloured by a label",
        description="2-D PCA projection of a vector column, coloured by a label field, as a PNG. "
        f"Uses a random sample of at most --sample rows (default {DEFAULT_SAMPLE}).",
    )
    plot.add_argument("--column", default=None, help=column_help)
    plot.add_argument("--label", default=None, help="String field (from --keep_fields) giving the colours.")
    plot.add_argument(
        "--out",
        default=DEFAULT_PLOT,
        help="PNG file to write (default: %(default)s). Never inside an export or vocabulary directory.",
    )
    plot.add_argument("--overwrite", action="store_true", help="Replace an existing --out file.")

    knn = commands.add_parser(
        "knn-score",
        parents=[sampled],
        help="k-nearest-neighbour label agreement vs chance",
        description="Fraction of each row's k nearest neighbours (cosine) sharing its label, averaged, "
        "against chance (the sum of squared class frequencies). Uses a random sample of at most "
        f"--sample labelled rows (default {DEFAULT_SAMPLE}); neighbours are searched within the sample.",
    )
    knn.add_argument("--column", default=None, help=column_help)
    knn.add_argument("--label", required=True, help="String field (kept with --keep_fields) to score.")
    knn.add_argument("-k", type=int, default=DEFAULT_K, help="Number of neighbours (default: %(default)s).")
    knn.add_argument(
        "--all",
        action="store_true",
        help="Score every labelled row of the export, its neighbours found through the column's index "
        "(build it first with the index command) instead of a sample.",
    )

    build = commands.add_parser(
        "index",
        help="build an approximate-nearest-neighbour index of a vector column, and measure its recall",
        description="Builds an HNSW index (usearch) of a vector column of a finished export (or of a "
        "vocabulary, or of the token table of an export of token ids: --column vector), streaming the "
        "Parquet files in record batches, into OUTPUT_DIR/_index/COLUMN.usearch "
        "with COLUMN.json: its SHA-256, the export's manifest SHA-256 it belongs to, and its recall@k "
        "against the exact scan on a random sample of rows, build time, size and peak memory. "
        "`neighbors` and `knn-score --all` then use it. Needs " + INSTALL_HINT + ".",
    )
    build.add_argument("--column", default=None, help=column_help)
    build.add_argument(
        "--metric",
        choices=sorted(index_build.METRICS),
        default=DEFAULT_METRIC,
        help="cos: cosine similarity (what `neighbors` ranks by); ip: dot product; l2: Euclidean "
        "distance (default: %(default)s).",
    )
    build.add_argument(
        "--connectivity",
        type=int,
        default=index_build.DEFAULT_CONNECTIVITY,
        help="HNSW edges per node (M); more: better recall, bigger index (default: %(default)s).",
    )
    build.add_argument(
        "--expansion_add",
        type=int,
        default=index_build.DEFAULT_EXPANSION_ADD,
        help="Candidates considered when inserting (efConstruction) (default: %(default)s).",
    )
    build.add_argument(
        "--expansion_search",
        type=int,
        default=index_build.DEFAULT_EXPANSION_SEARCH,
        help="Candidates considered per query (ef); more: better recall, slower queries "
        "(default: %(default)s).",
    )
    build.add_argument(
        "--recall_queries",
        type=int,
        default=index_build.DEFAULT_RECALL_QUERIES,
        help="Random rows used as queries to measure recall@k against the exact scan; 0 skips it "
        "(default: %(default)s).",
    )
    build.add_argument(
        "--recall_k",
        type=int,
        default=index_build.DEFAULT_RECALL_K,
        help="k of recall@k (default: %(default)s).",
    )
    build.add_argument(
        "--seed",
        type=non_negative_int,
        default=DEFAULT_SEED,
        help="Seed of the recall sample (default: %(default)s).",
    )
    build.add_argument(
        "--threads", type=int, default=0, help="Threads to build with; 0: all cores (default: %(default)s)."
    )
    return parser


def check_out_file(path: str, overwrite: bool) -> str:
    """Refuses an --out that would replace something, or that cannot be written; returns the path to write.

    Refused: a file (without --overwrite), a directory or link, a path inside an
    export or vocabulary directory (whose files its commands own) once links and
    `file://` are resolved, and a parent directory that is missing or not writable.
    On object storage: an existing object (without --overwrite) and a path below
    a prefix that holds an export's or vocabulary's marker.

    Returns:
        The path to write: local ones with `file://` stripped and the directory's links resolved,
        so the file lands where it was checked.

    Raises:
        AnalysisError: saying what is there and what to do.
    """
    if not is_local(path):
        if path.endswith("/"):
            raise AnalysisError(f"--out {path!r} names a directory, not a file: choose a file path.")
        bucket = _check_remote_out_path(path)
        for prefix in _remote_parents(path):
            marker = _export_marker(prefix)
            if marker:
                raise AnalysisError(
                    f"--out {path!r} is inside {prefix!r}, an export or vocabulary directory (it holds "
                    f"{marker}), whose files only its own commands write: choose a path outside it."
                )
        _check_remote_out_target(path, bucket, overwrite)
        return path
    local = urllib.parse.unquote(urllib.parse.urlsplit(path).path) if path.startswith("file:") else path
    if not local:
        raise AnalysisError(f"--out {path!r} is an empty path: give the path of a file to write.")
    if local.endswith(os.sep):
        raise AnalysisError(f"--out {path!r} names a directory, not a file: choose a file path.")
    requested_parent = os.path.dirname(os.path.abspath(local))
    if not os.path.isdir(requested_parent):
        raise AnalysisError(
            f"--out {path!r}: the directory {requested_parent!r} does not exist; create it first, "
            "or choose a path in an existing directory."
        )
    # Links in the directory part are resolved: a link into an export is inside the export.
    parent = os.path.realpath(requested_parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AnalysisError(f"--out {path!r}: the directory {parent!r} is not writable; choose another.")
    resolved = os.path.join(parent, os.path.basename(local))
    directory = parent
    while True:
        for marker in (MANIFEST, STAGING, VOCABULARY_FILE):
            if os.path.lexists(os.path.join(directory, marker)):
                raise AnalysisError(
                    f"--out {path!r} is inside {directory!r}, an export or vocabulary directory (it holds "
                    f"{marker}), whose files only its own commands write: choose a path outside it."
                )
        if os.path.dirname(directory) == directory:
            break
        directory = os.path.dirname(directory)
    if os.path.islink(resolved) or (os.path.lexists(resolved) and not os.path.isfile(resolved)):
        what = file_kind(os.lstat(resolved).st_mode)
        raise AnalysisError(f"--out {path!r} is {what}, not a regular file: choose a file path.")
    if os.path.exists(resolved) and not overwrite:
        raise AnalysisError(f"--out {path!r} already exists; pass --overwrite to replace it.")
    return resolved


def check_out_is_not_queries(out: str, queries: str) -> None:
    """Refuses a batch --out that is the --queries file itself: the answer would replace the queries.

    "already exists; pass --overwrite" would lead the user to destroy their input, so this comes first.
    """
    if not (is_local(out) and is_local(queries)):
        return
    paths = [
        urllib.parse.unquote(urllib.parse.urlsplit(p).path) if p.startswith("file:") else p
        for p in (out, queries)
    ]
    try:
        same = os.path.samefile(paths[0], paths[1])
    except OSError:  # One of them does not exist (yet): nothing to replace.
        return
    if same:
        raise AnalysisError(
            f"--out {out!r} is the --queries file: the answer would replace the queries; "
            "choose another --out."
        )


def check_out_is_not_data(out: str, location: str) -> None:
    """Refuses an --out that is the data the command reads, or inside it: OUTPUT_DIR given as one Parquet
    file, or a directory read as an export (a directory of row files without a `_MANIFEST.json` has
    none of the markers `check_out_file` looks for). With --overwrite the answer would replace the rows.
    """
    if is_local(out) != is_local(location):
        return
    if not is_local(out):
        base = location.rstrip("/")
        if (out == base or out.startswith(base + "/")) and not _export_marker(base):
            # An export's or vocabulary's prefix is `check_out_file`'s to refuse, naming what it holds.
            raise AnalysisError(
                f"--out {out!r} is inside OUTPUT_DIR {location!r}, the data this command reads: "
                "choose a path outside it."
            )
        return
    out_path, data_path = (
        urllib.parse.unquote(urllib.parse.urlsplit(p).path) if p.startswith("file:") else p
        for p in (out, location)
    )
    if not out_path or not data_path:
        return
    resolved_out = os.path.join(
        os.path.realpath(os.path.dirname(os.path.abspath(out_path))), os.path.basename(out_path)
    )
    resolved_data = os.path.realpath(data_path)
    holder = resolved_data if os.path.isdir(resolved_data) else os.path.dirname(resolved_data)
    if any(os.path.lexists(os.path.join(holder, marker)) for marker in (MANIFEST, STAGING, VOCABULARY_FILE)):
        return  # An export's or vocabulary's directory: `check_out_file` refuses all of it, and says so.
    if os.path.isdir(resolved_data):
        inside = resolved_out.startswith(resolved_data.rstrip(os.sep) + os.sep)
    else:
        try:
            inside = os.path.samefile(resolved_out, resolved_data)
        except OSError:  # --out does not exist (yet), or OUTPUT_DIR does not: nothing read is replaced.
            inside = False
    if inside:
        what = "inside OUTPUT_DIR" if os.path.isdir(resolved_data) else "the OUTPUT_DIR file"
        raise AnalysisError(
            f"--out {out!r} is {what} {location!r}, the data this command reads: the answer would "
            "replace its rows; choose a path outside it."
        )


def _check_remote_out_path(path: str) -> str:
    """Refuses an object-store --out that names a bucket or has an empty part (`s3://b//f`); returns
    its bucket.  Beam's S3 client retries a bucket's root for minutes; pyarrow cannot upload either."""
    _, _, rest = path.partition("://")
    bucket, _, key = rest.partition("/")
    if not key:
        raise AnalysisError(f"--out {path!r} names a bucket, not a file: choose a file path in it.")
    if "" in key.split("/"):
        raise AnalysisError(f"--out {path!r} has an empty part between two '/': remove the extra '/'.")
    return bucket


def _check_remote_out_target(path: str, bucket: str, overwrite: bool) -> None:
    """Refuses an object-store --out in a bucket that does not exist, one that is a directory (objects
    under PATH/), and without --overwrite an existing object: before any row is read, as pyarrow (which
    uploads the answer) sees the store, at the key as typed: `write_answer` uploads there (pyarrow's URI
    parser would check `a%20b.csv` as another key, `a b.csv`, and refuse a space)."""
    try:
        filesystem, where = uri_filesystem(path)
        found = filesystem.get_file_info([bucket, where])
    except (pa.ArrowException, OSError) as error:
        raise AnalysisError(f"--out {path!r} cannot be checked: {error}") from None
    if found[0].type == pafs.FileType.NotFound:
        raise AnalysisError(
            f"--out {path!r}: the bucket {bucket!r} does not exist (or these credentials cannot see it); "
            "create it first, or choose a path in an existing bucket."
        )
    if found[1].type == pafs.FileType.Directory:
        raise AnalysisError(
            f"--out {path!r} is a directory (it holds objects), not a file: choose a file path."
        )
    if found[1].type == pafs.FileType.File and not overwrite:
        raise AnalysisError(f"--out {path!r} already exists; pass --overwrite to replace it.")


def _remote_parents(path: str) -> list[str]:
    """The prefixes above an object-store path, nearest first, down to its bucket: `s3://b/x/y/f` gives
    `s3://b/x/y`, `s3://b/x`, `s3://b`."""
    scheme, _, rest = path.partition("://")
    parts = rest.split("/")
    return [f"{scheme}://{'/'.join(parts[:end])}" for end in range(len(parts) - 1, 0, -1)]


def _export_marker(prefix: str) -> str | None:
    """What makes the object-store prefix an export or vocabulary directory (as locally: a manifest, a
    staging area, a vocabulary file), or None."""
    for marker in (MANIFEST, VOCABULARY_FILE):
        if FileSystems.exists(FileSystems.join(prefix, marker)):
            return marker
    try:
        staged = FileSystems.match([FileSystems.join(prefix, STAGING, "**")], limits=[1])[0].metadata_list
    except Exception:  # No object matches: Beam's S3 match raises on some versions.
        staged = []
    return f"{STAGING}/" if staged else None


def check_plot_format(path: str) -> None:
    """Refuses a plot --out whose extension matplotlib cannot write, before any row is read.

    Raises:
        AnalysisError: that extension, or matplotlib not installed (a plain `pip install .`), which
            was a ModuleNotFoundError traceback here, before `plot_pca`'s own refusal.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalysisError(MATPLOTLIB_MISSING) from None

    supported = Figure().canvas.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in supported:
        raise AnalysisError(
            f"--out {path!r}: matplotlib cannot write {extension or 'a file without extension'!r} images; "
            f"end it with one of {', '.join('.' + name for name in sorted(supported))} (.png is the default)."
        )


def queries_are_words(directory: str, column: str | None) -> bool:
    """Whether batch queries on `directory` look up words: a vocabulary, or an export whose token table
    is meant (`means_token_table`), as for --word."""
    if data_is_vocabulary(directory):
        return True
    return means_token_table(open_documents(directory), column)


def means_token_table(data: VectorDataset, column: str | None) -> bool:
    """Whether a command on the export `data` means its token table (`--token_storage ids`): its rows
    have no vector column (the table holds the only vectors), or --column names the table's `vector`
    column, which its rows do not have (an export of token ids and of a pooled layer)."""
    if data.holds != "documents":
        return False
    if column is None:
        wanted = not vector_columns(data.schema)
    else:
        wanted = column == VECTOR_COLUMN and column not in data.schema.names
    return wanted and has_token_tables(data.location)


def run_command(args: argparse.Namespace) -> str:
    """Runs the parsed command; returns the text to print."""
    out = ""
    if args.command == "plot" or (args.command == "neighbors" and args.queries is not None):
        if args.command == "neighbors":
            check_out_is_not_queries(args.out, args.queries)
        check_out_is_not_data(args.out, args.directory)
        # Before any row is read: a path that cannot be written fails now, not after the work.
        out = check_out_file(args.out, args.overwrite)
        if args.command == "plot":
            check_plot_format(out)
    if args.command == "index":
        data = open_documents_or_vocabulary(args.directory)
        if means_token_table(data, args.column):
            # An export of token ids: its table is what `neighbors --word` searches.
            index_build.check_one_token_table(args.directory)
            data = open_vocabulary(args.directory)
        column = args.column or (VECTOR_COLUMN if data.holds == "vocabulary" else None)
        settings = index_build.IndexSettings(
            metric=args.metric,
            connectivity=args.connectivity,
            expansion_add=args.expansion_add,
            expansion_search=args.expansion_search,
            recall_queries=args.recall_queries,
            recall_k=args.recall_k,
            seed=args.seed,
            threads=args.threads,
        )
        metadata = index_build.build_index(data, column, settings)
        return index_build.format_build(metadata, args.directory)
    if args.command == "neighbors":
        if args.word is not None or (
            args.queries is not None and queries_are_words(args.directory, args.column)
        ):
            data, key = open_vocabulary(args.directory), args.word
            column = args.column or VECTOR_COLUMN
        else:
            data, key, column = open_documents(args.directory), args.id, args.column
        column = check_vector_column(data, column)
        # --exact answers the index's question exactly: by its metric, not cosine whatever it is.
        recorded = index_metric(data, column)
        metric = args.metric or recorded or DEFAULT_METRIC
        loaded = open_index(data, column, args.exact or metric != (recorded or metric))
        scanned = f"By an exact scan of every row ({SCORE_NAMES[metric]})."
        if loaded is None and recorded is not None and recorded != metric:
            scanned += (
                f" The index of {column} ranks by {SCORE_NAMES[recorded]}: build one with --metric {metric} "
                "to search by this metric."
            )
        if args.queries is not None:
            answer = batch_neighbors(
                data, column, args.queries, out, args.k, loaded, overwrite=args.overwrite, metric=metric
            )
            how = describe_index(loaded, data) if loaded is not None else scanned
            short = (
                f", {answer.short} answered with fewer neighbours than asked (the index could not reach "
                "them; --exact finds them all)"
                if answer.short
                else ""
            )
            return (
                f"Wrote {args.out}: {answer.queries} queries, {answer.unanswered} of them unanswered{short} "
                f"(see its problem column).\n{how}"
            )
        if loaded is None:
            neighbors, compared = find_neighbors(data, key, column, args.k, metric=metric)
            table = format_neighbors(data, key, column, neighbors, compared, metric)
            return table if recorded in (None, metric) else table + "\n" + scanned
        neighbors, compared = indexed_neighbors(data, loaded, key, args.k)
        table = format_neighbors(data, key, column, neighbors, compared, loaded.metric, indexed=True)
        wanted = min(args.k, compared - 1)
        if len(neighbors) < wanted:
            # An approximate graph can leave rows unreachable; a short list must not pass for the top k.
            table += (
                f"\nThe index found {len(neighbors)} of the {wanted} neighbours asked for; --exact finds "
                "them all (or rebuild it with higher --connectivity / --expansion_search)."
            )
        return table + "\n" + describe_index(loaded, data)
    data = open_documents(args.directory)
    if args.command == "plot":
        path, rows, total, explained = plot_pca(
            data, args.column, args.label, out, sample=args.sample, seed=args.seed, overwrite=args.overwrite
        )
        return (
            f"Wrote {path}: PCA of {rows} of {total} rows, explaining "
            f"{explained[0]:.1%} + {explained[1]:.1%} of the variance."
        )
    column = check_vector_column(data, args.column)
    if args.all:
        loaded = open_index(data, column)
        if loaded is None:
            raise AnalysisError(
                f"knn-score --all needs an index of {column!r}: build it with `python -m pipeline.analyze "
                f"{args.directory} index --column {column}`, or leave --all out to score a sample."
            )
        score = knn_score_indexed(data, loaded, args.label, args.k)
        how = describe_index(loaded, data, instead="leave --all out to score a sample instead")
        return how + "\n" + format_knn_score(column, args.label, score, score.rows, loaded.metric)
    score, total = knn_score(data, column, args.label, args.k, args.sample, args.seed)
    return format_knn_score(column, args.label, score, total)


def key_not_utf8(args: argparse.Namespace) -> str | None:
    """Why the --id or --word given cannot be any row's key (bytes that are not UTF-8: a terminal of
    another encoding), else None. Parquet keys are UTF-8; pyarrow's comparison was a traceback."""
    for flag, value in (("--id", getattr(args, "id", None)), ("--word", getattr(args, "word", None))):
        if value is None:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            received = value.encode("utf-8", "surrogateescape")
            return (
                f"{flag} {received!r} is not UTF-8 text (the terminal passed bytes of another encoding), "
                "and every id and word of an export is UTF-8: set the terminal to UTF-8 (e.g. "
                "LANG=C.UTF-8), or put the key in a UTF-8 .txt file and pass it as --queries."
            )
    return None


def read_failure(args: argparse.Namespace, error: OSError | pa.ArrowException) -> AnalysisError:
    """The one-line error for a file that failed while the command read (or wrote) it.

    A run that commits an --overwrite over the export deletes the row files the
    new export does not replace; a read that reaches one then fails: that is the
    export changing while it was read (`check_read_unchanged` says so).  Anything
    else (a disk or network error) is named as it is.
    """
    check_read_unchanged()
    out = getattr(args, "out", None)
    writes_out = bool(out and (args.command == "plot" or getattr(args, "queries", None)))
    written = f" or writing --out {out!r}" if writes_out else ""
    if writes_out and (
        (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT))
        or "No space left on device" in str(error)
    ):
        # Reading never fills a disk: the answer being written out did.
        return AnalysisError(
            f"Writing --out {out!r} failed: its disk is full ({error}); nothing was written there. Free "
            "space, or choose an --out on another disk, and run the command again."
        )
    return AnalysisError(
        f"Reading {args.directory!r}{written} failed: {error} Check that it is readable (on object "
        "storage, the connection and credentials) and run the command again."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (EXIT_CONFIG_ERROR for an AnalysisError)."""
    args = build_parser().parse_args(argv)
    paths = {"OUTPUT_DIR": args.directory, "--out": getattr(args, "out", None)}
    paths["--queries"] = getattr(args, "queries", None)
    refused = removed_working_directory() or unexpanded_home(paths) or key_not_utf8(args)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        object_storage.configure_for({**paths, "--queries": getattr(args, "queries", None)})
    except ExportConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    forget_opened()
    try:
        try:
            answer = run_command(args)
        except FileExistsError:
            raise
        except (OSError, pa.ArrowException) as error:
            raise read_failure(args, error) from None
        check_read_unchanged()
        print(answer)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except FileExistsError as error:  # --out appeared while the command ran (write_whole_local)
        print(f"error: --out {error.filename!r}: {error.strerror}.", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(stopping.run("python -m pipeline.analyze", main))
