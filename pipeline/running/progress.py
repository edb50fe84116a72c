"""Progress of a local run: workers count into small files, the launcher adds them up and reports.

Local runs may be several processes (`--direct_running_mode=multi_processing`),
so each worker process writes its running totals to its own JSON file in a
directory the launcher made; the launcher's `ProgressMonitor` thread sums the
files and shows a live bar (rich) when stderr is a terminal, or one log line
about every `interval` seconds otherwise. Counts are approximate while the run
works (a process writes its file at most once a second) and exact at the end.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # rich is imported only when a terminal shows the bar.
    from rich.progress import Progress, TaskID

_LOGGER = logging.getLogger("pipeline.running.progress")
# What the workers count.
# "rows_kept": the rows a resumed run kept of the run it continues, counted as their documents are met
# (written rows too, though written by that run: without them the counts would not add up).
KEYS = ("scanned_bytes", "read_bytes", "records", "rows", "rows_kept", "dead_letters")
# When (time.time()) a process counted its first row; the earliest over the processes is the run's.
FIRST_ROW_AT = "first_row_at"
_WRITE_EVERY_SECONDS = 1.0
# Seconds between the monitor's looks for a stall (--stall_timeout), at most.
STALL_LOOK_SECONDS = 5.0
# The share of the time a process of the run runs, or waits, ready, for a CPU to compute on, while at
# work: it is making progress (an idle one polls at a few percent; a stopped or blocked one neither runs
# nor waits).
BUSY_SHARE = 0.25
# A thread's wait for a CPU is work only where it computes once it has one: on average at least this
# many seconds each time it is given a CPU. A computing thread runs until the scheduler takes the CPU
# back (0.5 to 4 ms measured, under a container's CPU quota too); a poller that wakes to find nothing
# runs some 10 to 100 us, yet on a busy machine each of its wakes waits milliseconds for a CPU.
COMPUTING_SLICE_SECONDS = 250e-6
# Bytes a worker process reads or writes (files, pipes, mounts; `local_workers.io_bytes`) in one look that
# make it at work where it neither counts nor computes: a read from a slow mount, a row group written to
# NFS, a model copied from object storage (16 MB at a time). An idle or a stopped worker moves none (0 B
# measured); the launcher, whose watchdog reads files at every look, is not asked.
IO_WORK_BYTES = 64 << 10
# What the scheduler says of a thread (`local_workers.scheduler_times`): seconds on a CPU, seconds
# waiting, ready, for one, and how many times it was given one.
ThreadTimes = tuple[float, float, int]
# What a process counted: KEYS -> counts, and FIRST_ROW_AT -> a time.time() where one was counted.
Totals = dict[str, float]


class _NoProgress:
    """Stands in for a `ProgressRecorder` where no run watches the progress (no directory)."""

    def add(self, **counts: int) -> None:
        pass

    def flush(self) -> None:
        pass


class ProgressRecorder:
    """This process's running totals, written to `directory/<pid>-<token>.json` at most once a second."""

    def __init__(self, directory: str) -> None:
        self._path = os.path.join(directory, f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        self._counts: Totals = dict.fromkeys(KEYS, 0)
        self._lock = threading.Lock()
        self._written = 0.0

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._counts[key] += value
            if counts.get("rows") and FIRST_ROW_AT not in self._counts:
                self._counts[FIRST_ROW_AT] = time.time()
            if time.monotonic() - self._written >= _WRITE_EVERY_SECONDS:
                self._write()

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        temporary = self._path + ".tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(self._counts, handle)
            os.replace(temporary, self._path)
        except OSError:  # The launcher removed the directory: the run is over.
            pass
        self._written = time.monotonic()


_RECORDERS: dict[str, ProgressRecorder] = {}
_RECORDERS_LOCK = threading.Lock()


def recorder(directory: str | None) -> ProgressRecorder | _NoProgress:
    """The process's recorder for `directory` (shared by all DoFns of the process); a no-op for None."""
    if not directory:
        return _NoProgress()
    with _RECORDERS_LOCK:
        if directory not in _RECORDERS:
            _RECORDERS[directory] = ProgressRecorder(directory)
        return _RECORDERS[directory]


def read_totals(directory: str) -> Totals:
    """The sum of every worker's counts in `directory`, and the earliest `FIRST_ROW_AT`."""
    totals: Totals = dict.fromkeys(KEYS, 0)
    try:
        names = os.listdir(directory)
    except OSError:
        return totals
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as handle:
                counts = json.load(handle)
        except (OSError, ValueError):
            continue
        for key in KEYS:
            totals[key] += counts.get(key, 0)
        if counts.get(FIRST_ROW_AT):
            totals[FIRST_ROW_AT] = min(counts[FIRST_ROW_AT], totals.get(FIRST_ROW_AT, counts[FIRST_ROW_AT]))
    return totals


def work_seconds(
    before: dict[tuple[int, str], ThreadTimes], after: dict[tuple[int, str], ThreadTimes]
) -> dict[int, float]:
    """{pid: the seconds its threads worked from `before` to `after`}: their time on a CPU, and the time
    they waited for one where they compute once they have it (`COMPUTING_SLICE_SECONDS`).

    An idle thread's wait is no work: on a busy machine (or in a container whose CPU quota other work
    uses up) each of a poller's hundreds of wakes a second waits milliseconds for a CPU, which made an
    idle process look busy and a stopped worker's run never stall. A thread new since `before` is
    counted from the next look.
    """
    work: dict[int, float] = {}
    for (pid, task), (ran, waited, slices) in after.items():
        if (pid, task) not in before:
            continue
        ran_before, waited_before, slices_before = before[(pid, task)]
        ran, waited, slices = ran - ran_before, waited - waited_before, slices - slices_before
        computing = slices > 0 and ran / slices >= COMPUTING_SLICE_SECONDS
        work[pid] = work.get(pid, 0.0) + max(0.0, ran) + (max(0.0, waited) if computing else 0.0)
    return work


def _threads_before_the_run() -> set[tuple[int, str]]:
    """{(this process's pid, thread id)} of each of its threads but the calling one, as
    `local_workers.scheduler_times` names them; empty where /proc cannot say."""
    pid = os.getpid()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return set()
    return {(pid, task) for task in tasks if task != str(threading.get_native_id())}


def process_seconds() -> float:
    """Seconds since this process started (what a user has waited), or 0 where /proc cannot say."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            # Field 22, counted after the command name (which may hold spaces), is the start in clock ticks.
            started = int(handle.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime", encoding="ascii") as handle:
            return max(0.0, float(handle.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


def duration_text(seconds: float) -> str:
    """Seconds for people: "1:02:03" (hours, minutes, seconds)."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def size_text(size: float) -> str:
    """A byte count for people: "12.3 kB", "1,457 MB"."""
    return f"{size / 1e6:,.0f} MB" if size >= 1e6 else f"{size / 1e3:,.1f} kB"


class ProgressMonitor:
    """Reports a local run's progress from its workers' files until `stop()`.

    Args:
        directory: where the workers write (see `recorder`).
        total_bytes: the input's size: the ETA is input bytes consumed against it.
        limit: --limit, if given: the ETA is then records read against it.
        interval: seconds between log lines when stderr is not a terminal.
        stream: where a live bar goes (default stderr); a bar only if it is a terminal.
        stall_seconds: after this many seconds in which no count moved and no process of the
            run was busy, `on_stall(seconds, stall_seconds)` is called, once (0: never).
        on_stall: what ends a stalled run (`local_workers.stalled`).
        scheduler_times: what the scheduler says of each thread of the run's processes so far
            (`local_workers.scheduler_times`; `work_seconds` tells which were at work).
        io_bytes: the bytes each worker process has read and written so far (`local_workers.io_bytes`):
            one that moved `IO_WORK_BYTES` since the last look is at work.
    """

    def __init__(
        self,
        directory: str,
        total_bytes: int,
        limit: int | None = None,
        interval: float = 10.0,
        stream: TextIO | None = None,
        stall_seconds: float = 0.0,
        on_stall: Callable[[float, float], None] | None = None,
        scheduler_times: Callable[[], dict[tuple[int, str], ThreadTimes]] | None = None,
        io_bytes: Callable[[], dict[int, int]] | None = None,
    ) -> None:
        self._directory = directory
        self._total = max(1, total_bytes)
        self._limit = limit
        self._interval = interval
        self._stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._stall_seconds = stall_seconds
        self._on_stall = on_stall
        # The counts last seen, when they last moved, and when they were last looked at.
        self._counts: tuple[float, ...] = ()
        self._moved_at = self._looked_at = self._started
        self._scheduler_times = scheduler_times
        self._times: dict[tuple[int, str], ThreadTimes] = {}
        # This process's threads that are not the run's: those that ran before it (a library caller's own,
        # a service's), except the one that runs it. A caller's busy thread made the run look at work, so a
        # stopped or deadlocked worker held it forever.
        self._not_the_runs = _threads_before_the_run()
        self._io_bytes = io_bytes
        self._io: dict[int, int] = {}
        # Time to first row counts from the command's start (wall clock, as the workers record
        # their first row): imports and model loads included.
        self._command_started = time.time() - process_seconds()
        # (time, records, bytes) when reading was first seen: rates are measured from there.
        self._reading_start: tuple[float, float, float] | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressMonitor:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop(final=exc_type is None)

    def start(self) -> None:
        if self._stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(file=self._stream),
                transient=False,
            )
            self._task = self._bar.add_task("checking ids", total=self._total, status="")
            self._bar.start()
        self._thread = threading.Thread(target=self._run, name="ProgressMonitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = 0.5 if self._bar else self._interval
        # A stall is looked for more often than a line is logged: it ends the run in time.
        look = min(tick, STALL_LOOK_SECONDS) if self._stall_seconds else tick
        logged = time.monotonic()
        while not self._stop.wait(look):
            totals = read_totals(self._directory)
            self._watch_for_stall(totals, look)
            if time.monotonic() - logged >= tick - 0.01:
                logged = time.monotonic()
                self.report(totals=totals)

    def _watch_for_stall(self, totals: Totals, look: float) -> None:
        """Calls `on_stall` once no count has moved for `stall_seconds`."""
        if not self._stall_seconds or self._on_stall is None:
            return
        now = time.monotonic()
        counts = tuple(totals[key] for key in KEYS)
        # Timed from the monitor's start: a worker stopped, deadlocked or on a hung mount as it starts
        # (before anything is counted) hung the run forever. Its start-up (TensorFlow's import, the
        # model's load) counts nothing, but computes: no stall.
        # A look far later than due: this process was stopped (Ctrl-Z, a suspended machine) and the
        # run with it; the time it stood still is no stall of the workers.
        # A process that computes (a long batch, a model loading, counts it cannot write to a full
        # disk) is at work, also where a CPU limit or other work leaves it less than a quarter of a
        # core (its wait for one counts); an idle one polls at a few percent, a stopped one not at all.
        times = self._scheduler_times() if self._scheduler_times else {}
        times = {thread: seen for thread, seen in times.items() if thread not in self._not_the_runs}
        busy = any(
            seconds >= BUSY_SHARE * (now - self._looked_at)
            for seconds in work_seconds(self._times, times).values()
        )
        self._times = times
        # A worker waiting on a slow read or write (its thread sleeps: no CPU) moves bytes: at work too.
        io = self._io_bytes() if self._io_bytes else {}
        busy = busy or any(
            moved - self._io[pid] >= IO_WORK_BYTES for pid, moved in io.items() if pid in self._io
        )
        self._io = io
        if busy or counts != self._counts or now - self._looked_at > 2 * look + 5:
            self._counts, self._moved_at = counts, now
        self._looked_at = now
        if now - self._moved_at > self._stall_seconds:
            on_stall, self._on_stall = self._on_stall, None
            on_stall(now - self._moved_at, self._stall_seconds)

    def stop(self, final: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if final:
            self.report(final=True)
        if self._bar is not None:
            self._bar.stop()

    def line(self, totals: Totals, final: bool = False) -> str:
        """One progress line from summed `totals` (see `read_totals`)."""
        now = time.monotonic()
        read = totals["read_bytes"]
        if not read and not totals["records"] and not final:
            percent = 100 * min(totals["scanned_bytes"], self._total) / self._total
            return f"progress: checking ids, {percent:.0f}% of {size_text(self._total)} scanned"
        if self._reading_start is None:
            self._reading_start = (now, totals["records"], read)
        since, records_then, read_then = self._reading_start
        seconds = now - since
        if self._limit:
            fraction = min(1.0, totals["records"] / self._limit)
            done_then = min(1.0, records_then / self._limit)
        else:
            fraction = min(1.0, read / self._total)
            done_then = min(1.0, read_then / self._total)
        rate = (totals["records"] - records_then) / seconds if seconds >= 1 else None
        progress_rate = (fraction - done_then) / seconds if seconds >= 1 else 0
        eta = (1 - fraction) / progress_rate if progress_rate > 0 else None
        if final and self._limit and totals["records"] < self._limit:
            # The input ran out first: "2% of --limit 1,000" at the end read as a run cut short.
            scope = f"the whole input, under --limit {self._limit:,}"
        else:
            scope = f"{100 * fraction:.0f}% of " + (
                f"--limit {self._limit:,}" if self._limit else size_text(self._total)
            )
        parts = [
            f"{totals['records']:,} records read ({scope})",
            f"{totals['rows'] + totals.get('rows_kept', 0):,} rows written",
            f"{totals['dead_letters']:,} dead letters",
            f"{rate:,.0f} docs/s" if rate is not None else "docs/s pending",
        ]
        if final:
            parts.append(f"done in {duration_text(now - self._started)}")
        else:
            parts.append(f"ETA {duration_text(eta)}" if eta is not None else "ETA unknown")
        if totals.get(FIRST_ROW_AT):
            parts.append(f"first row after {duration_text(totals[FIRST_ROW_AT] - self._command_started)}")
        return "progress: " + ", ".join(parts)

    def report(self, final: bool = False, totals: Totals | None = None) -> None:
        totals = read_totals(self._directory) if totals is None else totals
        text = self.line(totals, final=final)
        if self._bar is not None and self._task is not None:
            reading = bool(totals["read_bytes"] or totals["records"])
            completed = totals["read_bytes"] if reading else totals["scanned_bytes"]
            if self._limit and reading:
                completed = self._total * min(1.0, totals["records"] / self._limit)
            self._bar.update(
                self._task,
                description="embedding" if reading else "checking ids",
                completed=self._total if final else completed,
                status=text.removeprefix("progress: "),
            )
        else:
            _LOGGER.info("%s", text)
