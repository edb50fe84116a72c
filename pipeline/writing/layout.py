"""The names in an output directory and which of its files are ours; imports neither Beam nor TensorFlow.

Layout of a finished export::

    OUTPUT/part-SSSSS-of-NNNNN.parquet          the rows
    OUTPUT/errors/part-SSSSS-of-NNNNN.parquet   the dead letters
    OUTPUT/_tables/LAYER.parquet                --token_storage ids: each Embedding's table, once
    OUTPUT/_index/COLUMN.*                      `pipeline.analyze OUT index`: an ANN index, added later
    OUTPUT/_MANIFEST.json                       marks success: counts, shards with sizes and SHA-256
    OUTPUT/_failed/RUN/                         a failed --overwrite run that kept the earlier export:
                                                its _MANIFEST.json and errors/ (dead letters)

Readers of the rows use `OUTPUT/part-*.parquet` (DuckDB, polars, BigQuery) or
`pd.read_parquet(OUTPUT, ignore_prefixes=READER_IGNORE_PREFIXES)`, since a
plain recursive read would also pick up `errors/`.

While a run is in flight it holds `OUTPUT/_LOCK` (`pipeline.writing.lock`) and
its files live under `OUTPUT/_staging/RUN_ID/` (`pipeline.writing.staging`),
which readers skip (pyarrow.dataset ignores names starting with "_"; a
`OUTPUT/*.parquet` glob does not descend into it).  `OUTPUT/_COMMIT.json` is
the journal of a commit in flight (`pipeline.writing.commit`).

Nothing in this project ever deletes a file that `is_ours` does not accept.
"""

import re
import uuid
from collections.abc import Collection

MANIFEST = "_MANIFEST.json"
LOCK = "_LOCK"
# The commit's journal: present only while a commit is between its first and last step.
JOURNAL = "_COMMIT.json"
# pyarrow.dataset (and so pandas) reads directories recursively: these prefixes
# keep the dead letters and the staging area out of a read of the rows.
READER_IGNORE_PREFIXES = ["_", ".", "errors"]
STAGING = "_staging"
ERRORS_DIR = "errors"
# "_" keeps the tables out of a read of the directory, as for the staging area.
TABLES_DIR = "_tables"
# Failed --overwrite runs that kept a succeeded export: _failed/RUN/{_MANIFEST.json,errors/}.
FAILED_DIR = "_failed"
# `python -m pipeline.analyze OUT index`: tied to the manifest, so replacing the export drops or outdates it.
INDEX_DIR = "_index"
SHARD_PREFIX = "part-"
# Beam's default shard names: part-00000-of-00004.parquet.
SHARD_NAME = re.compile(r"part-\d{5,}-of-\d{5,}\.parquet")
_RUN_ID = r"[0-9A-Za-z_-]+"
_FAILED_FILE = re.compile(
    rf"{FAILED_DIR}/{_RUN_ID}/({re.escape(MANIFEST)}|{ERRORS_DIR}/part-\d{{5,}}-of-\d{{5,}}\.parquet)"
)
# The names an index build writes under _index/: COLUMN.json and COLUMN.usearch, each first as NAME.tmp.
# A name alone makes nothing ours (a user's settings.json or hand-built index looks the same):
# `index_files` judges a metadata file by its content.
# A build writes its metadata aside first, as COLUMN.json.tmp.XXXXXXXX (hex digits), then renames it;
# a SIGKILL between leaves that name, ours where its content is our metadata.
ASIDE_HEX_DIGITS = 8
_ASIDE = rf"\.json\.tmp\.[0-9a-f]{{{ASIDE_HEX_DIGITS}}}"
INDEX_FILE = re.compile(rf"{INDEX_DIR}/[^/]+(\.(usearch|json)(\.tmp)?|{_ASIDE})")
_INDEX_METADATA = re.compile(rf"({INDEX_DIR}/[^/]+)(\.json(\.tmp)?|{_ASIDE})")
# The directories a run makes, so the only empty ones that are ours.
KNOWN_DIRECTORY = re.compile(
    rf"({ERRORS_DIR}|{TABLES_DIR}|{INDEX_DIR}|{STAGING}(/.*)?|{FAILED_DIR}(/{_RUN_ID}(/{ERRORS_DIR})?)?)"
)


def new_run_id() -> str:
    """A fresh id naming a run's staging directory."""
    return uuid.uuid4().hex[:12]


def is_shard(relative: str) -> bool:
    """Whether a path relative to the output directory is named as a row or dead-letter shard."""
    name = relative[len(ERRORS_DIR) + 1 :] if relative.startswith(ERRORS_DIR + "/") else relative
    return bool(SHARD_NAME.fullmatch(name))


def lock_clock_probe(run_id: str) -> str:
    """The empty file a run writes beside a lease to read the store's own clock (see `lock.py`)."""
    return f"{LOCK}.{run_id}.clock"


def is_lock_clock_probe(relative: str) -> bool:
    return bool(re.fullmatch(rf"{LOCK}\.{_RUN_ID}\.clock", relative))


def is_index_metadata_name(relative: str) -> bool:
    """Whether a path relative to the output is named as an index's metadata (`_index/COLUMN.json`)."""
    return bool(_INDEX_METADATA.fullmatch(relative))


def index_files(relative: str, metadata: object) -> frozenset[str]:
    """The files under `_index/` that the metadata file `relative` (its JSON value `metadata`) makes ours.

    Only the metadata an index build writes counts (`"format": "usearch"`, a
    `source` and the `file` an index of that column is saved as): then it, the
    index file it names and their `.tmp` names are ours, and so is an aside of the
    metadata holding it (`COLUMN.json.tmp.XXXXXXXX`).  Anything else names nothing.
    """
    match = _INDEX_METADATA.fullmatch(relative)
    if match is None or not isinstance(metadata, dict):
        return frozenset()
    base = match.group(1)
    named = metadata.get("file")
    ours = metadata.get("format") == "usearch" and isinstance(metadata.get("source"), dict)
    if not ours or named != base + ".usearch":
        return frozenset()
    # An aside (`ASIDE_HEX_DIGITS`) names itself too: a build killed before renaming it left it.
    return frozenset({base + ".json", base + ".json.tmp", relative, named, named + ".tmp"})


def is_ours(relative: str, owned_index_files: Collection[str] = frozenset()) -> bool:
    """Whether a file's path relative to the output directory is one this project writes.

    Under `_index/` only the files in `owned_index_files` are (`index_files` of
    each metadata file there, which reads their content).
    """
    return (
        relative in (MANIFEST, MANIFEST + ".tmp", LOCK, JOURNAL)
        or is_lock_clock_probe(relative)
        or relative.startswith(STAGING + "/")
        or is_shard(relative)
        or bool(re.fullmatch(TABLES_DIR + r"/[^/]+\.parquet", relative))
        or relative in owned_index_files
        or bool(_FAILED_FILE.fullmatch(relative))
    )
