"""Where the bundled data lives, the checks of a `~` the shell left and a removed working directory, and
what a path that is not a regular file is."""

import os
import stat
from collections.abc import Mapping

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_BUNDLE = os.path.join(DATA_DIR, "default_bundle")
SAMPLE_CORPUS = os.path.join(DATA_DIR, "sample_corpus.jsonl")


def unexpanded_home(paths: Mapping[str, str | None]) -> str | None:
    """Why the first of `paths` (flag or argument -> path) that starts with '~' cannot be used, else None.

    The shell expands `~` only at the start of a word: after `--output=`, or inside
    quotes, it reaches a command as it is, which would then make a directory named
    `~` in the working directory (one `rm -rf ~` away from deleting the home directory).
    """
    for name, path in paths.items():
        if path and path.startswith("~"):
            how = f"write {name} {path} with a space" if name.startswith("--") else "leave the ~ unquoted"
            return (
                f"{name} {path!r} starts with '~', which the shell did not expand (it does not after '=' "
                f"or inside quotes): {how}, or give the full path, {os.path.expanduser(path)!r}."
            )
    return None


def removed_working_directory() -> str | None:
    """Why a command cannot run from a working directory removed after the shell entered it, else None.

    Every relative path (the default --output, a relative --input, --model or
    --output) is resolved against it, and `os.getcwd()` then raises: a traceback,
    or a misleading message, at the first one.
    """
    try:
        os.getcwd()
    except FileNotFoundError:
        where = os.environ.get("PWD")
        return (
            f"the working directory{f' {where!r}' if where else ''} no longer exists (it was removed or "
            "renamed after the shell entered it); cd to an existing directory and run the command again."
        )
    return None


def file_kind(mode: int) -> str:
    """What a file of `mode` (the `st_mode` of `os.stat` or `os.lstat`) that is not a regular file is, for a
    message: a symbolic link, a directory, a device (`/dev/null`), a named pipe (FIFO) or a socket."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    return "a socket" if stat.S_ISSOCK(mode) else "something other than a regular file"
