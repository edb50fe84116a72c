"""Resuming an interrupted export: each run's signature in its staging directory, and what a rerun keeps.

A run writes `OUTPUT/_staging/RUN_ID/_RUN.json` before its pipeline starts:
the run's signature (everything its rows and dead letters depend on: the
model's and tokenizer's SHA-256, the columns, every flag that changes a byte,
and the input files' listing) and its state, "running" until the launcher
hands the staged files to the commit, then "committing".

A rerun of the same export, holding the output's lock, finds a "running"
staging directory with an equal signature (`find_resumable`) and continues it
under a new run id (`prepare_resume`): the complete row files (a Parquet footer)
are moved into the new run's staging directory, the old one is removed with
everything else in it (partial files, dead letters, tables), a document held by
two complete files (a retried bundle) is kept once after checking that both
copies are equal, and the kept ids are written to `_KEPT_IDS.parquet`, which
the workers read to skip those documents (`pipeline.inference.skip_kept.SkipKeptFn`).
The old run's job may outlive its killed launcher (portable runners, Dataflow):
under its own run id, what it still writes is never mixed with the new run's.  The
pipeline still reads every record, so dead letters, duplicates and counts are
made exactly as in an uninterrupted run; a kept document is dropped as soon as
it is read, neither tokenized nor embedded again: each row file's footer holds
what the tokenizer counted for its rows, which the launcher adds back.  A run
that reached its commit point (the journal) is never resumed: the commit is finished by
`pipeline.writing.commit`, never mixed with a second run.
"""

import dataclasses
import json
import logging
import posixpath
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import ExportConfigError
from pipeline.inference.skip_kept import KEPT_COUNTED_COLUMN, ROW_KEY_COLUMN, row_key
from pipeline.planning.plan import ExportPlan
from pipeline.planning.reuse import reuse_signature
from pipeline.running.counters import TOKENIZER_COUNTS
from pipeline.writing import schema as schema_lib
from pipeline.writing.files import delete_files, join, list_files, make_directory, move, relative_to
from pipeline.writing.layout import JOURNAL, SHARD_NAME, STAGING
from pipeline.writing.shards import TOKENIZER_COUNTS_KEY, WRITING_SUFFIX
from pipeline.writing.staging import remove_staging, staging_prefixes, staging_runs

RUN_FILE = "_RUN.json"
KEPT_IDS_FILE = "_KEPT_IDS.parquet"
RUNNING = "running"
COMMITTING = "committing"
# Version of the _RUN.json format: a run of another version is never resumed. Raise it when
# which records become rows changes (rows' values: `ROWS_VERSION`). 2: a blank record is an
# empty_document dead letter whatever the tokenizer; a run of 1 may have kept rows of them.
RUN_FORMAT = 2

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Resumption:
    """What a resumed run kept of the run it continues."""

    run_id: str
    attempt: int
    started: float
    kept_files: tuple[str, ...]
    rows_kept: int
    kept_ids_path: str
    partial_files_ignored: int
    duplicate_rows_dropped: int
    # Closed files whose pages no longer match their checksums (`_intact`): embedded again.
    damaged_files_ignored: int = 0
    # What the tokenizer counted for the kept rows (`counters.TOKENIZER_COUNTS`), which
    # the rerun does not tokenize again: the launcher adds them to the run's counters.
    tokenizer_counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        """The manifest's `resumed` entry."""
        return {
            "run": self.run_id,
            "attempt": self.attempt,
            "first_started": self.started,
            "rows_kept": self.rows_kept,
            "files_kept": len(self.kept_files),
            "partial_files_ignored": self.partial_files_ignored,
            "damaged_files_ignored": self.damaged_files_ignored,
            "duplicate_rows_dropped": self.duplicate_rows_dropped,
        }


