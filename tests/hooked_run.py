"""`python tests/hooked_run.py HOOK... -- FLAGS`: `python -m pipeline.run FLAGS` with test faults installed.

The tests of crashes and signals run the real command in a child process and
need it to die, pause or fail at a known point, not after a guessed sleep.
Each HOOK is one of:

    kill:ACTION:N            SIGKILL itself before the N-th commit step of ACTION (1-based)
    pause:ACTION:N:MARKER    before that step, create MARKER.paused and wait for MARKER.go
    fail:ACTION:N            raise ENOSPC ("no space left on device") at that step
    inference_pause:N:MARKER in the N-th forward pass, create MARKER.paused and wait for MARKER.go
    enospc:BYTES             files created under the output's _staging/ raise ENOSPC once
                             BYTES were written into them in all
    fsize:BYTES              the process's file-size limit (`ulimit -f`): a write past BYTES fails
                             with EFBIG, as the kernel does it

ACTION is a step of the commit (`pipeline.writing.files.step_hook`: "hash", "write", "rename", "copy",
"delete", "mkdir") or "any".
"""

import errno
import os
import signal
import sys
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)


def _wait(marker):
    open(marker + ".paused", "w").close()
    while not os.path.exists(marker + ".go"):
        time.sleep(0.01)


def _commit_hook(kind, action, count, marker=None):
    from pipeline.writing import files as files_lib

    seen = [0]
    # Hooks chain: `pause:hash:1:M fail:rename:2` pauses, then fails later in the same commit.
    previous = files_lib.step_hook

    def hook(step, relative):
        if previous is not None:
            previous(step, relative)
        if action not in ("any", step):
            return
        seen[0] += 1
        if seen[0] != count:
            return
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "pause":
            _wait(marker)
        else:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), relative)

    files_lib.step_hook = hook


def _inference_hook(count, marker):
    from pipeline.inference.transforms import EmbeddingModelHandler

    run_inference = EmbeddingModelHandler.run_inference
    seen = [0]

    def paused(self, batch, model, inference_args=None):
        seen[0] += 1
        if seen[0] == count:
            _wait(marker)
        return run_inference(self, batch, model, inference_args)

    EmbeddingModelHandler.run_inference = paused


class _FullDisk:
    """A file that raises ENOSPC once the files written through `_FullDisk`s hold `limit` bytes."""

    written = 0
    limit = 0

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        if _FullDisk.written + len(data) > _FullDisk.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.written += len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


def _enospc_hook(limit):
    import pyarrow as pa
    from apache_beam.io.localfilesystem import LocalFileSystem

    create = LocalFileSystem.create
    _FullDisk.limit = limit

    def full_create(self, path, *args, **kwargs):
        handle = create(self, path, *args, **kwargs)
        return _FullDisk(handle) if "/_staging/" in path else handle

    LocalFileSystem.create = full_create
    # Row files are written through pyarrow's own files (`pipeline.writing.shards._LocalFile`).
    native = pa.OSFile

    def full_native(path, mode="r", **kwargs):
        if "/_staging/" in path and mode == "wb":
            return pa.PythonFile(_FullDisk(open(path, "wb")), mode="w")
        return native(path, mode, **kwargs)

    pa.OSFile = full_native


def _fsize_hook(limit):
    import resource

    # Python ignores SIGXFSZ at start-up, so a write past the limit fails with EFBIG; a child
    # forked by the tests' fork server starts with the default action (ending the process).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def main(argv):
    split = argv.index("--")
    for hook in argv[:split]:
        kind, *values = hook.split(":")
        if kind in ("kill", "fail"):
            _commit_hook(kind, values[0], int(values[1]))
        elif kind == "pause":
            _commit_hook(kind, values[0], int(values[1]), ":".join(values[2:]))
        elif kind == "inference_pause":
            _inference_hook(int(values[0]), ":".join(values[1:]))
        elif kind == "enospc":
            _enospc_hook(int(values[0]))
        elif kind == "fsize":
            _fsize_hook(int(values[0]))
        else:
            raise SystemExit(f"unknown hook {hook!r}")
    from pipeline import run

    run.run_main(argv[split + 1 :])


if __name__ == "__main__":
    main(sys.argv[1:])
