"""Child Python commands for the tests, forked from one warm interpreter instead of started cold.

Most of a test's child run (`python -m pipeline.run ...`, `python tests/hooked_run.py ...`)
is the import of TensorFlow, Keras and Beam: 4 to 8 s of CPU each time. A
server process per test worker imports them once (in the order the command
does: `pipeline` first) and forks a child for each command, which then runs
the module or script as `__main__` exactly as `python` would: fresh globals,
`sys.argv`, `os.environ`, the working directory, its own stdin/stdout/stderr
(passed over a Unix socket), its own session when asked, root's power over file
permissions dropped when asked (as under setpriv), default signal
handlers, thread shutdown and `atexit` at its end, and an exit status as
`subprocess.Popen` reports it (`-N` when killed by signal N). The child is a
real process: tests kill it, signal its group and wait on it as before.

What a fork cannot give, a test keeps a cold process for: anything about what
the command imports (`tests/test_start.py`), a terminal, an installed wheel.
`EMBEXPORT_TEST_FORK=0` starts every child cold, as `python` itself.
"""

import array
import atexit
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENABLED = os.environ.get("EMBEXPORT_TEST_FORK", "1") != "0"
# What `python -m pipeline.run` imports before its first row, in its own order.
WARM_IMPORTS = (
    "pipeline",
    "numpy",
    "pyarrow",
    "pyarrow.parquet",
    "pyarrow.dataset",
    "tensorflow",
    "keras",
    "apache_beam",
    "apache_beam.runners.direct.direct_runner",
    "apache_beam.runners.portability.fn_api_runner",
    "apache_beam.ml.inference.base",
    "pipeline.running.export",
    "pipeline.planning.build",
    "pipeline.inference.embedder",
)
_FDS_PER_REQUEST = 4  # status socket, stdin, stdout, stderr


# --- the server --------------------------------------------------------------------------------


def _exit_code(error):
    """The status `python` exits with for an uncaught SystemExit."""
    code = error.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _fresh_stdio(unbuffered=False):
    """Text streams over fds 0-2 as a starting interpreter makes them (stderr line-buffered).

    `unbuffered`: as `python -u` makes them: stdout and stderr write through to their fds.
    """
    encoding = "utf-8"
    stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding=encoding)
    stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False)
        if unbuffered
        else io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
        encoding=encoding,
        line_buffering=os.isatty(1) and not unbuffered,
        write_through=unbuffered,
    )
    stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False)
        if unbuffered
        else io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding=encoding,
        errors="backslashreplace",
        line_buffering=not unbuffered,
        write_through=unbuffered,
    )
    sys.stdin = sys.__stdin__ = stdin
    sys.stdout = sys.__stdout__ = stdout
    sys.stderr = sys.__stderr__ = stderr