def run_signature(plan: ExportPlan, limit: int | None) -> dict[str, Any]:
    """Everything the rows and dead letters of a run depend on, as JSON-ready values.

    Two runs with equal signatures write the same rows for the same records, so
    one may keep the other's. Settings that only change how rows are split into
    files (--shard_mb, --checkpoint_seconds) or how fast they come are left out,
    and so is how --input and --reuse spell the files they name.
    """
    # Here, not at the top: it imports TensorFlow, which the launch has loaded by now.
    from pipeline.inference.forward_pass import forward_pass_identity

    return {
        "format": RUN_FORMAT,
        **reuse_signature(plan),
        "inputs_full": [dataclasses.asdict(info) for info in plan.inputs],
        # The files read, not --input's spelling: `./a.jsonl` after `/abs/a.jsonl` continues the run.
        "input_listing_sha256": plan.input_listing_sha256,
        "input_format": plan.input_format,
        "id_field": plan.id_field,
        "keep_fields": list(plan.keep_fields),
        "max_record_bytes": plan.max_record_bytes,
        "compression": plan.compression,
        "batch_size": plan.batch_size,
        # Which forward pass computes each column, not why Keras's was chosen (a measured difference).
        "forward_passes": [
            [column, *forward_pass_identity(engine, reason)] for column, engine, reason in plan.forward_passes
        ],
        "limit": limit,
        # The earlier export by its shards' names and contents, not by how --reuse spells its
        # directory: one replaced under the same name is another export, one reached by another
        # path (relative, a link, moved) the same.
        "reuse": bool(plan.reuse),
        "reuse_files": [posixpath.basename(path) for path in plan.reuse_files],
        "reuse_digests": list(plan.reuse_digests),
        "package_version": plan.package_version,
    }


def _run_path(directory: str, run_id: str) -> str:
    return join(directory, STAGING, run_id, RUN_FILE)


def _write_json(path: str, value: dict[str, Any]) -> None:
    # Written aside and renamed, so a kill leaves the old file or the new one, never half of one.
    temporary = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with FileSystems.create(temporary) as handle:
        handle.write(json.dumps(value, indent=1).encode("utf-8"))
    FileSystems.rename([temporary], [path])


def read_run(directory: str, run_id: str) -> dict[str, Any] | None:
    """A staging directory's `_RUN.json`, or None when it is missing or unreadable (truncated)."""
    path = _run_path(directory, run_id)
    try:
        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path) as handle:
            run = json.loads(handle.read().decode("utf-8"))
    except Exception:  # Truncated, not JSON, not UTF-8: not a run that can be continued.
        return None
    return run if isinstance(run, dict) else None


def start_run(directory: str, run_id: str, signature: dict[str, Any], resumed: Resumption | None) -> None:
    """Records the run's signature and state ("running") in its staging directory."""
    now = time.time()
    _write_json(
        _run_path(directory, run_id),
        {
            "run": run_id,
            "state": RUNNING,
            "signature": signature,
            "started": resumed.started if resumed else now,
            "attempt": resumed.attempt if resumed else 1,
            "attempt_started": now,
            # The run this one continues (`prepare_resume` took over its complete row files).
            "continues": resumed.run_id if resumed else None,
        },
    )


def mark_committing(directory: str, run_id: str) -> None:
    """Records that the run handed its staged files to the commit (resumed if killed before its journal)."""
    run = read_run(directory, run_id) or {"run": run_id}
    _write_json(_run_path(directory, run_id), dict(run, state=COMMITTING, committing=time.time()))


