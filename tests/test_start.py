"""A shorter start: the launch's fast path check travels with the plan, and one model load per process.

Workers in the launcher's environment (this host, the same TensorFlow, Keras
and numpy) follow the forward passes the launch chose and checked instead of
checking the fast path against Keras again; elsewhere (a Dataflow worker) they
check.  A worker in the launcher's own process uses the launcher's `Embedder`.
"""

import dataclasses
import os
import subprocess
import sys

import pytest
from pipeline_fixtures import REPOSITORY, write_jsonl

from models.fast_path import FAST, KERAS, FastPathChoice
from pipeline.errors import ExportConfigError
from pipeline.inference import embedder as embedder_lib
from pipeline.inference import forward_pass as forward_pass_lib
from pipeline.inference.features import DocumentTokenizer
from pipeline.planning.build import build_plan
from pipeline.planning.options import ExportOptions
from pipeline.reading.documents import Document


@pytest.fixture
def launched(tiny_bundle, tmp_path):
    """A plan of the tiny bundle's default columns as the launch leaves it, and its model source."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "content": "word1 word2", "title": "word3"}])
    plan, model_source = build_plan(
        ExportOptions(["--model", tiny_bundle[0], "--input", str(corpus), "--output", str(tmp_path / "o")])
    )
    return embedder_lib.choose_forward_passes(plan, model_source), model_source


def _no_check(*args):
    raise AssertionError("the fast path was checked against Keras again")


def _rows(embedder, model_source):
    tokenizer = DocumentTokenizer(embedder.plan, model_source.tokenizer)
    documents = [
        Document(f"d{i}", (f"word{i} word{i + 1} word7", f"word{i}"), (), "c", i) for i in range(1, 9)
    ]
    return embedder.batch_rows(embedder.run([tokenizer.tokenize(d) for d in documents])).rows


def test_the_plan_carries_the_launch_check_and_a_worker_here_follows_it(launched, monkeypatch):
    plan, model_source = launched
    assert plan.fast_path_checked_on == forward_pass_lib.fast_path_environment()
    assert {engine for _, engine, _ in plan.forward_passes} == {FAST}
    monkeypatch.setattr(forward_pass_lib, "max_difference", _no_check)
    worker = embedder_lib.Embedder(plan)  # loads the model as a worker process does
    assert worker.uses_fast_path and worker.forward_pass_records() == plan.forward_passes
    launcher = embedder_lib.worker_embedder(plan)
    assert _rows(worker, model_source).equals(_rows(launcher, model_source))


def test_a_worker_elsewhere_checks_the_fast_path_again(launched, monkeypatch):
    plan, _ = launched
    checks = []

    def counted(*args):
        checks.append(args)
        return 0.0

    monkeypatch.setattr(forward_pass_lib, "max_difference", counted)
    elsewhere = dataclasses.replace(plan, fast_path_checked_on="dataflow-worker-7 x86_64 tensorflow 2.21.0")
    worker = embedder_lib.Embedder(elsewhere)
    assert worker.uses_fast_path and len(checks) == 1


def test_a_worker_follows_a_launch_that_chose_keras(launched, monkeypatch):
    plan, _ = launched
    monkeypatch.setattr(forward_pass_lib, "max_difference", _no_check)
    reason = "the fast path differs from Keras by 0.1 (> 1e-05) on a sample batch"
    keras_plan = dataclasses.replace(
        plan, forward_passes=tuple((column, KERAS, reason) for column, _, _ in plan.forward_passes)
    )
    worker = embedder_lib.Embedder(keras_plan)
    assert not worker.uses_fast_path
    assert worker.forward_pass_records() == keras_plan.forward_passes


def test_a_worker_that_cannot_build_the_launchs_fast_path_refuses(launched, monkeypatch):
    plan, _ = launched
    declined = FastPathChoice(None, "no Embedding here")
    monkeypatch.setattr("pipeline.inference.forward_pass.build_fast_path", lambda sub_model: declined)
    with pytest.raises(ExportConfigError, match=r"cannot build it \(no Embedding here\); rerun the export"):
        embedder_lib.Embedder(plan)


def test_a_worker_in_the_launchers_process_uses_the_launchers_embedder(launched):
    plan, _ = launched
    assert embedder_lib.worker_embedder(plan) is embedder_lib.worker_embedder(plan)
    assert embedder_lib.worker_embedder(plan).plan == plan
    # Another plan (here: another batch size) gets its own.
    other = dataclasses.replace(plan, batch_size=plan.batch_size + 1)
    assert embedder_lib.worker_embedder(other) is not embedder_lib.worker_embedder(plan)


def test_an_in_memory_export_builds_one_embedder_and_checks_the_fast_path_once(
    tiny_bundle, tmp_path, monkeypatch
):
    """The whole export, not only `worker_embedder`: its workers get the plan without the input listing."""
    from pipeline.running.export import run_export

    built = []
    real_init = embedder_lib.Embedder.__init__

    def counted_init(self, *args, **kwargs):
        built.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(embedder_lib.Embedder, "__init__", counted_init)
    checks = _count_checks(monkeypatch)
    corpus = write_jsonl(
        tmp_path / "c.jsonl",
        [{"id": f"d{i}", "content": f"word{i} word2", "title": "word3"} for i in range(20)],
    )
    argv = ["--model", tiny_bundle[0], "--input", corpus, "--output", str(tmp_path / "o")]
    summary = run_export(argv)
    assert summary.exit_code == 0 and summary.rows_written == 20
    assert len(built) == 1 and len(checks) == 1


def _count_checks(monkeypatch):
    """The fast path's checks against Keras made in this process from now on, none launched before."""
    monkeypatch.setattr(embedder_lib, "_LAUNCHED", [])
    checks = []
    real = forward_pass_lib.max_difference

    def counted(*args):
        checks.append(args)
        return real(*args)

    monkeypatch.setattr(forward_pass_lib, "max_difference", counted)
    return checks


