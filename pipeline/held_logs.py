"""Holds back the ERROR logs of a block: let through after it, unless its failure is told in one line."""

import logging
from typing import Self


class HeldErrorLogs(logging.Filter):
    """`with HeldErrorLogs(prefix) as held:` holds the ERROR records of loggers named `prefix...`.

    Beam logs a failure with its traceback before it raises; when the failure becomes
    our one `error:` line, `drop()` forgets them. Whatever is still held when the
    block ends is let through to the handlers, in order.
    """

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self._prefix = prefix
        self.records: list[logging.LogRecord] = []
        self._handlers: list[logging.Handler] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.name.startswith(self._prefix):
            self.records.append(record)
            return False
        return True

    def drop(self) -> None:
        """Forgets the records held so far: the failure they log is told otherwise."""
        self.records.clear()

    def __enter__(self) -> Self:
        self._handlers = list(logging.getLogger().handlers)
        for handler in self._handlers:
            handler.addFilter(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handler in self._handlers:
            handler.removeFilter(self)
        for record in self.records:
            logging.getLogger(record.name).handle(record)