def _differences(earlier: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(key for key in set(earlier) | set(current) if earlier.get(key) != current.get(key))


def find_resumable(directory: str, signature: dict[str, Any]) -> str | None:
    """The run id of a staging directory this run can continue, or None.

    Only a run whose signature equals `signature`; of several, the one started
    last. A run killed while "committing" before its commit point (hashing its
    staged files, writing the journal) left its staged files as they were, so it
    is resumed too; one that reached the commit point is finished by
    `pipeline.writing.commit.recover_interrupted_commit` before this is asked,
    and never resumed. Call it holding the output's lock: then every staging
    directory is a dead run's.
    """
    # JSON turns tuples into lists: compare what was written with what would be.
    current = json.loads(json.dumps(signature))
    # Recovery runs first; a journal still in place means it could not finish: resume nothing.
    journal_pending = FileSystems.exists(join(directory, JOURNAL))
    candidates = []
    for run_id in staging_runs(directory):
        run = read_run(directory, run_id)
        if run is None:
            _LOGGER.info("Not resuming run %s: it has no readable %s.", run_id, RUN_FILE)
        elif run.get("state") not in (RUNNING, COMMITTING) or journal_pending:
            _LOGGER.info("Not resuming run %s: it reached its commit (state %r).", run_id, run.get("state"))
        elif run.get("signature") != current:
            changed = _differences(run.get("signature") or {}, current)
            # Its rows are about to be removed: say so where it is seen.
            _LOGGER.warning(
                "Not resuming run %s: it was another export (%s changed); its staged rows are dropped.",
                run_id,
                ", ".join(changed),
            )
        else:
            # A rerun killed just after taking over a run's files leaves both: the later attempt holds them.
            candidates.append((int(run.get("attempt", 1)), float(run.get("attempt_started", 0)), run_id))
    return max(candidates)[2] if candidates else None


def _writing_dir(directory: str, run_id: str) -> str:
    return staging_prefixes(directory, run_id)[0] + WRITING_SUFFIX


def _footer(path: str) -> pq.FileMetaData | None:
    try:
        with FileSystems.open(path) as handle:
            return pq.ParquetFile(handle).metadata
    except Exception:  # No footer: a file its writer never closed.
        return None


def _complete_rows(path: str, schema: pa.Schema) -> int | None:
    """The rows of a complete row file of this export, or None for a partial or foreign one."""
    metadata = _footer(path)
    if metadata is None or not metadata.schema.to_arrow_schema().equals(schema, check_metadata=False):
        return None
    return metadata.num_rows


def _intact(path: str) -> bool:
    """Whether every page of a row file decodes and matches its CRC-32 (`schema.parquet_writer_options`).

    A footer proves the writer closed the file, not that its pages are still what
    it wrote: a disk can damage them between the kill and the rerun.  Read once,
    a row group at a time.
    """
    try:
        with FileSystems.open(path) as handle:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)
            for group in range(parquet.metadata.num_row_groups):
                parquet.read_row_group(group)
    except Exception:  # A checksum mismatch, a page that no longer decompresses or decodes.
        return False
    return True


def _file_tokenizer_counts(metadata: pq.FileMetaData) -> dict[str, int] | None:
    """The tokenizer's counts of a row file's rows (`shards.TOKENIZER_COUNTS_KEY`), or None."""
    try:
        counts = json.loads((metadata.metadata or {})[TOKENIZER_COUNTS_KEY])
        return {name: int(counts[name]) for name in TOKENIZER_COUNTS}
    except Exception:  # Absent (a file a resume rewrote) or not ours: its documents are tokenized again.
        return None


