"""Command line: `python -m pipeline.analyze OUTPUT_DIR COMMAND` queries, plots and scores exported vectors.

Commands:
  neighbors   the k nearest neighbours (cosine similarity) of one document
              (--id) of an export, or of one word (--word) of a
              `python -m pipeline.vocabulary` output or of the table an
              export with --token_storage ids wrote
  plot        a PNG of the 2-D PCA projection of a vector column, coloured by
              a label field kept with --keep_fields
  knn-score   the fraction of each document's k nearest neighbours that share
              its label, averaged, against the chance level
  index       an approximate-nearest-neighbour index of a vector column, with
              its recall@k measured against the exact scan (pipeline/analysis/index.py)

The Parquet files are read with pyarrow.dataset, which reads only the columns
and row groups a query needs and streams record batches.  `neighbors` keeps a
running top-k, so it never holds more than one batch of vectors whatever the
size of the export; `plot` and `knn-score` draw a uniform random sample of at
most --sample rows and work on that in memory.  Where a column has an index,
`neighbors` (one query, or a batch from --queries) and `knn-score --all` search
it instead (`--exact` scans).
"""

import argparse
import collections
import dataclasses
import logging
import os
import posixpath
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.analysis import index as index_lib
from pipeline.errors import EXIT_CONFIG_ERROR, ExportConfigError
from pipeline.writing.output import JOURNAL, MANIFEST, SHARD_PREFIX, TABLES_DIR, finish_interrupted_commit
from pipeline.writing.schema import (
    FINGERPRINT_COLUMN,
    ID_COLUMN,
    TOKEN_COLUMN,
    TOKEN_ID_COLUMN,
    VECTOR_COLUMN,
    VOCABULARY_FILE,
)

DEFAULT_K = 10
DEFAULT_SAMPLE = 20_000
DEFAULT_SEED = 0
DEFAULT_PLOT = "plot.png"
DEFAULT_NEIGHBORS_OUT = "neighbors.parquet"
# Rows per scanned batch: 16k rows of 300 float32 values are about 20 MB.
BATCH_ROWS = 16_384
# Rows of the sample compared with all others at once by knn-score: 1k x 20k floats.
KNN_CHUNK_ROWS = 1024
# Beyond this many label values the smallest share one "other" colour.
MAX_PLOT_CLASSES = 20
OTHER_LABEL = "(other)"
MISSING_LABEL = "(missing)"


class AnalysisError(ValueError):
    """An input directory, column, id or option cannot be analysed; says how to fix it."""


@dataclasses.dataclass(frozen=True)
class VectorDataset:
    """The Parquet files of one export, read as one dataset.

    `key_column` names a row ("id" for documents, "token" for a vocabulary);
    `detail_columns` are shown next to it (kept label fields, token ids).
    """

    location: str
    holds: str  # "documents" (an export) or "vocabulary"
    dataset: ds.Dataset
    key_column: str
    detail_columns: tuple

    @property
    def schema(self):
        return self.dataset.schema

    def filesystem_and_directory(self):
        """(pyarrow filesystem, path) of `location`, where `_index/` lives."""
        return _filesystem(self.location)


@dataclasses.dataclass(frozen=True)
class Neighbor:
    """One nearest neighbour: its key, cosine similarity and detail column values."""

    key: str
    similarity: float
    details: dict


@dataclasses.dataclass(frozen=True)
class KnnScore:
    """The result of `score_label_agreement`."""

    agreement: float
    chance: float
    rows: int
    k: int
    per_class: dict  # label -> (rows, mean agreement)


def _filesystem(location):
    """(pyarrow filesystem, path) for a local path or a URI (gs://, s3://, ...)."""
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise AnalysisError(f"Cannot open {location!r}: {error}") from None
    return pafs.LocalFileSystem(), os.path.abspath(location)


def _finish_commit(location):
    """Finishes a commit into the export `location` that a crash cut short, so it is read whole.

    Raises:
        AnalysisError: the commit cannot be finished from here (another run holds
            the output, it is read-only, or its journal is damaged).
    """
    try:
        if finish_interrupted_commit(location):
            logging.warning("Finished the interrupted commit of the export in %s first.", location)
    except (ExportConfigError, OSError) as error:
        raise AnalysisError(
            f"{location!r} holds a commit that was not finished ({JOURNAL}), and it cannot be finished "
            f"from here: {error} Rerun the export (or this command) where the output is writable; "
            "until then its files are a mix of two exports."
        ) from None