# The capabilities that let root read, write and search any file (capability.h), and their dropping.
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# `setpriv --bounding-set=-dac_override,-dac_read_search --`: what a cold child is started under.
WITHOUT_FILE_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _drop_file_override():
    """Drops root's power over file permissions from this process, as `WITHOUT_FILE_OVERRIDE` starts one.

    setpriv takes the two capabilities out of the bounding set, so that the command it
    execs never has them; a forked child, which execs nothing, also clears them from its
    effective, permitted and inheritable sets (capset(2)).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]

    header, data = Header(_LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    kept = ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    for name in ("effective", "permitted", "inheritable"):
        setattr(data[0], name, getattr(data[0], name) & kept)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _run_child(request, fds, others):
    """In the forked child: becomes `python ARGV` and never returns."""
    status_socket, stdin, stdout, stderr = fds
    code = 1
    try:
        for fd in (status_socket, *others):
            os.close(fd)
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in request["ignored_signals"]:  # as inherited ignored across exec (`nohup`)
            signal.signal(signum, signal.SIG_IGN)
        if request.get("without_file_override"):  # as `setpriv --bounding-set=-dac_override,...` does
            _drop_file_override()
        if request["address_space"] is not None:  # as `prlimit --as=N` starts a command
            import resource

            limit = request["address_space"]
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if request["new_session"]:
            os.setsid()
        for source, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(source, target)
            os.close(source)
        argv = request["argv"]
        unbuffered = argv[0] == "-u"
        _fresh_stdio(unbuffered)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import numpy

        numpy.random.seed()  # a cold interpreter seeds its global generator from the OS
        import runpy

        kind, target, *arguments = argv[1:] if unbuffered else argv
        if kind == "-m":
            sys.argv = [target, *arguments]
            sys.path[0] = request["cwd"]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "-c":
            sys.argv = ["-c", *arguments]
            sys.path[0] = ""
            main = sys.modules["__main__"].__dict__
            main.clear()
            main.update(__name__="__main__", __builtins__=__builtins__)
            exec(compile(target, "<string>", "exec"), main)
        else:
            sys.argv = [target, *arguments]
            sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
            runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as error:
        code = _exit_code(error)
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        if code < 0:  # `python` re-raises an uncaught KeyboardInterrupt as the signal itself
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code & 0xFF)


def serve(control_fd):
    """The server's loop: imports once, then forks a child per request until the tests hang up."""
    for name in WARM_IMPORTS:
        __import__(name)
    control = socket.socket(fileno=control_fd)
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at pytest is pytest's to handle
    children = {}  # pid -> status socket
    control.sendall(b"ready\n")
    while True:
        readable, _, _ = select.select([control, wakeup_read], [], [], 1.0)
        if wakeup_read in readable:
            os.read(wakeup_read, 4096)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply = children.pop(pid)
            try:
                reply.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            except OSError:
                pass
            reply.close()
        if control in readable:
            fds = array.array("i")
            message, ancillary, _, _ = control.recvmsg(
                65536, socket.CMSG_SPACE(_FDS_PER_REQUEST * fds.itemsize)
            )
            if not message:
                return
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
            request = json.loads(message)
            others = [control.fileno(), wakeup_read, wakeup_write, *(s.fileno() for s in children.values())]
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            pid = os.fork()
            if pid == 0:
                _run_child(request, list(fds), others)
            reply = socket.socket(fileno=fds[0])
            for fd in fds[1:]:
                os.close(fd)
            children[pid] = reply
            reply.sendall(json.dumps({"pid": pid}).encode() + b"\n")


# --- the tests' side ---------------------------------------------------------------------------

_server = None
_server_lock = threading.Lock()


def _connection():
    """The control socket to this test process's server, started on first use."""
    global _server
    with _server_lock:
        if _server is None:
            ours, theirs = socket.socketpair()
            environment = dict(os.environ, PYTHONPATH=REPOSITORY)
            environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            process = subprocess.Popen(
                [sys.executable, "-c", f"import forkserver; forkserver.serve({theirs.fileno()})"],
                cwd=REPOSITORY,
                env=dict(
                    environment, PYTHONPATH=os.pathsep.join([REPOSITORY, os.path.join(REPOSITORY, "tests")])
                ),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
            theirs.close()
            assert ours.makefile("rb").readline() == b"ready\n", "the fork server did not start"
            _server = (process, ours)
            atexit.register(_stop)
        return _server[1]


def _stop():
    process, control = _server
    control.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def _python_argv(command):
    """`command` as the server's request (`["-m", module, *args]` or `[script, *args]`), or None."""
    if not ENABLED or len(command) < 2 or command[0] != sys.executable:
        return None
    command = [os.fspath(part) for part in command]  # paths as `subprocess.Popen` takes them
    if command[1] == "-u":  # `python -u`: unbuffered stdout and stderr (`_fresh_stdio`)
        rest = _python_argv([command[0], *command[2:]])
        return rest and ["-u", *rest]
    if command[1] in ("-m", "-c") and len(command) >= 3:
        return list(command[1:])
    if command[1].endswith(".py") and not command[1].startswith("-"):
        return ["-s", *command[1:]]
    return None


class ForkedProcess:
    """A child forked by the server; what the tests use of `subprocess.Popen`."""

    def __init__(self, args, request, stdin, stdout, stderr, text):
        self.args = args
        self.returncode = None
        self.stdin = self.stdout = self.stderr = None
        ends = []
        mine = []
        for name, choice, mode in (("stdin", stdin, "w"), ("stdout", stdout, "r"), ("stderr", stderr, "r")):
            if choice == subprocess.PIPE:
                read_end, write_end = os.pipe()
                local, remote = (write_end, read_end) if mode == "w" else (read_end, write_end)
                ends.append(remote)
                mine.append(remote)
                stream = os.fdopen(local, mode + ("" if text else "b"))
                setattr(self, name, stream)
            elif choice == subprocess.DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                ends.append(fd)
                mine.append(fd)
            elif choice == subprocess.STDOUT and name == "stderr":
                ends.append(ends[1])
            elif choice is None:
                ends.append({"stdin": 0, "stdout": 1, "stderr": 2}[name])
            else:
                ends.append(choice if isinstance(choice, int) else choice.fileno())
        self._status, theirs = socket.socketpair()
        try:
            _connection().sendmsg(
                [json.dumps(request).encode()],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno(), *ends]))],
            )
        finally:
            theirs.close()
            for fd in mine:
                os.close(fd)
        self._replies = self._status.makefile("rb")
        self.pid = json.loads(self._replies.readline())["pid"]

    def poll(self):
        if self.returncode is None and select.select([self._status], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def _read_status(self):
        line = self._replies.readline()
        self.returncode = json.loads(line)["status"] if line else -signal.SIGKILL
        self._replies.close()
        self._status.close()

    def wait(self, timeout=None):
        if self.returncode is None:
            if not select.select([self._status], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        return self.returncode

    def communicate(self, input=None, timeout=None):
        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        outputs = {}

        def drain(name):
            stream = getattr(self, name)
            outputs[name] = stream.read()
            stream.close()

        readers = [
            threading.Thread(target=drain, args=(n,)) for n in ("stdout", "stderr") if getattr(self, n)
        ]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0, deadline - time.monotonic()))
        return outputs.get("stdout"), outputs.get("stderr")

    def send_signal(self, signum):
        if self.returncode is None:
            os.kill(self.pid, signum)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for stream in (self.stdout, self.stderr, self.stdin):
            if stream is not None and not stream.closed:
                stream.close()
        self.wait()