def _read_table(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    with FileSystems.open(path) as handle:
        return pq.read_table(handle, columns=columns)


def _write_table(path: str, table: pa.Table, compression: str, same_rows: bool = False) -> None:
    """Writes `table` as a Parquet file; `same_rows`: the rows its footer's tokenizer counts are of.

    Otherwise the footer's counts (read back into the schema) are dropped: of rows no longer
    all there, they would lie.
    """
    metadata = {
        key: value
        for key, value in (table.schema.metadata or {}).items()
        if same_rows or key != TOKENIZER_COUNTS_KEY
    }
    table = table.replace_schema_metadata(metadata or None)
    with FileSystems.create(path) as handle:
        pq.write_table(
            table, handle, compression=compression, use_compliant_nested_type=False, write_page_checksum=True
        )


def _drop_duplicates(files: list[str], plan: ExportPlan) -> tuple[list[str], int, pa.Array]:
    """Keeps each id of `files` once: (files after, rows dropped, ids kept as an Arrow array).

    A document found in two complete files (a bundle that failed after closing a
    file and was retried) keeps its first copy by file path; the others are
    removed from their files, which are rewritten. Both copies must be equal.

    Raises:
        ExportConfigError: two copies of a row differ.
    """
    tables = []
    for index, path in enumerate(files):
        ids = _read_table(path, [schema_lib.ID_COLUMN]).column(0)
        tables.append(
            pa.table(
                {
                    "id": ids,
                    "file": pa.array([index] * len(ids), pa.int32()),
                    "row": pa.array(range(len(ids)), pa.int64()),
                }
            )
        )
    if not tables:
        return files, 0, pa.array([], pa.string())
    places = pa.concat_tables(tables)
    counts = places.group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts["id_count"], 1))["id"]
    if not len(repeated):
        return files, 0, places["id"].combine_chunks()
    repeats = places.filter(pc.is_in(places["id"], repeated))
    repeats = repeats.sort_by([("id", "ascending"), ("file", "ascending")])
    loaded: dict[int, pa.Table] = {}

    def row(file_index: int, row_index: int) -> pa.Table:
        if file_index not in loaded:
            loaded[file_index] = _read_table(files[file_index])
        return loaded[file_index].slice(row_index, 1)

    drop: dict[int, list[int]] = {}
    first: tuple[str, int, int] | None = None
    columns = (repeats[name].to_pylist() for name in ("id", "file", "row"))
    for document_id, file_index, row_index in zip(*columns, strict=True):
        if first is None or first[0] != document_id:
            first = (document_id, file_index, row_index)
            continue
        if not row(file_index, row_index).equals(row(first[1], first[2])):
            raise ExportConfigError(
                f"The interrupted run in {posixpath.dirname(files[0])} holds two different rows for id "
                f"{document_id!r} (in {files[first[1]]} and {files[file_index]}), so it cannot be "
                "resumed: rows of one export never differ. Rerun with --resume off to start from zero."
            )
        drop.setdefault(file_index, []).append(row_index)
    kept: list[str | None] = list(files)
    for file_index, rows in drop.items():
        table = loaded[file_index] if file_index in loaded else _read_table(files[file_index])
        mask = pc.invert(pc.is_in(pa.array(range(table.num_rows), pa.int64()), pa.array(rows, pa.int64())))
        remaining = table.filter(mask)
        if remaining.num_rows:
            # The copy is whole before the original goes: a kill in between leaves
            # both, which the next resume resolves the same way.
            target = join(posixpath.dirname(files[file_index]), f"{uuid.uuid4().hex}.parquet")
            _write_table(target, remaining, plan.compression)
            kept[file_index] = target
        else:
            kept[file_index] = None
        delete_files([files[file_index]])
    dropped = sum(len(rows) for rows in drop.values())
    unique = pc.unique(places["id"].combine_chunks())
    return [path for path in kept if path], dropped, unique


def _with_this_runs_metadata(files: list[str], plan: ExportPlan) -> list[str]:
    """`files`, each whose footer states other export facts than this run's rewritten with this run's.

    An equal signature leaves one of them free: `--model` as spelt (the same model by
    another path: relative, through a link, moved), which every row file's metadata
    names. Kept as they were, one export's files would name two models. The rows and
    their tokenizer counts stay; the copy is whole before the original goes, so a kill
    in between leaves two equal copies, which the next resume keeps once.
    """
    expected = schema_lib.output_schema(plan).metadata[schema_lib.METADATA_KEY]
    result = []
    for path in files:
        footer = _footer(path)
        if footer is not None and (footer.metadata or {}).get(schema_lib.METADATA_KEY) == expected:
            result.append(path)
            continue
        table = _read_table(path)
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), schema_lib.METADATA_KEY: expected}
        )
        target = join(posixpath.dirname(path), f"{uuid.uuid4().hex}.parquet")
        _write_table(target, table, plan.compression, same_rows=True)
        delete_files([path])
        result.append(target)
    rewritten = len(set(result) - set(files))
    if rewritten:
        _LOGGER.info(
            "Resume: rewrote %d kept row file(s) to name this run's --model %s.", rewritten, plan.model_uri
        )
    return result


def _counted_ids(files: list[str]) -> tuple[list[str], dict[str, int]]:
    """The ids of `files` whose tokenizer counts are known, and those counts summed.

    A file's counts are in its footer (`shards.TOKENIZER_COUNTS_KEY`); one
    without them (rewritten by `_drop_duplicates`) has its documents tokenized again.
    """
    ids: list[str] = []
    totals = dict.fromkeys(TOKENIZER_COUNTS, 0)
    for path in files:
        counts = _file_tokenizer_counts(_footer(path))
        if counts is None:
            continue
        ids.extend(_read_table(path, [schema_lib.ID_COLUMN]).column(0).to_pylist())
        for name, value in counts.items():
            totals[name] += value
    return ids, totals


class InterruptedJobStillRunningError(ExportConfigError):
    """A kept row file of the interrupted run vanished or changed while the rerun took it over."""