def _list_parquet(location, wanted, how_to_make):
    """Paths of the Parquet files directly in `location` whose name `wanted` accepts.

    A path to a single .parquet file is accepted as is.
    """
    _finish_commit(location)
    filesystem, path = _filesystem(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise AnalysisError(f"{location!r} does not exist; pass the --output directory of {how_to_make}.")
    if info.type == pafs.FileType.File:
        return filesystem, [path]
    # Not recursive: errors/ holds dead letters with another schema, and _staging/ unfinished runs.
    entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    files = sorted(
        e.path for e in entries if e.type == pafs.FileType.File and wanted(posixpath.basename(e.path))
    )
    return filesystem, files


def _is_file(filesystem, path):
    return filesystem.get_file_info(path).type == pafs.FileType.File


def open_documents(location):
    """Opens the rows (`part-*.parquet`) of a `python -m pipeline.run` export.

    Raises:
        AnalysisError: `location` does not exist or holds no row files.
    """
    filesystem, files = _list_parquet(
        location,
        lambda name: name.startswith(SHARD_PREFIX) and name.endswith(".parquet"),
        "`python -m pipeline.run`",
    )
    directory = _filesystem(location)[1]
    if not files:
        hint = ""
        if _is_file(filesystem, posixpath.join(directory, VOCABULARY_FILE)):
            hint = " It holds a vocabulary export: query it with `neighbors --word WORD`."
        raise AnalysisError(
            f"{location!r} holds no {SHARD_PREFIX}*.parquet files, so it is not the --output of "
            f"`python -m pipeline.run`.{hint}"
        )
    is_directory = filesystem.get_file_info(directory).type == pafs.FileType.Directory
    if is_directory and not _is_file(filesystem, posixpath.join(directory, MANIFEST)):
        logging.warning(
            "%s has no %s: the export did not finish, so results may be partial.", location, MANIFEST
        )
    dataset = ds.dataset(files, filesystem=filesystem, format="parquet")
    if ID_COLUMN not in dataset.schema.names:
        raise AnalysisError(f"{location!r} has no {ID_COLUMN!r} column, so it is not an export of this tool.")
    # Kept fields are the details worth showing; the fingerprint is not.
    details = tuple(
        f.name
        for f in dataset.schema
        if f.name not in (ID_COLUMN, FINGERPRINT_COLUMN) and pa.types.is_string(f.type)
    )
    return VectorDataset(location, "documents", dataset, ID_COLUMN, details)


def _token_tables(location):
    """(filesystem, paths) of the tables in `location`'s `_tables/` (`--token_storage ids`)."""
    _finish_commit(location)
    filesystem, directory = _filesystem(location)
    tables = posixpath.join(directory, TABLES_DIR)
    if filesystem.get_file_info(tables).type != pafs.FileType.Directory:
        return filesystem, []
    entries = filesystem.get_file_info(pafs.FileSelector(tables, recursive=False))
    return filesystem, sorted(e.path for e in entries if e.path.endswith(".parquet"))


def open_vocabulary(location):
    """Opens the word vectors of `location`: a vocabulary output, a table file, or an export's table.

    `location` is the --output of `python -m pipeline.vocabulary`, a
    vocabulary-format file, or the --output of `python -m pipeline.run
    --token_storage ids` with one table (with several, pass the table file).

    Raises:
        AnalysisError: `location` does not exist or holds no vocabulary file.
    """
    filesystem, files = _list_parquet(
        location, lambda name: name == VOCABULARY_FILE, "`python -m pipeline.vocabulary`"
    )
    if not files:
        filesystem, files = _token_tables(location)
        if len(files) > 1:
            choices = ", ".join(posixpath.join(location, TABLES_DIR, posixpath.basename(f)) for f in files)
            raise AnalysisError(
                f"{location!r} holds {len(files)} token tables; pass one of them instead: {choices}."
            )
    if not files:
        raise AnalysisError(
            f"{location!r} holds no {VOCABULARY_FILE}. Write one with `python -m pipeline.vocabulary "
            f"--layer emb --output {location}`, or query documents of an export with --id."
        )
    dataset = ds.dataset(files, filesystem=filesystem, format="parquet")
    missing = {TOKEN_ID_COLUMN, TOKEN_COLUMN, VECTOR_COLUMN} - set(dataset.schema.names)
    if missing:
        raise AnalysisError(
            f"{files[0]} lacks the column(s) {sorted(missing)}; rewrite it with "
            "`python -m pipeline.vocabulary`."
        )
    return VectorDataset(location, "vocabulary", dataset, TOKEN_COLUMN, (TOKEN_ID_COLUMN,))


def _is_list_type(arrow_type):
    return (
        pa.types.is_fixed_size_list(arrow_type)
        or pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
    )


def _is_vector_type(arrow_type):
    return _is_list_type(arrow_type) and pa.types.is_floating(arrow_type.value_type)


def vector_columns(schema):
    """Names of the columns holding one vector (a list of floats) per row."""
    return [field.name for field in schema if _is_vector_type(field.type)]


def check_vector_column(data, column):
    """Returns `column`, or the first vector column if it is None; raises AnalysisError if unusable."""
    available = vector_columns(data.schema)
    listed = ", ".join(available) or "none"
    if column is None:
        if not available:
            raise AnalysisError(f"{data.location!r} has no vector column (a list of floats per row).")
        return available[0]
    if column not in data.schema.names:
        raise AnalysisError(
            f"{data.location!r} has no column {column!r}. Its vector columns are: {listed}; "
            "pass one as --column."
        )
    arrow_type = data.schema.field(column).type
    if _is_list_type(arrow_type) and pa.types.is_integer(arrow_type.value_type):
        raise AnalysisError(
            f"Column {column!r} holds the token ids of each document (exported with --token_storage "
            f"ids), not one vector per row; the vectors of the tokens are in {TABLES_DIR}/. Query "
            f"words with `neighbors --word WORD` on this directory, pick a vector column ({listed}), "
            "or re-export the layer with --pooling mean."
        )
    if _is_list_type(arrow_type) and _is_vector_type(arrow_type.value_type):
        raise AnalysisError(
            f"Column {column!r} holds one vector per token (exported with --pooling none), not one per "
            f"row. Pick a pooled column ({listed}) or re-export it with --pooling mean."
        )
    if not _is_vector_type(arrow_type):
        raise AnalysisError(
            f"Column {column!r} is {arrow_type}, not a vector; its vector columns are: {listed}."
        )
    return column


def check_label_column(data, label):
    """Raises AnalysisError unless `label` is a string column of `data`."""
    if label in data.schema.names and pa.types.is_string(data.schema.field(label).type):
        return label
    candidates = ", ".join(data.detail_columns) or "none (export with --keep_fields FIELD,...)"
    raise AnalysisError(
        f"{data.location!r} has no label column {label!r}; its label columns are: {candidates}."
    )


def vectors_to_numpy(array):
    """An Arrow list-of-floats array (no null rows) as an (n, dim) float numpy array."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    rows = len(array)
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
    else:
        lengths = np.unique(pc.list_value_length(array).to_numpy(zero_copy_only=False))
        if len(lengths) > 1:
            raise AnalysisError(
                f"The vectors have different lengths {lengths.tolist()}; cannot compare them."
            )
        dim = int(lengths[0]) if rows else 0
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(rows, dim)


def _unit_rows(matrix):
    """Rows scaled to length 1; all-zero rows stay zero (similarity 0 to everything)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)


