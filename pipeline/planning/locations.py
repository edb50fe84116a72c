"""Checks the locations at launch: --input lists regular files, --output is writable and apart from it.

The output is judged before the (slow) model load, so a wrong path fails in a
second; `check_locations` runs every check and returns the launch listing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

from apache_beam.io.filesystems import FileSystems

from models.paths import unexpanded_home
from pipeline.errors import ExportConfigError, OutputWriteError
from pipeline.planning.options import ExportOptions
from pipeline.planning.stores import check_gcs_bucket_name, check_s3_bucket_name, check_stores_answer
from pipeline.reading.listing import AmbiguousPattern, InputFile, list_input
from pipeline.reading.ranges import path_key
from pipeline.uris import absolute, absolute_pattern, file_uri_problem, glob_regex, inside, is_local
from pipeline.writing.commit_phase import recovered_run
from pipeline.writing.layout import STAGING

# Characters Beam's FileSystems.match takes as a glob.
GLOB_CHARACTERS = "*?["
# Names an export writes, to test an --input pattern against (see `check_input_output`).
# One name of each kind of file an export (or `pipeline.analyze` in it) writes in its output: an --input
# pattern matching any of them would read the export's own files as corpus on a later run.
_EXPORT_FILE_EXAMPLES = (
    "part-00000-of-00001.parquet",
    "errors/part-00000-of-00001.parquet",
    "_MANIFEST.json",
    "_MANIFEST.json.tmp",
    "_COMMIT.json",
    "_LOCK",
    "_LOCK.0123456789ab.clock",
    "_tables/emb.parquet",
    "_failed/0123456789ab/_MANIFEST.json",
    "_failed/0123456789ab/errors/part-00000-of-00001.parquet",
    "_staging/0123456789ab/_RUN.json",
    "_staging/0123456789ab/_KEPT_IDS.parquet",
    "_staging/0123456789ab/_MANIFEST.json",
    "_staging/0123456789ab/data/part-00000-of-00001.parquet",
    "_staging/0123456789ab/data/part-writing/0123456789abcdef0123456789abcdef.parquet",
    "_staging/0123456789ab/errors/part-00000-of-00001.parquet",
    "_staging/0123456789ab/_tables/emb.parquet",
    "_index/emb.json",
    "_index/emb.usearch",
)


def check_location(flag: str, uri: str) -> None:
    """Refuses a URI whose scheme no installed Beam filesystem serves, or an S3 bucket boto3 refuses.

    Raises:
        ExportConfigError: naming the scheme and the package that serves it, a
            leading '~' the shell left as it is, or the bucket name.
    """
    unexpanded = unexpanded_home({f"--{flag}": uri}) or file_uri_problem(f"--{flag}", uri)
    if unexpanded:
        raise ExportConfigError(unexpanded)
    scheme = FileSystems.get_scheme(uri)
    try:
        FileSystems.get_filesystem(uri)
    except ValueError:
        raise ExportConfigError(
            f"--{flag} {uri!r}: no filesystem serves the scheme {scheme + '://'!r}. Use a local "
            "path, gs://BUCKET/... or s3://BUCKET/... (s3 needs `pip install 'embexport[aws]'`)."
        ) from None
    if scheme == "s3":
        try:
            import boto3  # noqa: F401  Beam's S3 filesystem needs it only when it first connects.
        except ImportError:
            raise ExportConfigError(
                f"--{flag} {uri!r} is on S3, which needs boto3: install the aws extra "
                "(`pip install 'embexport[aws]'`, or 'apache-beam[aws]')."
            ) from None
        check_s3_bucket_name(f"--{flag}", uri)


def check_input_output(input_pattern: str, matched: Sequence[str], output: str) -> None:
    """Refuses an --output that overlaps the corpus, so no run can read or replace its own input.

    Args:
        input_pattern: --input as given.
        matched: the paths --input matches now.
        output: --output.

    Raises:
        ExportConfigError: the output holds, is, or would be read as, corpus files.
    """
    directory = absolute(output)
    corpus_files = [path for path in matched if inside(absolute(path), directory)]
    if corpus_files:
        raise ExportConfigError(
            f"--output {output!r} holds files that --input {input_pattern!r} reads (e.g. "
            f"{corpus_files[0]!r}). Write the export to a directory outside the corpus."
        )
    pattern = absolute_pattern(input_pattern)
    regex = glob_regex(pattern)
    written = [name for name in _EXPORT_FILE_EXAMPLES if regex.fullmatch(directory + "/" + name)]
    if written:
        raise ExportConfigError(
            f"--input {input_pattern!r} would also match the files this export writes into "
            f"--output {output!r} (such as {written[0]!r}), so a later run would read its own "
            "output as corpus. Narrow the --input pattern or move --output elsewhere."
        )


def check_output_name(output: str) -> None:
    """Refuses an --output by its name alone, with no request to any store (also under --dry_run).

    Raises:
        ExportConfigError: a scheme no filesystem serves, a whole bucket, a glob
            character, a `_staging` directory, an invalid Cloud Storage bucket name.
    """
    check_location("output", output)
    if not is_local(output) and "/" not in output.split("://", 1)[-1].strip("/"):
        raise ExportConfigError(
            f"--output {output!r} names a whole bucket; an export needs a directory of its own "
            f"in it, such as {output.rstrip('/')}/exports/run1."
        )
    if any(ch in output for ch in GLOB_CHARACTERS):
        raise ExportConfigError(
            f"--output {output!r} holds one of {GLOB_CHARACTERS!r}, which Beam's file matching "
            "takes as a pattern; choose a directory name without them."
        )
    # A relative --output is written at its absolute path, which Beam matches too: a working
    # directory such as /data/run[1] failed the run at its very end (a Beam traceback).
    full = os.path.abspath(output) if FileSystems.get_scheme(output) is None else output
    if any(ch in full for ch in GLOB_CHARACTERS):
        raise ExportConfigError(
            f"--output {output!r} is {full!r}: the working directory holds one of {GLOB_CHARACTERS!r}, "
            "which Beam's file matching takes as a pattern; give an --output whose full path has none "
            "of them, or run from another directory."
        )
    if not is_local(output) and STAGING in output.rstrip("/").split("://", 1)[1].split("/"):
        # `state.check_not_inside_an_export` says the same after listing the store; this needs no request.
        raise ExportConfigError(
            f"--output {output!r} is below a directory named {STAGING}: exports stage their files "
            "there, and the next export in the directory above removes it whole. Choose an --output "
            "outside it."
        )
    if output.startswith("gs://"):
        check_gcs_bucket_name("output", output)


def check_output(output: str, overwrite: bool) -> None:
    """Refuses an output that cannot be written, or that holds files no export wrote.

    Raises:
        ExportConfigError: saying what is wrong and what to do instead.
    """
    from pipeline.writing.files import is_regular_file
    from pipeline.writing.state import check_not_inside_an_export, check_output_state, check_writable

    check_output_name(output)
    if is_regular_file(output):
        raise ExportConfigError(
            f"--output {output!r} is a file; --output names a directory for the export's files."
        )
    check_writable(output)
    check_not_inside_an_export(output)
    check_output_state(output, overwrite)


def listing_sha256(files: Iterable[InputFile], input_format: str) -> str:
    """SHA-256 of the launch listing as the rows depend on it, however --input spells the files.

    The files in the order the read ranks them (by path: which of two records of an
    id wins, where `--limit` cuts), each by what it is, its size and modification
    time: a local file by its real path, so `./a.jsonl`, `a.jsonl`, `/abs/a.jsonl`,
    a symbolic link to its directory or a glob listing the same files give the same
    digest (a resumed run continues), while a relative path from another working
    directory, naming other files, does not. A text file's ids hold its path as
    listed (`FILE:LINE`), so for text the listed path counts too.
    """
    directories: dict[str, str] = {}

    def real(path: str) -> str:
        # One realpath per directory (a million files share a few): a file that is no link is its name there.
        if os.path.islink(path):
            return os.path.realpath(path)
        directory, name = os.path.split(path)
        if directory not in directories:
            directories[directory] = os.path.realpath(directory)
        return os.path.join(directories[directory], name)

    entries = [
        [
            real(f.path) if is_local(f.path) else f.path,
            f.size,
            f.mtime,
            *([f.path] if input_format == "text" else []),
        ]
        for f in sorted(files, key=lambda f: path_key(f.path))
    ]
    return hashlib.sha256(json.dumps(entries).encode("utf-8")).hexdigest()


def check_input(pattern: str) -> list[InputFile]:
    """Lists --input once; refuses a pattern that matches no files, a directory, or a non-regular file.

    Returns:
        The `listing.InputFile` (path, size, modification time) of each matched
        file: the run reads these and checks each is unchanged before reading it.

    Raises:
        ExportConfigError: saying what is wrong with the pattern.
    """
    check_location("input", pattern)
    try:
        matched, non_regular = list_input(pattern)
    except AmbiguousPattern as error:
        raise ExportConfigError(str(error)) from None
    except Exception as error:  # Beam raises BeamIOError subclasses per filesystem.
        raise ExportConfigError(f"Cannot list --input {pattern!r}: {error}") from None
    if is_local(pattern) and os.path.isdir(pattern):
        raise ExportConfigError(
            f"--input {pattern!r} is a directory; --input takes a file or a file pattern, "
            f"e.g. {os.path.join(pattern, '*.jsonl')!r}."
        )
    if non_regular:
        names = ", ".join(f"{entry.path!r} ({entry.kind})" for entry in non_regular[:3])
        raise ExportConfigError(
            f"--input {pattern!r} matches {len(non_regular)} path(s) that are not regular files: {names}"
            f"{', ...' if len(non_regular) > 3 else ''}. Reading a named pipe or device can block "
            "forever; remove them or narrow the --input pattern."
        )
    if not matched:
        # A folder named with "[" (`in[a]/*.jsonl`) needs it written "[[]": Beam's globs quote nothing else.
        bracket = (
            f" A '[' starts a class of characters: if a name holds '[', write it as '[[]' "
            f"({pattern.replace('[', '[[]')!r})."
            if "[" in pattern
            else ""
        )
        raise ExportConfigError(f"--input {pattern!r} matches no files; check the path or pattern.{bracket}")
    if all(entry.link_target is not None for entry in matched):
        raise ExportConfigError(
            f"--input {pattern!r} matches only symbolic links to nothing (e.g. {matched[0].path!r} -> "
            f"{matched[0].link_target!r}); check the links or the pattern."
        )
    return matched


def finished_commit_message(output: str) -> str:
    """What a run says of the earlier export whose interrupted commit it just finished (without --overwrite).

    That run may have failed (too many dead letters, a file that broke): its export is
    committed all the same, `completed_with_errors`, and the killed run never said why.
    """
    from pipeline.writing.state import read_manifest

    manifest = read_manifest(output) or {}
    said = f"--output {output!r} held an export whose commit was cut short; it was finished just now, so "
    if manifest.get("status") == "succeeded":
        return said + (
            "the output holds that run's complete export. Pass --overwrite to replace it, or choose "
            "another --output."
        )
    return said + (
        f"the output holds that run's export, which completed with errors: {manifest.get('message')} Fix "
        "that, then pass --overwrite to replace it, or choose another --output."
    )


def check_locations(options: ExportOptions, check_remote: bool) -> tuple[InputFile, ...]:
    """Checks --input, --output and how they relate, before the (slow) model load.

    Returns:
        The files --input matches (`listing.InputFile`s); empty when it was not
        listed (an object-store pattern without `check_remote`).

    Raises:
        ExportConfigError: see `check_input`, `check_output` and `check_input_output`.
    """
    matched: list[str] | None = None
    files: tuple[InputFile, ...] = ()
    retry = False
    check_location("input", options.input)
    check_output_name(options.output)
    if check_remote:
        # Before Beam's first request, which retries an unreachable store for minutes.
        named = {"model": options.model, "tokenizer": options.tokenizer, "reuse": options.reuse}
        for flag, uri in named.items():
            if uri and (not is_local(uri) or file_uri_problem(flag, uri)):
                check_location(flag, uri)
        check_stores_answer(options, {"input": options.input, "output": options.output, **named})
    if check_remote or is_local(options.input):
        files = tuple(check_input(options.input))
        matched = [f.path for f in files]
    if check_remote or is_local(options.output):
        if check_remote:
            # A commit a crash cut short is finished before the output is judged (not by --dry_run).
            from pipeline.writing.commit import finish_failure, finish_interrupted_commit
            from pipeline.writing.layout import JOURNAL

            try:
                finished = finish_interrupted_commit(options.output)
            except OSError as error:  # A full disk, a read-only filesystem, a file where a folder goes, ...
                raise OutputWriteError(
                    f"--output {options.output!r} holds an export whose commit was cut short ({JOURNAL}), "
                    f"and finishing it failed: {finish_failure(error)}, then rerun."
                ) from None
            # The killed run may have been this same command (a scheduler's retry): once the run's
            # signature is known, `pipeline.running.export` stops there, or refuses as here.
            retry = finished and options.resume == "auto" and recovered_run(options.output) is not None
            if finished and not options.overwrite and not retry:
                raise ExportConfigError(finished_commit_message(options.output))
        check_output(options.output, options.overwrite or retry)
        if matched is not None:
            check_input_output(options.input, matched, options.output)
    return files