# The `subprocess.Popen` arguments a forked child takes; with any other, a command starts cold.
FORKED_OPTIONS = {"cwd", "env", "stdin", "stdout", "stderr", "text", "start_new_session"}


def popen(command, ignored_signals=(), address_space=None, without_file_override=False, **options):
    """`subprocess.Popen(command, **options)`, forked from the warm server when `command` runs Python code.

    `command` is `python -m MODULE ...`, `python -c CODE ...` or `python SCRIPT.py ...`
    with `sys.executable`, each also after `-u`; anything else, or another Popen argument,
    starts cold. `ignored_signals`: signals the child starts with ignored, as `nohup`
    starts a command with SIGHUP ignored (cold: by a shell that ignores them and execs the command;
    not a `preexec_fn`, which would run Python in a fork of the test process, whose gRPC threads
    left by an earlier test's pipeline can abort the child before its exec). `address_space`: the bytes
    the child may map (RLIMIT_AS, soft and hard), as `prlimit --as=N` starts a command (cold: by
    prlimit itself); a forked child starts with the server's imports mapped, under the same limit.
    `without_file_override`: root's child without its power over file permissions (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH), so that they apply to it as to an ordinary user (cold: under setpriv).
    """
    request = _python_argv(command)
    if request is None or set(options) - FORKED_OPTIONS:
        if without_file_override:
            command = [*WITHOUT_FILE_OVERRIDE, *command]
        if address_space is not None:
            command = ["prlimit", f"--as={address_space}", *command]
        if ignored_signals:
            names = " ".join(signal.Signals(signum).name.removeprefix("SIG") for signum in ignored_signals)
            command = ["sh", "-c", f'trap "" {names}; exec "$@"', "sh", *command]
        return subprocess.Popen(command, **options)
    env = options.get("env")
    request = {
        "argv": request,
        "cwd": os.path.abspath(options.get("cwd") or os.getcwd()),
        "env": dict(os.environ if env is None else env),
        "new_session": options.get("start_new_session", False),
        "ignored_signals": [int(signum) for signum in ignored_signals],
        "address_space": address_space,
        "without_file_override": without_file_override,
    }
    streams = (options.get(name) for name in ("stdin", "stdout", "stderr"))
    return ForkedProcess(command, request, *streams, options.get("text", False))


def run(
    command,
    cwd=None,
    env=None,
    capture_output=False,
    text=False,
    timeout=None,
    address_space=None,
    without_file_override=False,
):
    """`subprocess.run(command, ...)` through `popen`: a CompletedProcess (`address_space` and
    `without_file_override`: as `popen`'s)."""
    pipe = subprocess.PIPE if capture_output else None
    process = popen(
        command,
        cwd=cwd,
        env=env,
        stdout=pipe,
        stderr=pipe,
        text=text,
        address_space=address_space,
        without_file_override=without_file_override,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)