def _suggest_keys(data, key):
    """A sentence naming up to 5 keys that contain `key`, ignoring case."""
    expression = pc.match_substring(pc.field(data.key_column), key, ignore_case=True)
    close = data.dataset.head(5, columns=[data.key_column], filter=expression)[data.key_column].to_pylist()
    noun = "Ids" if data.holds == "documents" else "Words"
    return f" {noun} containing it: {', '.join(map(repr, close))}." if close else ""


def query_vector(data, key, column):
    """The vector of the row whose key is `key`.

    Raises:
        AnalysisError: no row has that key, or its vector is missing or all zeros.
    """
    found = data.dataset.to_table(columns=[column], filter=pc.field(data.key_column) == key)
    noun = "document id" if data.holds == "documents" else "word"
    if found.num_rows == 0:
        raise AnalysisError(f"No row of {data.location!r} has the {noun} {key!r}.{_suggest_keys(data, key)}")
    if found.num_rows > 1:
        logging.warning("%d rows have the %s %r; using the first.", found.num_rows, noun, key)
    if not found[column][0].is_valid:
        raise AnalysisError(f"The {noun} {key!r} has no {column!r} vector (it is null).")
    vector = vectors_to_numpy(found[column].slice(0, 1))[0].astype(np.float64)
    if not np.isfinite(vector).all():
        raise AnalysisError(f"The {noun} {key!r} has NaN or infinite values in its {column!r} vector.")
    if not np.any(vector):
        raise AnalysisError(
            f"The {noun} {key!r} has an all-zero {column!r} vector, so its cosine similarity is undefined."
        )
    return vector


def find_neighbors(data, key, column, k=DEFAULT_K, batch_rows=BATCH_ROWS):
    """The `k` rows most cosine-similar to row `key` in `column`, best first.

    Streams the dataset in batches of at most `batch_rows` rows and keeps a
    running top-k, so memory does not grow with the dataset.  Rows with the
    query's own key, a null key or a null vector are skipped; ties are broken by
    key.

    Returns:
        `(neighbors, compared)`: a list of `Neighbor`s and how many rows were compared.
    """
    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    column = check_vector_column(data, column)
    query = query_vector(data, key, column)
    query /= np.linalg.norm(query)
    scanner = data.dataset.scanner(
        columns=[data.key_column, column, *data.detail_columns],
        filter=(pc.field(data.key_column) != key) & pc.field(column).is_valid(),
        batch_size=batch_rows,
        batch_readahead=2,
        fragment_readahead=1,
    )
    best_similarities, best_keys, best_details = np.empty(0), [], []
    compared = 0
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        vectors = vectors_to_numpy(batch.column(column)).astype(np.float64)
        # A vector with NaN or infinite values has no similarity; left in, NaN would break the ranking.
        finite = np.isfinite(vectors).all(axis=1)
        compared += int(finite.sum())
        with np.errstate(invalid="ignore"):
            similarities = np.where(
                finite, _unit_rows(np.where(finite[:, None], vectors, 0)) @ query, -np.inf
            )
        # Every row tied with the k-th best goes on, so the key breaks ties, not the scan order.
        if len(similarities) > k:
            threshold = np.partition(similarities, len(similarities) - k)[len(similarities) - k]
            chosen = np.flatnonzero((similarities >= threshold) & finite)
        else:
            chosen = np.flatnonzero(finite)
        indices = pa.array(chosen)
        keys = best_keys + batch.column(data.key_column).take(indices).to_pylist()
        details = best_details + batch.select(list(data.detail_columns)).take(indices).to_pylist()
        similarities = np.concatenate([best_similarities, similarities[chosen]])
        order = sorted(range(len(keys)), key=lambda i: (-similarities[i], keys[i]))[:k]
        best_similarities = similarities[order]
        best_keys = [keys[i] for i in order]
        best_details = [details[i] for i in order]
    ranked = zip(best_keys, best_similarities, best_details, strict=True)
    return [Neighbor(name, float(similarity), details) for name, similarity, details in ranked], compared


