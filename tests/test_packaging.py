"""Worker packaging: the sdist and wheel carry the code, the default bundle and the sample corpus;
the wheel installs into a fresh environment; the Dockerfile matches setup.py's pins.

Builds run offline from a copy of the sources (so no build/ or egg-info lands in the
checkout), with the build tools of the test's own environment.
"""

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import apache_beam
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pipeline_fixtures import REPOSITORY, copy_sources

from models.bundle import DEFAULT_BUNDLE
from models.train import SAMPLE_CORPUS

BOOT = "/opt/apache/beam/boot"


def expected_files():
    """Paths, relative to the install root, that workers need: every module and the bundled data."""
    names = set()
    for package in ("models", "pipeline"):
        for directory, _, files in os.walk(os.path.join(REPOSITORY, package)):
            names |= {
                os.path.relpath(os.path.join(directory, name), REPOSITORY).replace(os.sep, "/")
                for name in files
                if name.endswith(".py")
            }
    names |= {f"models/data/default_bundle/{name}" for name in os.listdir(DEFAULT_BUNDLE)}
    names.add(os.path.relpath(SAMPLE_CORPUS, REPOSITORY).replace(os.sep, "/"))
    return names


def read_text(name):
    with open(os.path.join(REPOSITORY, name), encoding="utf-8") as handle:
        return handle.read()


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def setup_keywords():
    """The literal keyword arguments of the `setuptools.setup(...)` call in setup.py."""
    for node in ast.walk(ast.parse(read_text("setup.py"))):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "setup"
        ):
            return {
                k.arg: ast.literal_eval(k.value)
                for k in node.keywords
                if k.arg in ("install_requires", "python_requires")
            }
    raise AssertionError("setup.py has no setup(...) call")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist, built as Beam's stager builds it for --setup_file (`setup.py sdist`)."""
    source = copy_sources(tmp_path_factory.mktemp("source") / "embexport")
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)], cwd=source)
    (archive,) = [os.path.join(dist, name) for name in os.listdir(dist)]
    return archive


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory):
    """A wheel built from the sdist, as `pip install workflow.tar.gz` does on a worker."""
    dist = tmp_path_factory.mktemp("wheel")
    offline = ["--no-deps", "--no-build-isolation", "--no-index", "-q"]
    run([sys.executable, "-m", "pip", "wheel", *offline, "-w", str(dist), sdist])
    (archive,) = [os.path.join(dist, name) for name in os.listdir(dist) if name.endswith(".whl")]
    return archive


@pytest.mark.slow
def test_sdist_carries_code_and_data(sdist):
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = sorted(expected_files() - members)
    assert not missing, f"the sdist lacks {missing}"
    assert "setup.py" in members and not any(m.startswith("tests/") for m in members)


@pytest.mark.slow
def test_wheel_carries_code_and_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in members if n.endswith(".dist-info/METADATA"))
    missing = sorted(expected_files() - members)
    assert not missing, f"the wheel lacks {missing}"
    requirements = [
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    assert any(r.startswith("tensorflow") for r in requirements)
    assert any(r.startswith("apache-beam[gcp]") for r in requirements)


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_environment(wheel, tmp_path):
    """Installed elsewhere, the package finds its bundle and corpus in its own site-packages."""
    environment = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(environment)])
    python = str(environment / ("Scripts" if os.name == "nt" else "bin") / "python")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # The dependencies (TensorFlow, Beam) come from this environment, after the fresh one's own
    # site-packages; a plain path line does not run this environment's .pth hooks.
    with open(os.path.join(purelib, "zz_test_dependencies.pth"), "w") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import json, os, models.bundle, pipeline.running.export\n"
        "from models.bundle import DEFAULT_BUNDLE, read_manifest, sha256_file\n"
        "from models.train import SAMPLE_CORPUS\n"
        "manifest = read_manifest(DEFAULT_BUNDLE)\n"
        "print(json.dumps({'models': models.bundle.__file__, 'pipeline': pipeline.running.export.__file__,\n"
        "    'bundle': DEFAULT_BUNDLE, 'files': sorted(os.listdir(DEFAULT_BUNDLE)),\n"
        "    'hashes': all(sha256_file(os.path.join(DEFAULT_BUNDLE, name)) == digest\n"
        "                  for name, digest in manifest['sha256'].items()),\n"
        "    'corpus': os.path.getsize(SAMPLE_CORPUS)}))\n"
    )
    environment_variables = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    output = run([python, "-I", "-c", probe], cwd=tmp_path, env=environment_variables).stdout
    found = json.loads(output.strip().splitlines()[-1])
    for key in ("models", "pipeline", "bundle"):
        assert os.path.realpath(found[key]).startswith(os.path.realpath(purelib)), (key, found[key])
    assert found["files"] == sorted(os.listdir(DEFAULT_BUNDLE))
    assert found["hashes"]
    assert found["corpus"] == os.path.getsize(SAMPLE_CORPUS)


def dockerfile_instructions():
    """(instruction, arguments) pairs of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", read_text("Dockerfile"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_container_matches_the_pins():
    """The base image's Beam SDK and Python are the ones setup.py pins and the launcher runs."""
    instructions = dockerfile_instructions()
    bases = [arguments for instruction, arguments in instructions if instruction == "FROM"]
    assert len(bases) == 1, bases
    match = re.fullmatch(r"apache/beam_python(\d+)\.(\d+)_sdk:(\S+)", bases[0])
    assert match, f"FROM {bases[0]}: expected apache/beam_pythonX.Y_sdk:VERSION"
    python, beam = Version(f"{match[1]}.{match[2]}"), Version(match[3])

    keywords = setup_keywords()
    (beam_pin,) = [r for r in keywords["install_requires"] if r.startswith("apache-beam")]
    assert beam in SpecifierSet(beam_pin.split("]", 1)[-1]), (beam, beam_pin)
    assert python in SpecifierSet(keywords["python_requires"]), (python, keywords["python_requires"])
    # Dataflow runs the launcher's pipeline in the image: same Beam, same Python minor version.
    assert beam == Version(apache_beam.__version__)
    assert (python.major, python.minor) == sys.version_info[:2]

    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    assert f'"apache-beam[gcp]=={beam}"' in runs, "pip must keep the image's own Beam SDK"
    assert "pip install" in runs and "/tmp/embexport" in runs


def test_container_keeps_the_beam_entrypoint():
    entrypoints = [
        arguments for instruction, arguments in dockerfile_instructions() if instruction == "ENTRYPOINT"
    ]
    assert entrypoints, "the Dockerfile must keep Beam's ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == [BOOT]


def test_docker_context_leaves_out_the_environment():
    lines = [line.strip() for line in read_text(".dockerignore").splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "the build context should start from nothing"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {
        part.rstrip("/")
        for instruction, arguments in dockerfile_instructions()
        if instruction == "COPY"
        for part in arguments.split()[:-1]
    }
    assert copied <= allowed, f"COPY needs {sorted(copied - allowed)}, which .dockerignore leaves out"
