"""Tells local paths from object-store URIs and compares them: absolute form, containment, glob."""

import os
import re

from apache_beam.io.filesystems import FileSystems


def is_local(uri: str) -> bool:
    """Whether `uri` is a path on this machine rather than an object-store URI (gs://, s3://)."""
    return FileSystems.get_scheme(uri) in (None, "file")


def file_uri_problem(flag: str, uri: str | None) -> str | None:
    """Why `uri`, a `file://` URI, cannot be given as `flag`, else None.

    `is_local` takes it for a path, but no Beam filesystem serves the scheme: the first
    request for it failed in a ValueError (a traceback for --tokenizer) that blamed a
    missing `apache-beam[gcp]`.
    """
    if not uri or FileSystems.get_scheme(uri) != "file":
        return None
    path = uri[len("file://") :]
    return (
        f"{flag} {uri!r} is a file:// URI, which Beam's filesystems do not read; give the local path "
        f"itself, {path!r}."
    )


def absolute(path: str) -> str:
    """A local path made absolute (symlinks resolved), or a URI without its trailing slash."""
    return os.path.realpath(path) if is_local(path) else path.rstrip("/")


def absolute_pattern(pattern: str) -> str:
    """A local pattern with its fixed directory part made absolute (symlinks resolved)."""
    first_glob = re.search(r"[*?\[]", pattern)
    if not is_local(pattern) or not first_glob:
        return absolute(pattern)
    cut = pattern.rfind("/", 0, first_glob.start())
    head, tail = (pattern[:cut] or "/", pattern[cut + 1 :]) if cut >= 0 else (".", pattern)
    return os.path.join(os.path.realpath(head), tail)


def inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or below it (both in the same absolute form)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex with the meaning of a Beam glob: `**` spans directories, `*` and `?` do not."""
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            parts.append(".*")
            index += 2
            continue
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        elif char == "[" and "]" in pattern[index + 1 :]:
            close = pattern.index("]", index + 1)
            # A "[" inside a class is itself ("[[]" is a literal "["), never a nested set.
            body = pattern[index + 1 : close].replace("\\", "\\\\").replace("[", "\\[")
            parts.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            index = close + 1
            continue
        else:
            parts.append(re.escape(char))
        index += 1
    return re.compile("".join(parts))
