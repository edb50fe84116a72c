"""The environment a run meets: non-UTF-8 names, the Keras backend, shadowing packages, start-up lines."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from pipeline_fixtures import REPOSITORY, is_empty_or_absent, write_jsonl

from models.paths import DEFAULT_BUNDLE
from pipeline.run import EXIT_CONFIG_ERROR, main
from pipeline.writing.layout import STAGING

# A Latin-1 "é": a valid Linux file name byte that is not UTF-8, as the OS hands it to Python.
LATIN1 = os.fsdecode(b"caf\xe9")


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("flag", ["--input", "--model", "--output", "--output relative, in such a folder"])
def test_a_name_that_is_not_utf8_is_refused_at_launch_in_one_line(flag, tmp_path, monkeypatch, capsys):
    """It ran the whole pipeline and then crashed at the commit (UnicodeEncodeError), or, for
    --output, while Beam built its graph, leaving `_staging` behind; a rerun crashed the same way."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "a", "content": "hello world", "title": "t"}])
    model, output = DEFAULT_BUNDLE, str(tmp_path / "out")
    if flag == "--input":
        corpus = tmp_path / f"{LATIN1}.jsonl"
        os.rename(tmp_path / "corpus.jsonl", corpus)
        named = str(corpus)
    elif flag == "--model":
        model = named = str(tmp_path / f"{LATIN1}_bundle")
        os.symlink(DEFAULT_BUNDLE, model)
    elif flag == "--output":
        output = named = str(tmp_path / f"{LATIN1}_out")
    else:
        folder = tmp_path / LATIN1
        folder.mkdir()
        monkeypatch.chdir(folder)
        output, named = "out", str(folder / "out")
    code = main(["--model", model, "--input", str(corpus), "--output", output, "--layer", "lstm_content"])
    assert code == EXIT_CONFIG_ERROR
    shown = named.replace(LATIN1, "caf\\xe9")
    assert _one_error_line(capsys) == (
        f"error: {flag.split()[0]} '{shown}' is not UTF-8 text (a file or folder name in another encoding, "
        "such as Latin-1), which the manifest and Parquet metadata cannot record; rename it to UTF-8 "
        "(e.g. `convmv -f latin1 -t utf-8 --notest NAME`)"
        + (
            ", or match the file with a glob pattern such as 'DIR/*.jsonl' (the names of the files a "
            "pattern lists are recorded escaped)."
            if flag == "--input"
            else "."
        )
    )
    target = os.path.join(os.getcwd(), output)
    assert is_empty_or_absent(target) and not os.path.exists(os.path.join(target, STAGING))


def test_a_flag_value_that_is_not_utf8_is_refused_in_the_equals_form(tmp_path, capsys):
    code = main(
        ["--input", str(tmp_path / "c.jsonl"), f"--keep_fields={LATIN1}", "--output", str(tmp_path / "o")]
    )
    assert code == EXIT_CONFIG_ERROR
    assert _one_error_line(capsys).startswith("error: --keep_fields 'caf\\xe9' is not UTF-8 text")
    assert not (tmp_path / "o").exists()


def test_a_utf8_name_that_python_read_as_ascii_is_told_how_to_run(tmp_path, monkeypatch, capsys):
    """`PYTHONUTF8=0 LC_ALL=C`: Python decodes a UTF-8 `café.jsonl` as ASCII (surrogate escapes),
    which was refused as "not UTF-8 text (a file or folder name in another encoding, such as Latin-1)"."""
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "ascii")
    name = "café.jsonl".encode().decode("ascii", "surrogateescape")
    assert main(["--input", str(tmp_path / name), "--output", str(tmp_path / "out")]) == EXIT_CONFIG_ERROR
    line = _one_error_line(capsys)
    assert line.startswith(
        f"error: --input {ascii(str(tmp_path / 'café.jsonl'))} is UTF-8, but Python reads"
    ), line
    assert line.endswith("run the command with PYTHONUTF8=1 (or LC_ALL=C.UTF-8).")
    assert os.listdir(tmp_path) == []