def sample_rows(data, columns, sample=DEFAULT_SAMPLE, seed=DEFAULT_SEED, filter=None, batch_rows=BATCH_ROWS):
    """A uniform random sample of at most `sample` rows, streaming the dataset once.

    Each row gets a random priority and the `sample` rows with the lowest are
    kept (bottom-k sampling), so memory is bounded by the sample, not the data.

    Returns:
        `(table, total)`: the sampled rows in scan order, and how many rows matched `filter`.
    """
    if sample < 1:
        raise AnalysisError(f"--sample must be at least 1, received {sample}.")
    rng = np.random.default_rng(seed)
    scanner = data.dataset.scanner(
        columns=list(columns), filter=filter, batch_size=batch_rows, batch_readahead=2, fragment_readahead=1
    )
    kept = scanner.projected_schema.empty_table()
    kept_priorities = np.empty(0)
    total = 0
    for batch in scanner.to_batches():
        priorities = rng.random(batch.num_rows)
        total += batch.num_rows
        if len(kept_priorities) >= sample:
            # Only rows that beat the worst kept one can enter the sample.
            candidates = np.flatnonzero(priorities < kept_priorities.max())
            batch, priorities = batch.take(pa.array(candidates)), priorities[candidates]
        if batch.num_rows == 0:
            continue
        kept = pa.concat_tables([kept, pa.Table.from_batches([batch])])
        kept_priorities = np.concatenate([kept_priorities, priorities])
        if len(kept_priorities) > sample:
            chosen = np.sort(np.argpartition(kept_priorities, sample - 1)[:sample])
            kept, kept_priorities = kept.take(pa.array(chosen)), kept_priorities[chosen]
    return kept.combine_chunks(), total


def project_pca(vectors, components=2):
    """Projects rows onto their first principal components.

    Returns:
        `(points, explained)`: an (n, components) array and the fraction of the
        total variance each component explains.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape[0] < 2 or vectors.shape[1] < components:
        raise AnalysisError(
            f"PCA to {components} components needs at least 2 rows and {components} dimensions; "
            f"received {vectors.shape[0]} rows of {vectors.shape[1]} values."
        )
    centered = vectors - vectors.mean(axis=0)
    # The covariance is dim x dim, small next to the rows, so eigh is cheaper than an SVD of the data.
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered)
    order = np.argsort(eigenvalues)[::-1][:components]
    basis = eigenvectors[:, order].T
    # Eigenvectors have no inherent sign; fixing it makes reruns draw the same picture.
    signs = np.sign(basis[np.arange(components), np.abs(basis).argmax(axis=1)])
    basis *= signs[:, None]
    total = np.clip(eigenvalues, 0, None).sum()
    explained = np.clip(eigenvalues[order], 0, None) / total if total > 0 else np.zeros(components)
    return centered @ basis.T, explained


def score_label_agreement(vectors, labels, k=DEFAULT_K, chunk_rows=KNN_CHUNK_ROWS):
    """k-nearest-neighbour label agreement of `vectors` (cosine similarity) against chance.

    Agreement is the fraction of each row's `k` nearest other rows that share its
    label, averaged over rows.  Chance is the sum of the squared class
    frequencies: the agreement of neighbours drawn at random.

    Returns:
        A `KnnScore`.
    """
    labels = np.asarray(labels, dtype=object)
    rows = len(labels)
    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    if rows <= k:
        raise AnalysisError(f"knn-score needs more than k={k} labelled rows; received {rows}. Lower -k.")
    unit = _unit_rows(np.asarray(vectors, dtype=np.float32))
    classes, codes = np.unique(labels.astype(str), return_inverse=True)
    hits = np.empty(rows)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        similarities = unit[start:stop] @ unit.T
        similarities[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        nearest = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        hits[start:stop] = (codes[nearest] == codes[start:stop, None]).mean(axis=1)
    frequencies = np.bincount(codes) / rows
    per_class = {
        str(name): (int((codes == index).sum()), float(hits[codes == index].mean()))
        for index, name in enumerate(classes)
    }
    return KnnScore(float(hits.mean()), float((frequencies**2).sum()), rows, k, per_class)


def _plot_groups(labels):
    """Label values to draw, most frequent first; beyond MAX_PLOT_CLASSES the rest become "other"."""
    counts = collections.Counter(labels)
    ranked = [name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    if len(ranked) <= MAX_PLOT_CLASSES:
        return ranked, list(labels)
    shown = set(ranked[: MAX_PLOT_CLASSES - 1])
    return ranked[: MAX_PLOT_CLASSES - 1] + [OTHER_LABEL], [x if x in shown else OTHER_LABEL for x in labels]


def plot_projection(points, labels, path, title, axis_labels, legend_title=None):
    """Draws 2-D `points` coloured by `labels` (or one colour if None) into a PNG at `path`."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalysisError("plot needs matplotlib: pip install 'embexport[analysis]'.") from None
    figure = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    if labels is None:
        axes.scatter(points[:, 0], points[:, 1], s=8, alpha=0.6, linewidths=0)
    else:
        groups, labels = _plot_groups(labels)
        labels = np.asarray(labels, dtype=object)
        colours = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
        for index, group in enumerate(groups):
            mask = labels == group
            colour = "lightgrey" if group == OTHER_LABEL else colours(index)
            axes.scatter(
                points[mask, 0],
                points[mask, 1],
                s=8,
                alpha=0.6,
                linewidths=0,
                color=colour,
                label=f"{group} ({int(mask.sum())})",
            )
        axes.legend(
            title=legend_title,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            markerscale=2.5,
            fontsize="small",
            frameon=False,
        )
    axes.set_title(title)
    axes.set_xlabel(axis_labels[0])
    axes.set_ylabel(axis_labels[1])
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_pca(data, column, label, path, sample=DEFAULT_SAMPLE, seed=DEFAULT_SEED):
    """Samples rows, projects `column` with PCA and writes a PNG coloured by `label`.

    Returns:
        `(path, rows plotted, total rows, explained variance fractions)`.
    """
    column = check_vector_column(data, column)
    columns = [column]
    if label is not None:
        columns.append(check_label_column(data, label))
    table, total = sample_rows(data, columns, sample, seed, filter=pc.field(column).is_valid())
    points, explained = project_pca(vectors_to_numpy(table[column]))
    labels = None
    if label is not None:
        labels = [MISSING_LABEL if value is None else value for value in table[label].to_pylist()]
    shown = (
        f"{total} rows" if table.num_rows == total else f"random sample of {table.num_rows} of {total} rows"
    )
    title = f"PCA of {column}" + (f" coloured by {label}" if label else "") + f"\n{data.location} ({shown})"
    axis_labels = [f"PC{i + 1} ({fraction:.1%} of variance)" for i, fraction in enumerate(explained)]
    plot_projection(points, labels, path, title, axis_labels, legend_title=label)
    return path, table.num_rows, total, explained