def _row_file_candidates(directory: str, run_id: str) -> list[str]:
    """The Parquet files under a run's `data/`: being written (`part-writing/`) or named shards."""
    rows_dir = posixpath.dirname(staging_prefixes(directory, run_id)[0])
    return sorted(
        path
        for path in list_files(rows_dir)
        if path.endswith(".parquet")
        and (
            posixpath.dirname(path) == _writing_dir(directory, run_id)
            or (posixpath.dirname(path) == rows_dir and SHARD_NAME.fullmatch(posixpath.basename(path)))
        )
    )


def _still_running(old_run_id: str, path: str, what: str) -> InterruptedJobStillRunningError:
    return InterruptedJobStillRunningError(
        f"The interrupted run {old_run_id} that this one continues is still running: its row file "
        f"{path} {what} while this run took it over, so its job (a portable runner's or Dataflow's, "
        "which outlives a killed launcher) still writes into the output's staging directory. Nothing was "
        "committed. Cancel that job (on its runner: the Flink or Spark UI, `gcloud dataflow jobs cancel`), "
        "then rerun the same command."
    )


def _take_over(directory: str, old_run_id: str, run_id: str, files: list[str]) -> list[str]:
    """Moves the interrupted run's complete row `files` into this run's writing directory; their new paths.

    Each file's size and row count are read before the move and checked after it:
    the interrupted run's job, if it still runs, renames its own files (naming its
    shards) and would take a file away from under the rerun.

    Raises:
        InterruptedJobStillRunningError: a file vanished or changed meanwhile.
    """
    writing = _writing_dir(directory, run_id)
    make_directory(directory, relative_to(directory, writing))
    moved = []
    for path in files:
        before = _size_and_rows(path)
        if before is None:
            raise _still_running(old_run_id, path, "vanished")
        name = posixpath.basename(path)
        # A named shard gets a writing file's name again: the new run names every file.
        target = join(writing, name if not SHARD_NAME.fullmatch(name) else f"{uuid.uuid4().hex}.parquet")
        try:
            move(directory, relative_to(directory, path), relative_to(directory, target))
        except Exception:
            if FileSystems.exists(path):  # Not taken away: another failure (permissions, a full disk).
                raise
            raise _still_running(old_run_id, path, "vanished") from None
        if _size_and_rows(target) != before:
            raise _still_running(old_run_id, path, "changed")
        moved.append(target)
    return moved


def hand_back(directory: str, old_run_id: str, run_id: str) -> None:
    """Moves the row files taken over from `old_run_id` back into its staging directory, best effort.

    For a hand-over that failed (a full disk as the new run wrote its first file, two
    different rows for a document): the old run keeps its `_RUN.json` until the new
    one's is written, so the next rerun resumes it with every file, where the new run's
    directory, without a `_RUN.json`, would be removed with the files it took.
    """
    writing = _writing_dir(directory, run_id)
    back = _writing_dir(directory, old_run_id)
    try:
        paths = [path for path in list_files(writing) if path.endswith(".parquet")]
        if paths:
            make_directory(directory, relative_to(directory, back))
    except Exception:  # Nothing taken over, or the old run's directory is gone: nothing to give back.
        return
    for path in paths:
        try:
            move(
                directory,
                relative_to(directory, path),
                relative_to(directory, join(back, posixpath.basename(path))),
            )
        except Exception as error:  # This one stays in the new run's directory: embedded again.
            _LOGGER.warning("Could not give %s back to run %s: %s", path, old_run_id, error)


def _size_and_rows(path: str) -> tuple[int, int] | None:
    """A complete row file's size and row count, or None when it is gone."""
    try:
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    except Exception:  # Not there (any more).
        return None
    metadata = _footer(path)
    return (size, metadata.num_rows) if metadata is not None else None