def _fresh(args: list[str], cwd: str, **environment: str) -> subprocess.CompletedProcess:
    """`python ARGS` in a new interpreter (not the test's, which has Keras and TensorFlow loaded)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**env, **environment},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("where", ["KERAS_BACKEND", "keras.json"])
def test_another_keras_backend_is_ignored_in_one_line_and_the_model_runs_on_tensorflow(where, tmp_path):
    """KERAS_BACKEND=jax (or keras.json's "backend") was a traceback: jax is not installed."""
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    environment = {"KERAS_BACKEND": "jax"} if where == "KERAS_BACKEND" else {"KERAS_HOME": str(tmp_path)}
    script = (
        "import sys; import pipeline.inspect; import keras; print(keras.backend.backend()); "
        "sys.exit(pipeline.inspect.main([sys.argv[1]]))"
    )
    done = _fresh(["-c", script, DEFAULT_BUNDLE], str(tmp_path), **environment)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "tensorflow"
    assert "lstm_content" in done.stdout
    source = "KERAS_BACKEND" if where == "KERAS_BACKEND" else str(tmp_path / "keras.json")
    ignored = f"Keras backend 'jax' (from {source}) is ignored: this tool runs Keras on TensorFlow."
    assert done.stderr.splitlines().count(ignored) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_keras_writes_no_config_file_into_the_home_directory(tmp_path):
    """Keras saves `~/.keras/keras.json` on its first import where none is there: every command, a
    refused one too, wrote into the user's home, where nothing outside the output is written."""
    home = tmp_path / "home"
    home.mkdir()
    done = _fresh(["-c", "import models, keras; print(keras.config.floatx())"], str(tmp_path), HOME=str(home))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["float32"]  # Keras's defaults, as from the file it would have written
    assert os.listdir(home) == []


@pytest.mark.parametrize("command", ["pipeline.run", "pipeline.inspect", "pipeline.vocabulary"])
def test_a_models_package_in_the_working_directory_is_named_in_one_line(command, tmp_path):
    """A project's own `models/` (first on the path with `python -m`) was an ImportError traceback."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text('"""my own Keras models"""\n')
    done = _fresh(["-m", command, "--help"], str(tmp_path))
    ours = os.path.join(REPOSITORY, "models")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: Python imports the package 'models' from {tmp_path / 'models'}, not embexport's "
        f"({ours}): the current directory (first on Python's path with `python -m`) or "
        "PYTHONPATH holds another 'models' package. Run the command from another directory, or "
        "rename that package (or take its folder off PYTHONPATH)."
    ]


@pytest.mark.parametrize(
    ("command", "how"),
    [
        ("pipeline.run", {"PYTHONOPTIMIZE": "2"}),
        ("pipeline.inspect", {"PYTHONOPTIMIZE": "2"}),
        ("pipeline.vocabulary", {"PYTHONOPTIMIZE": "2"}),
        ("pipeline.analyze", {}),  # `python -OO`
    ],
)
def test_stripped_docstrings_are_one_error_line(command, how, tmp_path):
    """Beam's import reads pandas' docstrings: under -OO every command was an AttributeError traceback."""
    done = _fresh([*([] if how else ["-OO"]), "-m", command, "--help"], str(tmp_path), **how)
    assert done.returncode == 2
    fix = "unset PYTHONOPTIMIZE (or set it to 1)" if how else "run python without -OO"
    assert done.stderr.splitlines() == [
        "error: Python runs with its docstrings stripped (PYTHONOPTIMIZE=2 or python -OO), and Apache Beam "
        f"cannot be imported so (it reads pandas' docstrings as it loads); {fix} and run the command again."
    ]


@pytest.mark.parametrize("command", ["pipeline.run", "pipeline.inspect", "pipeline.vocabulary"])
def test_a_folder_of_model_files_named_models_is_no_package_in_the_way(command, tmp_path):
    """A project's `models/` folder holding model files (no __init__.py) was refused as another
    'models' package: Python's path finder returns such a folder as a namespace package before an
    editable install's finder is asked, so every command failed to start from that directory."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "encoder.keras").write_bytes(b"")
    done = _fresh(["-m", command, "--help"], str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m ")


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--runtime_type_check"],
            "error: --runtime_type_check fails on Beam's own Parquet writer (its declared output type is "
            "wrong: apache/beam pull request 38155); pass --performance_runtime_type_check instead, "
            "which checks the types between steps.",
        ),
        (
            ["--type_check_additional", "bogus"],
            "error: Beam refuses the pipeline options: Unrecognized --type_check_additional feature: "
            "bogus. Correct or leave out the flags named.",
        ),
        (
            ["--resource_hints", "min_ram=lots"],
            "error: Beam refuses the pipeline options: --resource_hints: Resource hint min_ram has "
            "invalid value lots. Correct or leave out the flags named.",
        ),
        (
            ["--pickle_library", "dill"],
            "error: --pickle_library dill needs the dill package, which is not installed; leave the "
            "flag out (Beam's default, cloudpickle) or install apache-beam[dill].",
        ),
        (
            # Beam takes any value of its untyped --dry_run as true: a dry run, exit 0, nothing exported.
            ["--dry_run=False"],
            "error: --dry_run=False would still make a dry run (Beam takes any value of --dry_run as "
            "true): nothing would be exported. Leave --dry_run out for a real run, or pass --dry_run=True.",
        ),
        # The local runner ignored both: a batch run, with worker processes of its own flags.
        (
            ["--streaming"],
            "error: --streaming does nothing on the local runner, which reads the corpus (a bounded "
            "input) in one batch run; leave it out.",
        ),
        (
            ["--sdk_worker_parallelism", "4"],
            "error: --sdk_worker_parallelism 4 does nothing on the local runner; for worker processes pass "
            "--direct_running_mode multi_processing --direct_num_workers N (a corpus of 64 MB or more "
            "gets one per core by itself).",
        ),
    ],
)
def test_beam_flags_that_would_fail_the_started_run_are_refused_at_launch(flags, message, tmp_path, capsys):
    """Both passed the flag check, loaded the model, made `_staging`, then died in tracebacks."""
    if "dill" in flags and importlib.util.find_spec("dill") is not None:
        pytest.skip("dill is installed here: --pickle_library dill is then Beam's to run")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "content": "hello world", "title": "t"}])
    output = tmp_path / "out"
    code = main(["--input", str(corpus), "--output", str(output), "--limit", "1", *flags])
    assert code == EXIT_CONFIG_ERROR
    assert _one_error_line(capsys) == message
    assert not output.exists()