def knn_score(data, column, label, k=DEFAULT_K, sample=DEFAULT_SAMPLE, seed=DEFAULT_SEED):
    """Samples labelled rows and scores `column`'s neighbours on `label`.

    Returns:
        `(KnnScore, total labelled rows)`.
    """
    column = check_vector_column(data, column)
    label = check_label_column(data, label)
    table, total = sample_rows(
        data, [column, label], sample, seed, filter=pc.field(column).is_valid() & pc.field(label).is_valid()
    )
    return score_label_agreement(vectors_to_numpy(table[column]), table[label].to_pylist(), k), total


SCORE_NAMES = {"cos": "cosine similarity", "ip": "dot product", "l2": "L2 distance"}


def _display_score(metric: str, score: float) -> float:
    """An index score as shown: the similarity or dot product, or the (positive) L2 distance."""
    return float(np.sqrt(max(-score, 0.0))) if metric == "l2" else float(score)


def _neighbors_at(data, loaded, positions, found) -> list:
    """`Neighbor`s of one query from positions and scores of `LoadedIndex.search` or `exact_top_k`."""
    valid = positions >= 0
    rows = loaded.take(positions[valid]).to_pylist() if valid.any() else []
    return [
        Neighbor(
            row[data.key_column],
            _display_score(loaded.metric, score),
            {c: row[c] for c in data.detail_columns},
        )
        for row, score in zip(rows, found[valid], strict=True)
    ]


def open_index(data, column, exact=False):
    """The checked index of `column`, or None with `exact` or when there is none (see index.load_index)."""
    if exact:
        return None
    return index_lib.load_index(data, column, [data.key_column, *data.detail_columns])


def indexed_neighbors(data, loaded, key, k=DEFAULT_K):
    """The `k` nearest rows to row `key` through the index, best first (its own rows excluded).

    Returns:
        `(neighbors, indexed rows)`.
    """
    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    positions = loaded.positions_of(key)
    noun = "document id" if data.holds == "documents" else "word"
    if len(positions) == 0:
        raise AnalysisError(f"No row of {data.location!r} has the {noun} {key!r}.{_suggest_keys(data, key)}")
    indexed = [p for p in positions if loaded.contains(p)]
    if not indexed:
        raise AnalysisError(
            f"The {noun} {key!r} has no usable {loaded.metadata['column']!r} vector (it is null)."
        )
    query = loaded.vectors(np.asarray(indexed[:1]))
    if loaded.metric == "cos" and not np.any(query):
        raise AnalysisError(
            f"The {noun} {key!r} has an all-zero vector, so its cosine similarity is undefined."
        )
    found_positions, found = loaded.search(query, k, exclude=[set(positions.tolist())])
    return _neighbors_at(data, loaded, found_positions[0], found[0]), loaded.metadata["indexed"]


def read_queries(path, data, column):
    """The queries of a batch file: `(labels, ids or None, vectors or None)`.

    `.txt`: one id (or word) per line.  `.npy`: an (n, dim) array of vectors.
    `.parquet`: vectors in `column` (or `vector`), labelled by an `id` column
    when there is one; else ids in the `id` (or `token`) column.
    """
    if not os.path.isfile(path):
        raise AnalysisError(f"--queries {path!r} is not a file.")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as handle:
            ids = [line.rstrip("\r\n") for line in handle if line.strip()]
        return ids, ids, None
    if path.endswith(".npy"):
        try:
            vectors = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise AnalysisError(f"--queries {path!r} is not a numeric .npy array: {error}") from None
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise AnalysisError(
                f"--queries {path!r} must hold an (n, dim) array; it has shape {vectors.shape}."
            )
        return [str(i) for i in range(len(vectors))], None, vectors
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for name in (column, VECTOR_COLUMN):
            if name in table.column_names and _is_vector_type(table.schema.field(name).type):
                if table[name].null_count:
                    raise AnalysisError(f"--queries {path!r} has null vectors in {name!r}.")
                labels = (
                    [str(x) for x in table[ID_COLUMN].to_pylist()]
                    if ID_COLUMN in table.column_names
                    else [str(i) for i in range(table.num_rows)]
                )
                return labels, None, vectors_to_numpy(table[name]).astype(np.float32)
        for name in (ID_COLUMN, TOKEN_COLUMN):
            if name in table.column_names:
                ids = [str(x) for x in table[name].to_pylist()]
                return ids, ids, None
        raise AnalysisError(
            f"--queries {path!r} has neither a vector column ({column!r} or {VECTOR_COLUMN!r}) nor an "
            f"{ID_COLUMN!r} column."
        )
    raise AnalysisError(f"--queries {path!r}: use a .txt file of ids, a .parquet file or a .npy array.")