def _export(bundle, tmp_path, name, documents):
    """Exports `documents` (ids) with `bundle` into `tmp_path/name`: its rows by id and its manifest."""
    from pipeline_fixtures import read_rows

    from pipeline.running.export import run_export
    from pipeline.writing.state import read_manifest

    words = {"a": "word1 word4 word7", "b": "word2 word9", "c": "word30", "d": "word5 word5 word6"}
    records = [{"id": d, "content": words[d], "title": "word3"} for d in documents]
    corpus = write_jsonl(tmp_path / f"{name}.jsonl", records)
    output = str(tmp_path / name)
    assert run_export(["--model", bundle, "--input", corpus, "--output", output]).exit_code == 0
    return {row["id"]: row for row in read_rows(output).to_pylist()}, read_manifest(output)


def test_a_second_launch_of_the_same_model_takes_the_first_ones_checked_forward_passes(
    tiny_bundle, tmp_path, monkeypatch
):
    checks = _count_checks(monkeypatch)
    first, first_manifest = _export(tiny_bundle[0], tmp_path, "first", ["a", "b", "c"])
    # Another corpus and output, the same model: no second load, trace or check.
    second, second_manifest = _export(tiny_bundle[0], tmp_path, "second", ["c", "a", "d"])
    assert len(checks) == 1
    assert second_manifest["columns"] == first_manifest["columns"]
    for document in ("a", "c"):
        assert second[document] == first[document]


def test_a_model_file_replaced_at_the_same_path_is_loaded_and_checked_again(
    tiny_bundle, tmp_path, monkeypatch
):
    import shutil

    from models.bundle import load_bundle, save_bundle

    bundle = str(tmp_path / "bundle")
    shutil.copytree(tiny_bundle[0], bundle)
    checks = _count_checks(monkeypatch)
    before, _ = _export(bundle, tmp_path, "before", ["a", "b"])
    # The same path, other weights: another SHA-256. (Changed, not trained anew: a fit costs seconds.)
    loaded = load_bundle(bundle)
    other = loaded.model
    other.set_weights([weights * 1.5 + 0.01 for weights in other.get_weights()])
    save_bundle(bundle, other, loaded.tokenizer, loaded.input_fields)
    after, _ = _export(bundle, tmp_path, "after", ["a", "b"])
    assert len(checks) == 2
    assert after["a"]["lstm_content"] != before["a"]["lstm_content"]


def test_an_export_does_not_import_matplotlib_but_analyze_still_can(tmp_path):
    """Keras loads matplotlib.pyplot with itself when it is installed; an export has no use for it."""
    code = (
        "import sys\n"
        "import pipeline.run, pipeline.running.export, pipeline.running.graph\n"
        "import pipeline.inference.embedder, keras\n"
        "assert not [m for m in sys.modules if m.startswith('matplotlib')], 'matplotlib imported'\n"
        "import matplotlib.pyplot\n"
        "from pipeline import analyze\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPOSITORY),
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