def test_vocabulary_refuses_an_output_that_is_not_utf8(tmp_path, capsys):
    from pipeline import vocabulary

    output = tmp_path / LATIN1
    assert vocabulary.main(["--output", str(output)]) == EXIT_CONFIG_ERROR
    assert _one_error_line(capsys).startswith(f"error: --output '{tmp_path}/caf\\xe9' is not UTF-8 text")
    assert not output.exists()


@pytest.mark.parametrize("level", [None, "3"])
def test_a_refusal_in_a_fresh_interpreter_prints_only_its_error_line(level, tmp_path):
    """TensorFlow's start-up INFO lines (absl's banner, oneDNN, CUDA probing: six on a CPU-only
    machine) came before the one `error:` line, whatever TF_CPP_MIN_LOG_LEVEL said."""
    environment = dict(os.environ)
    environment.pop("TF_CPP_MIN_LOG_LEVEL", None)  # conftest sets it for the test process
    if level:
        environment["TF_CPP_MIN_LOG_LEVEL"] = level
    command = [sys.executable, "-m", "pipeline.run", "--batch_size", "inf"]
    done = subprocess.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == EXIT_CONFIG_ERROR
    assert done.stderr.splitlines() == [
        "error: --batch_size must be an integer from 1 to 100,000 (documents per forward pass), "
        "received 'inf'."
    ]


def test_what_is_not_a_start_up_line_is_passed_on_even_when_the_import_aborts(tmp_path):
    """The lines are dropped by a forked reader of a pipe: a fatal message just before an abort
    (TensorFlow's on a CPU without AVX) still reaches stderr, as do warnings."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    chatter = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796626617.134192    3369 port.cc:153] oneDNN custom operations are on.\n"
        "I0000 00:00:1796626617.143575    3369 cudart_stub.cc:31] Could not find cuda drivers\n"
    )
    real = (
        "W0000 00:00:1796626617.2    3369 cpu_feature_guard.cc:1] a real warning\n"
        "The TensorFlow library was compiled to use AVX instructions, but these aren't available.\n"
    )
    (fake / "__init__.py").write_text(
        f"import os, sys\nos.write(2, {(chatter + real).encode()!r})\n"
        "print('a Python warning', file=sys.stderr, flush=True)\nos.abort()\n"
    )
    script = "from models.start_lines import import_tensorflow_quietly; import_tensorflow_quietly()"
    done = _fresh(["-c", script], str(tmp_path), PYTHONPATH=f"{tmp_path}{os.pathsep}{REPOSITORY}")
    assert done.returncode == -signal.SIGABRT
    assert done.stderr == real + "a Python warning\n"


CUINIT_LINE = (
    "E0000 00:00:1796669569.844668   23600 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA "
    "error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
)


@pytest.mark.skipif(
    any(os.path.exists(device) for device in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")),
    reason="a machine with a GPU device keeps TensorFlow's cuInit line: it is news there",
)
def test_the_cuinit_line_of_a_machine_without_a_gpu_is_dropped_and_the_rest_passed_on(tmp_path):
    """TensorFlow prints "failed call to cuInit" as it first lists its devices, on every machine with its
    CUDA libraries and no GPU: it came before every refusal made after the model load, and in every
    run's log. The import now lists the devices while the filter is on."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os\n"
        "class config:\n"
        "    @staticmethod\n"
        "    def list_physical_devices(kind):\n"
        f"        os.write(2, {(CUINIT_LINE + 'W0000 a real warning').encode()!r} + b'\\n')\n"
        "        return []\n"
    )
    script = "from models.start_lines import import_tensorflow_quietly; import_tensorflow_quietly()"
    done = _fresh(["-c", script], str(tmp_path), PYTHONPATH=f"{tmp_path}{os.pathsep}{REPOSITORY}")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "W0000 a real warning\n"