def batch_neighbors(data, column, queries_path, out_path, k=DEFAULT_K, loaded=None):
    """Answers every query of `queries_path` and writes them to the Parquet file `out_path`.

    One row per (query, rank); a query whose id is not in the export, or whose
    vector is unusable, gets one row with null neighbour columns and the
    `problem`.  Through `loaded` (an index) when given, else by one exact scan
    for all queries.

    Returns:
        `(queries answered, queries with a problem)`.
    """
    import pyarrow.parquet as pq

    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    labels, ids, vectors = read_queries(queries_path, data, column)
    metric = loaded.metric if loaded is not None else "cos"
    lookup = loaded if loaded is not None else _ExactLookup(data, column)
    problems = [None] * len(labels)
    exclude = np.full(len(labels), -1, dtype=np.int64)
    if ids is not None:
        first = np.asarray(lookup.first_positions(ids), dtype=np.int64)
        usable = np.flatnonzero(first >= 0)
        vectors = np.full((len(ids), lookup.dim), np.nan, dtype=np.float32)
        vectors[usable] = lookup.vectors(first[usable])
        exclude[usable] = first[usable]
        for i in np.flatnonzero(first < 0):
            problems[i] = f"no row has the key {ids[i]!r}"
    dim = vectors.shape[1]
    expected = lookup.dim
    if ids is None and dim != expected:
        raise AnalysisError(f"--queries {queries_path!r} holds {dim}-dim vectors; {column!r} has {expected}.")
    for i in range(len(labels)):
        if problems[i] is None and metric == "cos" and not np.any(vectors[i]):
            problems[i] = "its vector is all zeros, so its cosine similarity is undefined"
        if problems[i] is None and not np.isfinite(vectors[i]).all():
            problems[i] = "its vector is null or has NaN or infinite values"
    good = np.asarray([i for i, p in enumerate(problems) if p is None], dtype=np.int64)
    positions = np.full((len(labels), k), -1, dtype=np.int64)
    found = np.full((len(labels), k), -np.inf)
    if len(good):
        if loaded is not None:
            excluded = [{int(e)} if e >= 0 else set() for e in exclude[good]]
            positions[good], found[good] = loaded.search(vectors[good], k, exclude=excluded)
        else:
            positions[good], found[good] = index_lib.exact_top_k(
                data, column, vectors[good], k, "cos", exclude=exclude[good]
            )
    score_name = {"cos": "similarity", "ip": "dot_product", "l2": "distance"}[metric]
    out = {"query": [], "rank": [], data.key_column: [], score_name: [], "problem": []}
    details = {c: [] for c in data.detail_columns}
    neighbor_rows = lookup.take(positions[positions >= 0]).to_pylist()
    taken = iter(neighbor_rows)
    for i, label in enumerate(labels):
        valid = np.flatnonzero(positions[i] >= 0)
        if problems[i] is not None or len(valid) == 0:
            for name, value in (
                ("query", label),
                ("rank", None),
                (data.key_column, None),
                (score_name, None),
                ("problem", problems[i] or "no neighbours"),
            ):
                out[name].append(value)
            for c in details:
                details[c].append(None)
            continue
        for rank, j in enumerate(valid, 1):
            row = next(taken)
            out["query"].append(label)
            out["rank"].append(rank)
            out[data.key_column].append(row[data.key_column])
            out[score_name].append(_display_score(metric, found[i, j]))
            out["problem"].append(None)
            for c in details:
                details[c].append(row[c])
    table = pa.table(
        {
            "query": pa.array(out["query"], pa.string()),
            "rank": pa.array(out["rank"], pa.int32()),
            data.key_column: pa.array(out[data.key_column], pa.string()),
            score_name: pa.array(out[score_name], pa.float64()),
            **{c: pa.array(v, pa.string()) for c, v in details.items()},
            "problem": pa.array(out["problem"], pa.string()),
        }
    )
    temporary = out_path + ".tmp"
    pq.write_table(table, temporary)
    os.replace(temporary, out_path)
    return len(labels), sum(p is not None for p in problems)


class _ExactLookup:
    """What batch mode needs of the export without an index: positions, vectors and rows by position."""

    def __init__(self, data, column):
        self.data, self.column = data, column
        self.metric = "cos"
        self.dim = int(vectors_to_numpy(data.dataset.head(1, columns=[column])[column]).shape[1])

    def first_positions(self, ids):
        keys = self.data.dataset.to_table(columns=[self.data.key_column]).column(0)
        found = pc.index_in(pa.array(ids, pa.string()), value_set=keys)
        return [-1 if p is None else int(p) for p in found.to_pylist()]

    def vectors(self, positions):
        if len(positions) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        column = self.data.dataset.take(pa.array(positions), columns=[self.column])[self.column]
        if column.null_count:
            # Null vectors become NaN rows, reported as a problem of their query.
            filled = [v if v is not None else [np.nan] * self.dim for v in column.to_pylist()]
            return np.asarray(filled, dtype=np.float32)
        return vectors_to_numpy(column).astype(np.float32)

    def take(self, positions):
        columns = [self.data.key_column, *self.data.detail_columns]
        return self.data.dataset.take(pa.array(np.asarray(positions, dtype=np.int64)), columns=columns)


