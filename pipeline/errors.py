"""The export's error types and the exit statuses of the command-line tools."""

# python -m pipeline.run (and the other commands) exit with these.
EXIT_OK = 0
EXIT_UNEXPECTED = 1  # a traceback; or, in one line, workers that died or a job service that went away
EXIT_CONFIG_ERROR = 2  # a flag, the model, the input or the output cannot work; nothing written
EXIT_ACCOUNTING_MISMATCH = 3  # records read != rows + dead letters (a bug: please report it)
EXIT_TOO_MANY_ERRORS = 4  # more than --max_error_fraction of the records were dead-lettered
EXIT_RECORDS_LOST = 5  # a file broke part-way: how many records it still held is unknown
# The output could not be written (a full disk, ...): the earlier export is kept, unless the commit failed
# past its commit point (its journal, which the next command on the output finishes, is left).
EXIT_OUTPUT_FAILED = 6
EXIT_ACCOUNTING_UNVERIFIED = 7  # the runner reported no committed counters: records read unknown
EXIT_HANGUP = 129  # SIGHUP (the terminal closed; not when started under `nohup`), as shells report it
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report it
EXIT_TERMINATED = 143  # SIGTERM (Kubernetes, systemd, CI), as shells report it


class ExportConfigError(ValueError):
    """A flag, the model, the input or the output location cannot work.

    Mostly raised at launch, before anything is written; also by a worker that
    cannot run what the launch checked (the model or tokenizer file replaced
    since, a forward pass other than the one the launch chose).
    """


class OutputBusyError(ExportConfigError):
    """Another live run holds the output directory; `holder` names it in words ("run R (pid P on H, ...)")."""

    def __init__(self, message: str, holder: str = "another run") -> None:
        super().__init__(message)
        self.holder = holder


class LockUnavailableError(ExportConfigError):
    """The output's lock cannot be written (a read-only filesystem, no permission, ...); `reason` says
    why, without what to do, for a command whose directory is not its --output (--reuse, analyze)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class LockLostError(OutputBusyError):
    """This run no longer holds its output (`OutputLock.check_held`): a lease taken over or gone, or
    locally a `_LOCK` that is not the file it locked.  `reason` says how, without what to do: a
    commit stopped past its commit point says something else to do than a run that committed nothing."""

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(f"{reason} {advice}")
        self.reason = reason


class OutputWriteError(Exception):
    """The output could not be written while the run worked (a full disk, ...); says what is left."""


class WorkerDiedError(Exception):
    """A local worker process was killed (the OOM killer, SIGKILL): the run stops, its durable rows kept."""