def test_worker_processes_tensorflow_start_up_lines_are_dropped(monkeypatch, capsys):
    """Local worker processes (--direct_running_mode multi_processing) passed on TensorFlow's absl banner,
    oneDNN and CUDA-probing lines, twice each, and their cuInit line, in every such run's output."""
    import io

    from pipeline.running import local_workers

    monkeypatch.setattr(local_workers, "has_gpu_device", lambda: False)
    lines = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796670525.766817   12621 port.cc:153] oneDNN custom operations are on.\n"
        "I0000 00:00:1796670525.776752   12621 cudart_stub.cc:31] Could not find cuda drivers.\n"
        + CUINIT_LINE
        + "WARNING root: a worker's own warning\n"
    )
    local_workers._copy_stderr(io.BytesIO(lines.encode()))
    assert capsys.readouterr().err == "WARNING root: a worker's own warning\n"
    # Where a GPU is, its failing cuInit is news: kept.
    monkeypatch.setattr(local_workers, "has_gpu_device", lambda: True)
    local_workers._copy_stderr(io.BytesIO(CUINIT_LINE.encode()))
    assert capsys.readouterr().err == CUINIT_LINE


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...), or None once it is gone."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def test_a_ctrl_c_while_tensorflow_loads_is_one_interrupted_line(tmp_path):
    """TensorFlow now loads first, with stderr piped through a forwarder: a Ctrl-C meanwhile
    is still the one `interrupted:` line, and the forwarder ends with the command."""
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME", "PYTHONPATH")}
    output = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.run", "--limit", "3", "--output", str(output)]
    process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stderr=subprocess.PIPE, text=True)
    children = pathlib.Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + 120
    # The forwarder is this command's one child while TensorFlow loads.
    while not children.read_text().split():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    forwarder = int(children.read_text().split()[0])
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130
    assert stderr.splitlines() == [
        "interrupted: the run stopped during its launch checks (SIGINT), before this run wrote anything; "
        "nothing was committed. Rerun the same command to start the export."
    ]
    # It closed stderr (communicate saw its end) as it exited: gone, or a zombie, within moments.
    deadline = time.monotonic() + 30
    while _state(forwarder) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(forwarder) in (None, "Z")
    assert not output.exists()


@pytest.mark.parametrize(
    "command, argv",
    [
        ("pipeline.run", ["--limit", "2"]),
        ("pipeline.run", ["--limit", "2", "--output", "relative"]),
        ("pipeline.inspect", ["model_dir"]),
        ("pipeline.vocabulary", ["--output", "relative"]),
        ("pipeline.analyze", ["relative", "plot"]),
        ("models.train", ["--output", "relative"]),
    ],
)
def test_a_removed_working_directory_is_one_error_line(command, argv, tmp_path, monkeypatch, capsys):
    """Another terminal's `rm -rf` of the directory a command runs in: pipeline.run (the quickstart's
    default --output, or a relative one) and inspect ended in a FileNotFoundError traceback, and
    vocabulary blamed object-storage credentials."""
    import importlib

    removed = tmp_path / "removed"
    removed.mkdir()
    monkeypatch.chdir(removed)
    monkeypatch.setenv("PWD", str(removed))
    removed.rmdir()
    assert importlib.import_module(command).main(argv) == EXIT_CONFIG_ERROR
    assert _one_error_line(capsys) == (
        f"error: the working directory '{removed}' no longer exists (it was removed or renamed after the "
        "shell entered it); cd to an existing directory and run the command again."
    )
    assert os.listdir(tmp_path) == []