def knn_score_indexed(data, loaded, label, k=DEFAULT_K, chunk_rows=4096):
    """kNN label agreement over every indexed row with a label, its neighbours found through the index.

    Neighbours without a label are passed over, as the sampled score leaves
    unlabelled rows out of its pool.
    """
    if k < 1:
        raise AnalysisError(f"-k must be at least 1, received {k}.")
    label = check_label_column(data, label)
    values = data.dataset.to_table(columns=[label])[label]
    classes, codes = np.unique(
        np.asarray(values.fill_null("").to_pylist(), dtype=object).astype(str), return_inverse=True
    )
    labelled = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    codes = np.where(labelled, codes, -1)
    keys = np.sort(np.asarray(loaded.index.keys, dtype=np.int64))
    keys = keys[labelled[keys]]
    if len(keys) <= k:
        raise AnalysisError(f"knn-score needs more than k={k} labelled rows; received {len(keys)}. Lower -k.")
    # Unlabelled rows can crowd out labelled ones; ask for as many more as there are.
    extra = min(int((~labelled).sum()), k)
    hits = np.empty(len(keys))
    for start in range(0, len(keys), chunk_rows):
        chunk = keys[start : start + chunk_rows]
        positions, _ = loaded.search(loaded.vectors(chunk), k + extra, exclude=[{int(p)} for p in chunk])
        neighbour_codes = np.where(positions >= 0, codes[np.maximum(positions, 0)], -1)
        for row, own in enumerate(codes[chunk]):
            chosen = neighbour_codes[row][neighbour_codes[row] >= 0][:k]
            hits[start + row] = (chosen == own).mean() if len(chosen) else 0.0
    kept_codes = codes[keys]
    frequencies = np.bincount(kept_codes, minlength=len(classes)) / len(keys)
    per_class = {
        str(name): (int((kept_codes == index).sum()), float(hits[kept_codes == index].mean()))
        for index, name in enumerate(classes)
        if (kept_codes == index).any()
    }
    return KnnScore(float(hits.mean()), float((frequencies**2).sum()), len(keys), k, per_class)


def format_neighbors(data, key, column, neighbors, compared, metric="cos", indexed=False):
    """The neighbours as a text table."""
    noun = "document" if data.holds == "documents" else "word"
    score_header = {"cos": "similarity", "ip": "dot", "l2": "distance"}[metric]
    headers = ["rank", score_header, data.key_column, *data.detail_columns]
    rows = [
        [str(rank), f"{n.similarity:.4f}", str(n.key), *(str(n.details.get(c)) for c in data.detail_columns)]
        for rank, n in enumerate(neighbors, 1)
    ]
    widths = [max(len(cell) for cell in cells) for cells in zip(headers, *rows, strict=True)]
    lines = [
        f"Nearest neighbours of {noun} {key!r} by {SCORE_NAMES[metric]} of {column} "
        + (f"(index of {compared} rows)" if indexed else f"({compared} rows compared)")
    ]
    for cells in [headers, *rows]:
        # Rank and similarity are right-aligned numbers; keys and details left-aligned text.
        padded = [
            c.rjust(w) if i < 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  " + "  ".join(padded).rstrip())
    return "\n".join(lines)


def format_knn_score(column, label, score, total):
    """The kNN score, chance level and per-class agreement as text."""
    sampled = "" if score.rows == total else f", random sample of {total} labelled rows"
    lift = score.agreement / score.chance if score.chance else float("nan")
    lines = [
        f"kNN label agreement of {column} on {label} (k={score.k}, {score.rows} rows{sampled}, "
        f"{len(score.per_class)} classes)",
        f"  agreement  {score.agreement:.4f}  "
        f"(mean share of the {score.k} nearest neighbours with the same {label})",
        f"  chance     {score.chance:.4f}  (sum of squared class frequencies)",
        f"  lift       {lift:.2f}x",
        "  per class:",
    ]
    width = max(len(name) for name in score.per_class)
    for name, (rows, agreement) in sorted(score.per_class.items(), key=lambda item: -item[1][0]):
        lines.append(f"    {name.ljust(width)}  {rows:6d} rows  agreement {agreement:.4f}")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
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

    sampled = argparse.ArgumentParser(add_help=False)
    sampled.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        help="Work on a uniform random sample of at most this many rows, read in one streaming pass, "
        "so memory stays bounded whatever the export's size (default: %(default)s).",
    )
    sampled.add_argument("--seed", type=int, default=DEFAULT_SEED, help="Sample seed (default: %(default)s).")
    column_help = "Vector column to use (default: the first vector column; 'vector' in a vocabulary)."

    neighbors = commands.add_parser(
        "neighbors",
        help="nearest neighbours (cosine) of a document or a word",
        description="Nearest neighbours by cosine similarity, computed in one streaming pass over the "
        "dataset with a running top-k (the data is never loaded whole).",
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
        help="Scan every row even when the column has an index (python -m pipeline.analyze OUT index).",
    )
    neighbors.add_argument(
        "--out",
        default=DEFAULT_NEIGHBORS_OUT,
        help="Parquet file batch mode (--queries) writes: query, rank, id, score, kept fields, problem "
        "(default: %(default)s).",
    )

    plot = commands.add_parser(
        "plot",
        parents=[sampled],
        help="PNG of a 2-D PCA projection coloured by a label",
        description="2-D PCA projection of a vector column, coloured by a label field, as a PNG. "
        f"Uses a random sample of at most --sample rows (default {DEFAULT_SAMPLE}).",
    )
    plot.add_argument("--column", default=None, help=column_help)
    plot.add_argument("--label", default=None, help="String field (from --keep_fields) giving the colours.")
    plot.add_argument("--out", default=DEFAULT_PLOT, help="PNG file to write (default: %(default)s).")

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
        "vocabulary), streaming the Parquet files in record batches, into OUTPUT_DIR/_index/COLUMN.usearch "
        "with COLUMN.json: its SHA-256, the export's manifest SHA-256 it belongs to, and its recall@k "
        "against the exact scan on a random sample of rows, build time, size and peak memory. "
        "`neighbors` and `knn-score --all` then use it. Needs " + index_lib.INSTALL_HINT + ".",
    )
    build.add_argument("--column", default=None, help=column_help)
    build.add_argument(
        "--metric",
        choices=sorted(index_lib.METRICS),
        default=index_lib.DEFAULT_METRIC,
        help="cos: cosine similarity (what `neighbors` ranks by); ip: dot product; l2: Euclidean "
        "distance (default: %(default)s).",
    )
    build.add_argument(
        "--connectivity",
        type=int,
        default=index_lib.DEFAULT_CONNECTIVITY,
        help="HNSW edges per node (M); more: better recall, bigger index (default: %(default)s).",
    )
    build.add_argument(
        "--expansion_add",
        type=int,
        default=index_lib.DEFAULT_EXPANSION_ADD,
        help="Candidates considered when inserting (efConstruction) (default: %(default)s).",
    )
    build.add_argument(
        "--expansion_search",
        type=int,
        default=index_lib.DEFAULT_EXPANSION_SEARCH,
        help="Candidates considered per query (ef); more: better recall, slower queries "
        "(default: %(default)s).",
    )
    build.add_argument(
        "--recall_queries",
        type=int,
        default=index_lib.DEFAULT_RECALL_QUERIES,
        help="Random rows used as queries to measure recall@k against the exact scan; 0 skips it "
        "(default: %(default)s).",
    )
    build.add_argument(
        "--recall_k",
        type=int,
        default=index_lib.DEFAULT_RECALL_K,
        help="k of recall@k (default: %(default)s).",
    )
    build.add_argument(
        "--seed",
        type=int,
        default=index_lib.DEFAULT_SEED,
        help="Seed of the recall sample (default: %(default)s).",
    )
    build.add_argument(
        "--threads", type=int, default=0, help="Threads to build with; 0: all cores (default: %(default)s)."
    )
    return parser