def prepare_resume(directory: str, old_run_id: str, run_id: str, plan: ExportPlan) -> Resumption:
    """Takes over what the dead run `old_run_id` finished into the new run `run_id`'s staging directory.

    The complete row files (a Parquet footer) of the old run, named shards too, are
    moved (renamed; on object storage copied, then deleted) into the new run's
    writing directory, the first thing of the new run written; partial files and
    everything else (dead letters, tables, files that appear after the listing) stay
    behind and go with the old run's staging directory, which the caller removes once
    the new run's `_RUN.json` is written (`start_run`).  Until then the new run's
    directory has no `_RUN.json`: a kill meanwhile leaves it to be removed by the next
    rerun, which resumes the old run with the files still there (those moved are
    embedded again: never lost, never twice).  The old run's job may outlive its
    launcher (a portable runner's or Dataflow's): what it writes into its own staging
    directory afterwards is never read by this run.

    Raises:
        InterruptedJobStillRunningError: a kept file vanished or changed during the move.
        ExportConfigError: a document has two different rows (see `_drop_duplicates`).
    """
    run = read_run(directory, old_run_id) or {}
    schema = schema_lib.output_schema(plan)
    complete: list[str] = []
    partial = 0
    for path in _row_file_candidates(directory, old_run_id):
        if _complete_rows(path, schema) is None:  # Being written by a live job, or cut by the kill.
            partial += 1
        else:
            complete.append(path)
    moved = _take_over(directory, old_run_id, run_id, complete)
    damaged = [path for path in moved if not _intact(path)]
    delete_files(damaged)
    if partial:
        _LOGGER.info("Resume: ignoring %d partial row file(s) (no Parquet footer).", partial)
    if damaged:
        _LOGGER.warning(
            "Resume: ignoring %d row file(s) whose pages were damaged on disk since they were written "
            "(their documents are embedded again): %s",
            len(damaged),
            ", ".join(damaged),
        )
    complete, dropped, ids = _drop_duplicates(sorted(set(moved) - set(damaged)), plan)
    complete = _with_this_runs_metadata(complete, plan)
    kept_ids_path = join(directory, STAGING, run_id, KEPT_IDS_FILE)
    counted, tokenizer_counts = _counted_ids(complete)
    # With each kept id, what its row was made from (its text and kept fields): a document
    # rewritten since is not skipped.
    columns = [schema_lib.ID_COLUMN, schema_lib.FINGERPRINT_COLUMN, *plan.keep_fields]
    kept = (
        pa.concat_tables([_read_table(path, columns) for path in complete])
        if complete
        else pa.table({name: pa.array([], pa.string()) for name in columns})
    )
    fields = [kept[name].to_pylist() for name in plan.keep_fields]
    keys = [
        row_key(fingerprint, [values[index] for values in fields])
        for index, fingerprint in enumerate(kept[schema_lib.FINGERPRINT_COLUMN].to_pylist())
    ]
    kept_ids = pa.table(
        {
            schema_lib.ID_COLUMN: kept[schema_lib.ID_COLUMN],
            ROW_KEY_COLUMN: pa.array(keys, pa.string()),
            KEPT_COUNTED_COLUMN: pc.is_in(kept[schema_lib.ID_COLUMN], pa.array(counted, pa.string())),
        }
    )
    _write_table(kept_ids_path, kept_ids, "snappy")
    resumption = Resumption(
        run_id=old_run_id,
        attempt=int(run.get("attempt", 1)) + 1,
        started=float(run.get("started", time.time())),
        kept_files=tuple(complete),
        rows_kept=len(ids),
        kept_ids_path=kept_ids_path,
        partial_files_ignored=partial,
        damaged_files_ignored=len(damaged),
        duplicate_rows_dropped=dropped,
        tokenizer_counts=tokenizer_counts,
    )
    _LOGGER.info(
        "Continuing interrupted run %s as run %s (attempt %d): keeping %d rows in %d files; "
        "embedding the other documents.",
        old_run_id,
        run_id,
        resumption.attempt,
        resumption.rows_kept,
        len(complete),
    )
    return resumption


def remove_old_run(directory: str, old_run_id: str, attempts: int = 3) -> None:
    """Removes the staging directory of the run a resumed run continues (once its own `_RUN.json` is written).

    The old run's job may still write there (a portable runner's or Dataflow's job
    outlives its killed launcher): a removal that meets files appearing or going is
    tried again, then left to a later run, which removes it as a dead run's leftovers.
    """
    for attempt in range(attempts):
        try:
            remove_staging(directory, old_run_id)
            return
        except OSError as error:  # A file written or renamed meanwhile (not empty, no such file).
            if attempt == attempts - 1:
                _LOGGER.warning(
                    "Could not remove %s, the staging directory of the interrupted run %s (%s): its job "
                    "may still be running; a later run removes it.",
                    join(directory, STAGING, old_run_id),
                    old_run_id,
                    error,
                )
