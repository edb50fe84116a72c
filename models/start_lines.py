"""Keeps TensorFlow's start-up INFO lines off a command's stderr while it first imports TensorFlow.

TensorFlow 2.21 logs, from its shared libraries' initialisers and before absl
logging is initialised (so `TF_CPP_MIN_LOG_LEVEL` does not apply to them), twice:
absl's "All log messages before absl::InitializeLog() ..." banner, the oneDNN
notice (port.cc), "Could not find cuda drivers" (cudart_stub.cc) and the
CPU-feature notice (cpu_feature_guard.cc).  On a CPU-only machine they came
before every `error:` line.  Only those INFO lines are dropped: everything else
written to stderr meanwhile (warnings, a Python traceback, TensorFlow's own
errors) is passed on as it comes, by a forked process that reads the pipe,
which also outlives an abort of this one, so a fatal message is never lost.
Setting `TF_ENABLE_ONEDNN_OPTS=0` would silence one of them, but changes the numbers.
TensorFlow's "failed call to cuInit" ERROR line, printed as it first lists its
devices on a machine with its CUDA libraries and no GPU, is dropped too where no
GPU device file exists: the import lists the devices while the filter is on.
Local worker processes' stderr goes through `is_start_line` as well
(`pipeline.running.local_workers`).
"""

import os
import re
import signal
import sys
import time

# A whole stderr line that TensorFlow's start prints for information only.
START_LINE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [\d:.]+ +\d+ (?:port|cudart_stub|cpu_feature_guard)\.cc:\d+\] [^\n]*"
    rb"|To enable the following instructions: [^\n]*rebuild TensorFlow with the appropriate compiler flags\."
)
# TensorFlow's ERROR line when no CUDA device answers, printed as it first lists its devices.
NO_CUDA_LINE = re.compile(rb"E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] failed call to cuInit: [^\n]*")
# The device files of an NVIDIA GPU (and WSL2's of any GPU): without them there is none to use.
GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")
# How long the import waits for the forwarder to pass on its last lines, so that they come
# before what the command prints next; a process started meanwhile that holds stderr delays it.
DRAIN_SECONDS = 2.0


def has_gpu_device() -> bool:
    """Whether this machine has a GPU device file, where TensorFlow's failing cuInit is news."""
    return any(os.path.exists(device) for device in GPU_DEVICES)


def is_start_line(line: bytes, gpu_device: bool) -> bool:
    """Whether `line` (without its newline) is TensorFlow start-up noise: its INFO lines, and its
    "failed call to cuInit" ERROR where there is no GPU to use (`gpu_device` False), which it prints on
    every machine with TensorFlow's CUDA libraries and no GPU, and which reads as a failure."""
    return bool(START_LINE.fullmatch(line)) or (not gpu_device and bool(NO_CUDA_LINE.fullmatch(line)))


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (a no-op once imported) with its start-up INFO lines dropped from stderr."""
    if "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # No stderr to filter: closed, or None.
        import tensorflow

        return
    read_end, write_end = os.pipe()
    pipe = os.fstat(write_end)
    # A stop signal is handled (pipeline.run's handler redirects fd 2) only once fd 2 is wholly
    # the pipe or wholly stderr again, never in between.
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    gpu_device = has_gpu_device()
    forwarder = os.fork()
    if forwarder == 0:
        _forward(read_end, write_end, saved, gpu_device)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        import tensorflow

        # TensorFlow probes CUDA (and prints its cuInit line) as it first lists its devices: here,
        # inside the filter. Listing them does not start the runtime, so thread settings still apply.
        tensorflow.config.list_physical_devices("GPU")
    except BaseException:
        # Stopped (Ctrl-C) or failed: what follows is the command's to say at once; the
        # forwarder passes on what came before and ends with the pipe.
        _restore(saved, pipe, forwarder, 0.0, stops)
        raise
    _restore(saved, pipe, forwarder, DRAIN_SECONDS, stops)


def _restore(
    saved: int, pipe: os.stat_result, forwarder: int, drain_seconds: float, stops: set[signal.Signals]
) -> None:
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        now = os.fstat(2)
        # A stop signal's handler may have pointed fd 2 elsewhere (/dev/null) meanwhile: its choice stands.
        if (now.st_dev, now.st_ino) == (pipe.st_dev, pipe.st_ino):
            os.dup2(saved, 2)  # Closes this process's end of the pipe: the forwarder reads to its end.
        os.close(saved)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _reap(forwarder, drain_seconds)


def _forward(read_end: int, write_end: int, target: int, gpu_device: bool) -> None:
    """The forked forwarder: copies lines from the pipe to the real stderr, less the start-up lines."""
    try:
        # A Ctrl-C or SIGTERM to the process group is the command's to report; this one
        # ends when the pipe does, after passing on what the command wrote before it stopped.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.close(write_end)
        pending = b""
        while chunk := os.read(read_end, 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not is_start_line(line, gpu_device):
                    _write_all(target, line + b"\n")
        if pending and not is_start_line(pending, gpu_device):
            _write_all(target, pending)
    except BaseException:
        pass  # Nothing of the parent's may run in this copy of it (its finally blocks, its atexit).
    finally:
        os._exit(0)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _reap(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        if time.monotonic() >= deadline:
            return  # Still draining (a process started meanwhile holds the pipe): never wait on it.
        time.sleep(0.005)