def _open_for_index(directory):
    """An export's rows, or a vocabulary when the directory holds no row files."""
    try:
        return open_documents(directory)
    except AnalysisError:
        if _list_parquet(directory, lambda name: name == VOCABULARY_FILE, "")[1]:
            return open_vocabulary(directory)
        raise


def run_command(args):
    """Runs the parsed command; returns the text to print."""
    if args.command == "index":
        data = _open_for_index(args.directory)
        column = args.column or (VECTOR_COLUMN if data.holds == "vocabulary" else None)
        settings = index_lib.IndexSettings(
            metric=args.metric,
            connectivity=args.connectivity,
            expansion_add=args.expansion_add,
            expansion_search=args.expansion_search,
            recall_queries=args.recall_queries,
            recall_k=args.recall_k,
            seed=args.seed,
            threads=args.threads,
        )
        metadata = index_lib.build_index(data, column, settings)
        return index_lib.format_build(metadata, args.directory)
    if args.command == "neighbors":
        if args.word is not None or (args.queries is not None and data_is_vocabulary(args.directory)):
            data, key = open_vocabulary(args.directory), args.word
            column = args.column or VECTOR_COLUMN
        else:
            data, key, column = open_documents(args.directory), args.id, args.column
        column = check_vector_column(data, column)
        loaded = open_index(data, column, args.exact)
        if args.queries is not None:
            answered, problems = batch_neighbors(data, column, args.queries, args.out, args.k, loaded)
            how = _via(loaded, data) if loaded is not None else "By an exact scan of every row."
            return (
                f"Wrote {args.out}: {answered} queries, {problems} of them unanswered "
                f"(see its problem column).\n{how}"
            )
        if loaded is None:
            neighbors, compared = find_neighbors(data, key, column, args.k)
            return format_neighbors(data, key, column, neighbors, compared)
        neighbors, compared = indexed_neighbors(data, loaded, key, args.k)
        table = format_neighbors(data, key, column, neighbors, compared, loaded.metric, indexed=True)
        return table + "\n" + _via(loaded, data)
    data = open_documents(args.directory)
    if args.command == "plot":
        path, rows, total, explained = plot_pca(
            data, args.column, args.label, args.out, sample=args.sample, seed=args.seed
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
        return _via(loaded, data) + "\n" + format_knn_score(column, args.label, score, score.rows)
    score, total = knn_score(data, column, args.label, args.k, args.sample, args.seed)
    return format_knn_score(column, args.label, score, total)


def data_is_vocabulary(directory):
    """Whether `directory` is a vocabulary output (no row files of an export)."""
    try:
        open_documents(directory)
    except AnalysisError:
        return True
    return False


def _via(loaded, data):
    """The line saying that the answer came through the index, and how good the index is."""
    recall = loaded.metadata["recall"]
    measured = (
        f"recall@{recall['k']} {recall['recall']:.4f} measured at build"
        if recall.get("recall") is not None
        else "recall not measured"
    )
    return (
        f"Using the index {data.location}/{loaded.metadata['file']} ({loaded.metadata['metric']}, "
        f"{loaded.metadata['indexed']} rows, {measured}); --exact scans every row instead."
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        print(run_command(args))
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
