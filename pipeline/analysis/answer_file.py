"""Writing a command's answer file (`--out`), only once the rows it came from are checked unchanged."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import BinaryIO

from pipeline.analysis.dataset import check_read_unchanged, uri_filesystem
from pipeline.uris import is_local
from pipeline.writing.files import write_whole_local


def write_answer(path: str, write: Callable[[BinaryIO], None], overwrite: bool = True) -> None:
    """Writes `path` by `write(handle)`; a reader sees the old file or the whole new one.

    The data read is checked unchanged (`dataset.check_read_unchanged`) after
    the answer is written out and before it is put in place, so an answer
    refused as mixing two exports' rows neither creates nor replaces `path`.
    Locally through a new file of its own renamed into place
    (`files.write_whole_local`, which never replaces a file that appeared
    meanwhile without `overwrite`); on object storage rendered in memory, then
    uploaded in one PUT, which is atomic.

    Raises:
        AnalysisError: the data changed while it was read; nothing was written.
    """
    if not is_local(path):
        buffer = io.BytesIO()
        write(buffer)
        check_read_unchanged()
        filesystem, where = uri_filesystem(path)
        with filesystem.open_output_stream(where) as sink:
            sink.write(buffer.getvalue())
        return

    def write_then_check(handle: BinaryIO) -> None:
        write(handle)
        check_read_unchanged()

    write_whole_local(path, write_then_check, replace=overwrite)
