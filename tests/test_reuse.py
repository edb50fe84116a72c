"""--reuse: rows of unchanged documents come from an earlier export, bit for bit a full re-export.

The corpus is the bundled sample corpus; the next version changes 1 % of the
documents, adds 1 % and deletes 1 %.  The reference for every comparison is
a full export of the new corpus (which the other suites check against Keras).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import forkserver
import numpy as np
import pyarrow.dataset as ds
import pytest
from pipeline_fixtures import REPOSITORY, TUTORIAL_KERAS2_SCRIPT, pipeline_command, wait_for_staged_shard

from models.paths import SAMPLE_CORPUS
from pipeline.errors import ExportConfigError
from pipeline.inference import embedder as embedder_lib
from pipeline.inference import forward_pass as forward_pass_lib
from pipeline.planning.reuse import ROWS_VERSION
from pipeline.running.export import run_export
from pipeline.running.report import format_summary
from pipeline.writing import files as files_lib
from pipeline.writing import layout as layout_lib
from pipeline.writing import state as state_lib
from pipeline.writing.schema import FINGERPRINT_COLUMN, input_fingerprint

SHARE = 0.01


def _read(directory):
    table = ds.dataset(str(directory), format="parquet", ignore_prefixes=layout_lib.READER_IGNORE_PREFIXES)
    return table.to_table().sort_by("id")


def next_version(records, seed=0, id_field="id", text_field="content"):
    """(records, changed ids, new ids, deleted ids): 1 % changed, 1 % added, 1 % deleted."""
    rng = random.Random(seed)
    count = max(1, int(len(records) * SHARE))
    picked = rng.sample(range(len(records)), 2 * count)
    changed = {records[i][id_field] for i in picked[:count]}
    deleted = {records[i][id_field] for i in picked[count:]}
    result = []
    for index, record in enumerate(records):
        if record[id_field] in deleted:
            continue
        record = dict(record)
        if record[id_field] in changed:
            record[text_field] += " and one more sentence about sockets"
        elif index % 7 == 0 and "kind" in record:
            record["kind"] = record["kind"].upper()  # kept fields must come from the new corpus
        result.append(record)
    new = [f"new-{index}" for index in range(count)]
    for document_id in new:
        result.append(
            {
                id_field: document_id,
                "title": "a new title",
                text_field: f"a brand new document number {document_id}",
                "kind": "function",
                "topic": "network",
            }
        )
    return result, changed, set(new), deleted


def _write(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Both corpus versions, the first export, and a full export of the second."""
    directory = tmp_path_factory.mktemp("reuse")
    with open(SAMPLE_CORPUS, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    second, changed, new, deleted = next_version(records)
    first_path = _write(directory / "v1.jsonl", records)
    second_path = _write(directory / "v2.jsonl", second)
    flags = ["--keep_fields", "kind"]
    v1 = str(directory / "v1")
    run_export(["--input", first_path, "--output", v1, *flags])
    full = str(directory / "full")
    run_export(["--input", second_path, "--output", full, *flags])
    return {
        "directory": directory,
        "records": records,
        "second": second,
        "first_path": first_path,
        "second_path": second_path,
        "changed": changed,
        "new": new,
        "deleted": deleted,
        "v1": v1,
        "full": full,
        "flags": flags,
    }


def test_reuse_equals_a_full_export_bit_for_bit_and_counts_what_it_did(versions, tmp_path):
    output = str(tmp_path / "v2")
    summary = run_export(
        [
            "--input",
            versions["second_path"],
            "--output",
            output,
            "--reuse",
            versions["v1"],
            *versions["flags"],
        ]
    )
    assert summary.exit_code == 0, summary.message
    reused = _read(output)
    full = _read(versions["full"])
    assert reused.schema == full.schema
    assert reused.equals(full)  # every column, every bit, every document

    unchanged = len(versions["records"]) - len(versions["changed"]) - len(versions["deleted"])
    counts = state_lib.read_manifest(output)["counts"]
    assert counts["rows_reused"] == summary.rows_reused == unchanged
    assert counts["rows_embedded"] == len(versions["changed"]) + len(versions["new"])
    assert counts["earlier_rows_changed"] == len(versions["changed"])
    assert counts["earlier_rows_dropped"] == summary.earlier_rows_dropped == len(versions["deleted"])
    assert counts["records_read"] == counts["rows_written"] + counts["dead_letters"]
    # The tokenizer's counts are of the embedded documents only: the summary says so (a reuse of an
    # export with 118 truncated documents, all reused, said "truncated 0 documents longer than ...").
    (truncated,) = [line for line in format_summary(summary).splitlines() if "truncated  " in line]
    assert f"{counts['documents_truncated']} of the documents this run embedded were longer" in truncated
    assert truncated.endswith("(reused rows are not counted)")
    ids = set(reused.column("id").to_pylist())
    assert not ids & versions["deleted"] and versions["new"] <= ids
    # Kept fields are the new corpus's, not the old rows'.
    kinds = dict(zip(reused.column("id").to_pylist(), reused.column("kind").to_pylist(), strict=True))
    assert kinds == {r["id"]: r["kind"] for r in versions["second"]}
    assert any(kind.isupper() for kind in kinds.values())


def test_fingerprint_is_what_the_model_sees(versions):
    table = _read(versions["v1"])
    by_id = {r["id"]: r for r in versions["records"]}
    from pipeline.planning.plan import InputInfo

    inputs = (InputInfo("content", "content", 300), InputInfo("title", "title", 20))
    for row_id, fingerprint in zip(
        table.column("id").to_pylist()[:50], table.column(FINGERPRINT_COLUMN).to_pylist()[:50], strict=True
    ):
        record = by_id[row_id]
        assert fingerprint == input_fingerprint((record["content"], record["title"]), inputs)
    assert input_fingerprint(("a", "b"), inputs) != input_fingerprint(("a ", "b"), inputs)
    # Lone surrogates hash too, each to its own fingerprint.
    assert input_fingerprint(("\ud800", "b"), inputs) != input_fingerprint(("\udbff", "b"), inputs)


def _refused(argv, pattern, output):
    with pytest.raises(ExportConfigError, match=pattern):
        run_export(argv)
    assert not os.path.exists(output)


def test_refusals(versions, tmp_path, tiny_bundle):
    second = versions["second_path"]
    output = str(tmp_path / "out")
    base = ["--input", second, "--output", output, *versions["flags"]]
    _refused([*base, "--reuse", str(tmp_path / "missing")], "is missing: it has no _MANIFEST.json", output)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(versions["v1"], unfinished)
    os.remove(unfinished / layout_lib.MANIFEST)
    _refused([*base, "--reuse", str(unfinished)], "is unfinished or not an export", output)

    # Other columns: named, not their recorded dicts (a line of 900 characters), with the way on.
    with pytest.raises(ExportConfigError) as refusal:
        run_export([*base, "--reuse", versions["v1"], "--layer", "lstm_content"])
    message = str(refusal.value)
    assert "holds the columns lstm_content, lstm_title" in message and "asks for lstm_content." in message
    assert "rerun without --layer (its columns are the bundle's default layers)" in message, message
    assert "{" not in message and len(message) < 600, message
    with pytest.raises(ExportConfigError) as refusal:
        run_export([*base, "--reuse", versions["v1"], "--layer", "lstm_content", "--layer", "out_title"])
    assert "Leave --reuse out for a full export of these columns" in str(refusal.value)
    assert not os.path.exists(output)
    _refused([*base, "--reuse", versions["v1"], "--dtype", "float16"], r"other settings \(dtype", output)
    _refused([*base, "--reuse", versions["v1"], "--padding", "post"], r"other settings \(padding", output)
    _refused(
        ["--model", tiny_bundle[0], *base, "--reuse", versions["v1"]],
        r"other settings \(model_sha256: earlier '[0-9a-f]{64}', now '[0-9a-f]{64}'",
        output,
    )

    old_version = tmp_path / "old_version"
    shutil.copytree(versions["v1"], old_version)
    with open(old_version / layout_lib.MANIFEST, encoding="utf-8") as handle:
        manifest = json.load(handle)
    del manifest["reuse_signature"]
    with open(old_version / layout_lib.MANIFEST, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle)
    _refused([*base, "--reuse", str(old_version)], "did not record input fingerprints", output)
    # Another tool's manifest: it was blamed on an old version of this one.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / layout_lib.MANIFEST).write_text('{"generator": "someone-elses-job", "files": 2}')
    _refused(
        [*base, "--reuse", str(foreign)],
        "is not an export: its _MANIFEST.json was written by another tool",
        output,
    )

    # Rows computed by code before a fix that changed some rows' values (Keras 2's hard_sigmoid):
    # the same model and settings, other vectors.
    for rows_version, which in ((None, "an earlier"), (ROWS_VERSION + 1, "a later")):
        other_code = tmp_path / f"rows_version_{rows_version}"
        shutil.copytree(versions["v1"], other_code)
        with open(other_code / layout_lib.MANIFEST, encoding="utf-8") as handle:
            manifest = json.load(handle)
        if rows_version is None:
            del manifest["reuse_signature"]["rows_version"]
        else:
            manifest["reuse_signature"]["rows_version"] = rows_version
        with open(other_code / layout_lib.MANIFEST, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle)
        _refused([*base, "--reuse", str(other_code)], f"written by {which} version of this tool", output)


def test_reuse_in_place_with_overwrite(versions, tmp_path):
    directory = str(tmp_path / "live")
    shutil.copytree(versions["v1"], directory)
    summary = run_export(
        [
            "--input",
            versions["second_path"],
            "--output",
            directory,
            "--reuse",
            directory,
            "--overwrite",
            *versions["flags"],
        ]
    )
    assert summary.exit_code == 0
    assert _read(directory).equals(_read(versions["full"]))


@pytest.mark.parametrize("fast_path", ["auto", "off"], ids=["check_fails_here", "off"])
def test_rows_of_another_forward_pass_than_this_launchs_are_not_reused(
    versions, tmp_path, monkeypatch, fast_path
):
    """The earlier export's rows are the fast path's; this launch computes with Keras's forward pass.

    Under the same `--fast_path auto`, a machine whose fast-path check fails (here: a tolerance of 0)
    computes with Keras: the flags were equal, so the run reused the fast path's rows beside its
    Keras rows in one column (not bit for bit a full export; its manifest said Keras for all).
    """
    # A launcher process of its own: no forward passes chosen by an earlier launch in this one.
    monkeypatch.setattr(embedder_lib, "_LAUNCHED", [])
    if fast_path == "auto":
        monkeypatch.setattr(forward_pass_lib, "FAST_PATH_TOLERANCE", 0.0)
    output = str(tmp_path / "v2")
    argv = ["--input", versions["second_path"], "--output", output, "--reuse", versions["v1"]]
    with pytest.raises(ExportConfigError) as refusal:
        run_export([*argv, *versions["flags"], "--fast_path", fast_path])
    message = str(refusal.value)
    assert "its column lstm_content was computed by the fast path, this run computes it by Keras's" in message
    assert "not bit for bit" in message and "\n" not in message
    if fast_path == "off":
        assert "Rerun without --fast_path off" in message
    else:
        assert "(this launch: the fast path differs from Keras by" in message
        assert "Leave --reuse out for a full export" in message
    assert not os.path.exists(output)


def test_rows_of_the_other_onednn_setting_are_not_reused(versions, tmp_path, monkeypatch):
    """TF_ENABLE_ONEDNN_OPTS=0 (TensorFlow's start notice suggests it) changes the fast path's last bits.

    A run with it off reused the rows of an export made with it on beside rows computed without,
    in one column: not the full export bit for bit. Simulated: this launch's TensorFlow says off.
    """
    monkeypatch.setattr(embedder_lib, "onednn_enabled", lambda: False)
    output = str(tmp_path / "v2")
    argv = ["--input", versions["second_path"], "--output", output, "--reuse", versions["v1"]]
    with pytest.raises(ExportConfigError) as refusal:
        run_export([*argv, *versions["flags"]])
    message = str(refusal.value)
    assert "oneDNN kernels on (TF_ENABLE_ONEDNN_OPTS unset or 1), this run computes with them off" in message
    assert "Rerun with TF_ENABLE_ONEDNN_OPTS=1" in message and "\n" not in message
    assert not os.path.exists(output)


def test_an_export_of_token_ids_only_is_reused_whatever_the_onednn_setting(
    tiny_bundle, tmp_path, monkeypatch
):
    """Columns stored as token ids run no forward pass: such an export recorded the oneDNN setting all the
    same, and a --reuse of it under the other one was refused ("which changes the last bits of some rows"),
    costing a full export for ids that have no last bits."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "content": f"word{i} word3", "title": "word1"}) + "\n"
            for i in range(9)
        )
    )
    flags = ["--model", tiny_bundle[0], "--input", str(corpus), "--layer", "emb:0", "--pooling", "none"]
    flags += ["--token_storage", "ids"]
    assert run_export([*flags, "--output", str(tmp_path / "v1")]).exit_code == 0
    earlier = state_lib.read_manifest(str(tmp_path / "v1"))["reuse_signature"]["onednn"]
    monkeypatch.setattr(embedder_lib, "onednn_enabled", lambda: not forward_pass_lib.onednn_enabled())
    summary = run_export([*flags, "--output", str(tmp_path / "v2"), "--reuse", str(tmp_path / "v1")])
    assert summary.exit_code == 0 and summary.rows_reused == 9, summary.message
    assert (
        earlier is None and state_lib.read_manifest(str(tmp_path / "v2"))["reuse_signature"]["onednn"] is None
    )


@pytest.mark.slow
def test_killed_reuse_run_and_rerun_give_the_full_export(versions, tmp_path):
    # Five copies of the corpus with new ids: long enough to be killed part-way.
    records = [dict(r, id=f"{copy}-{r['id']}") for copy in range(5) for r in versions["records"]]
    second, changed, new, deleted = next_version(records, seed=1)
    first_path = _write(tmp_path / "big1.jsonl", records)
    second_path = _write(tmp_path / "big2.jsonl", second)
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    v1 = str(tmp_path / "v1")
    assert run_export(pipeline_command(first_path, v1)[3:]).exit_code == 0

    output = str(tmp_path / "v2")
    # Small shards: the run is killed once it writes its first, long before its last.
    command = pipeline_command(second_path, output, "--reuse", v1, "--batch_size", "64", "--shard_mb", "0.05")
    process = forkserver.popen(
        command, cwd=REPOSITORY, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    shards = wait_for_staged_shard(process, output)
    assert process.poll() is None, "the run finished before it could be killed"
    assert shards, "the run wrote no shard in its staging directory"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state_lib.read_manifest(output) is None

    rerun = forkserver.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    full = str(tmp_path / "full")
    assert run_export(pipeline_command(second_path, full)[3:]).exit_code == 0
    assert _read(output).equals(_read(full))
    counts = state_lib.read_manifest(output)["counts"]
    assert counts["rows_reused"] == len(records) - len(changed) - len(deleted)
    assert counts["rows_embedded"] == len(changed) + len(new)


@pytest.mark.slow
def test_reuse_on_the_tutorial_keras2_model(tmp_path):
    with open(SAMPLE_CORPUS, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle][:300]
    second, changed, new, deleted = next_version(records, seed=3)
    first_path = _write(tmp_path / "v1.jsonl", records)
    second_path = _write(tmp_path / "v2.jsonl", second)
    built = forkserver.run(
        [sys.executable, "-c", TUTORIAL_KERAS2_SCRIPT, str(tmp_path), first_path, second_path],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    with open(tmp_path / "info.json", encoding="utf-8") as handle:
        info = json.load(handle)
    model = [
        "--model",
        str(tmp_path / "tutorial.h5"),
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
        "--layer",
        "lstm",
        "--input_map",
        f"{info['input']}=content",
    ]
    run_export([*model, "--input", first_path, "--output", str(tmp_path / "v1")])
    summary = run_export(
        [*model, "--input", second_path, "--output", str(tmp_path / "v2"), "--reuse", str(tmp_path / "v1")]
    )
    assert summary.rows_reused == len(records) - len(changed) - len(deleted)
    run_export([*model, "--input", second_path, "--output", str(tmp_path / "full")])
    reused = _read(tmp_path / "v2")
    assert reused.equals(_read(tmp_path / "full"))
    # And both are what Keras 2 itself gives for the new corpus.
    order = {document_id: index for index, document_id in enumerate(info["ids"])}
    reference = np.load(tmp_path / "reference.npy")
    vectors = np.array(reused.column("lstm").to_pylist(), dtype=np.float32)
    expected = reference[[order[i] for i in reused.column("id").to_pylist()]]
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def _damaged_copy(versions, tmp_path, damage):
    """A copy of the first export, edited by `damage(directory, manifest, first row shard's entry)`."""
    directory = tmp_path / "damaged"
    shutil.copytree(versions["v1"], directory)
    with open(directory / layout_lib.MANIFEST, encoding="utf-8") as handle:
        manifest = json.load(handle)
    entry = manifest["shards"]["rows"][0]
    damage(directory, manifest, entry)
    with open(directory / layout_lib.MANIFEST, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle)
    return str(directory), entry["file"]


def _rehash(directory, entry):
    """Records the damaged shard's own size and SHA-256, as a forger of the manifest would."""
    entry.update(files_lib.file_digest(str(directory / entry["file"])))


def _swap_model(directory, manifest, entry):
    """Rewrites the shard as an export of another model would be (its metadata names that model)."""
    import pyarrow.parquet as pq

    path = directory / entry["file"]
    table = pq.read_table(path)
    metadata = json.loads(table.schema.metadata[b"embexport"])
    metadata["model_sha256"] = "0" * 64
    pq.write_table(table.replace_schema_metadata({b"embexport": json.dumps(metadata).encode()}), path)


def _truncate(directory, manifest, entry):
    path = directory / entry["file"]
    os.truncate(path, os.path.getsize(path) // 2)


def _outside(directory, manifest, entry):
    other = directory.parent / "OTHER"
    other.mkdir()
    shutil.copy(directory / entry["file"], other / entry["file"])
    entry["file"] = f"../OTHER/{entry['file']}"


def _link_out(directory, manifest, entry):
    other = directory.parent / "elsewhere.parquet"
    shutil.move(directory / entry["file"], other)
    os.symlink(other, directory / entry["file"])


@pytest.mark.parametrize(
    "damage,expected",
    [
        pytest.param(
            _swap_model, "(has SHA-256 [0-9a-f]{64}|is \\d+ bytes), but the manifest records", id="swapped"
        ),
        pytest.param(
            lambda d, m, e: (_swap_model(d, m, e), _rehash(d, e)),
            "was written with model_sha256 '0{64}'",
            id="swapped_and_rehashed",
        ),
        pytest.param(_truncate, "(has SHA-256|is \\d+ bytes, but the manifest records)", id="truncated"),
        pytest.param(
            lambda d, m, e: (_truncate(d, m, e), _rehash(d, e)),
            "is not a readable export shard",
            id="truncated_and_rehashed",
        ),
        pytest.param(lambda d, m, e: e.__setitem__("rows", e["rows"] + 1), "holds \\d+ rows", id="rows"),
        pytest.param(_outside, "is not a shard name of the export directory", id="dotdot"),
        pytest.param(
            lambda d, m, e: e.__setitem__("file", "/etc/passwd"), "is not a shard name", id="absolute"
        ),
        pytest.param(_link_out, "is a link to .*outside the export directory", id="link"),
        pytest.param(lambda d, m, e: e.pop("sha256"), "has no SHA-256 or checksum", id="no_digest"),
    ],
)
def test_reuse_checks_each_shard_against_its_manifest_before_reading_it(versions, tmp_path, damage, expected):
    damaged, name = _damaged_copy(versions, tmp_path, damage)
    output = str(tmp_path / "out")
    argv = ["--input", versions["second_path"], "--output", output, "--reuse", damaged, *versions["flags"]]
    _refused(argv, f"--reuse .* is damaged: row shard '.*{name}' {expected}", output)


@pytest.mark.parametrize(
    "edit,expected",
    [
        pytest.param(
            lambda m: m.__setitem__("shards", [e["file"] for e in m["shards"]["rows"]]),
            "the manifest has no list of row shards",
            id="shards_a_list",
        ),
        pytest.param(
            lambda m: m.__setitem__("reuse_signature", "see docs"),
            "the reuse_signature of its _MANIFEST.json is not a JSON object",
            id="signature_a_string",
        ),
    ],
)
def test_a_manifest_of_another_shape_is_refused_as_damaged(versions, tmp_path, edit, expected):
    """Hand-edited, or another tool's with status and shards keys: an AttributeError traceback."""
    damaged, _ = _damaged_copy(versions, tmp_path, lambda directory, manifest, entry: edit(manifest))
    output = str(tmp_path / "out")
    argv = ["--input", versions["second_path"], "--output", output, "--reuse", damaged, *versions["flags"]]
    _refused(argv, f"--reuse .* is damaged: .*{expected}", output)


def test_a_reuse_that_names_a_file_says_to_pass_its_directory(versions, tmp_path):
    """`--reuse OUT/_MANIFEST.json` was said to be "missing"."""
    output = str(tmp_path / "out")
    manifest = os.path.join(versions["v1"], layout_lib.MANIFEST)
    argv = ["--input", versions["second_path"], "--output", output, "--reuse", manifest, *versions["flags"]]
    _refused(argv, f"is a file; --reuse takes a finished export's directory .*{versions['v1']}", output)


def test_a_damaged_reuse_export_is_one_error_line_naming_the_file(versions, tmp_path, capsys):
    from pipeline.run import main

    damaged, name = _damaged_copy(versions, tmp_path, _swap_model)
    output = str(tmp_path / "out")
    code = main(
        ["--input", versions["second_path"], "--output", output, "--reuse", damaged, *versions["flags"]]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and name in lines[0] and "is damaged" in lines[0]
    assert not os.path.exists(output)


@pytest.mark.parametrize("replacement", ["same_names", "renamed_shards"])
def test_a_reuse_export_replaced_after_the_launch_fails_the_run(
    replacement, versions, tmp_path, capsys, monkeypatch
):
    """Its rows are read by shard name after the launch: a replaced export must not join unchecked.

    An --overwrite with another shard count renames every shard (`-of-00001` to `-of-00002`).
    """
    from pipeline.run import main
    from pipeline.running import export as export_lib

    earlier = tmp_path / "earlier"
    shutil.copytree(versions["v1"], earlier)
    build_plan = export_lib.build_plan

    def replaced_after_the_check(*args, **kwargs):
        planned = build_plan(*args, **kwargs)
        # An --overwrite of the earlier export lands: other rows under the same shard names.
        shutil.rmtree(earlier)
        shutil.copytree(versions["full"], earlier)
        if replacement == "renamed_shards":
            for name in os.listdir(earlier):
                if name.startswith("part-"):
                    os.rename(earlier / name, earlier / name.replace("-of-00001", "-of-00002"))
        return planned

    monkeypatch.setattr(export_lib, "build_plan", replaced_after_the_check)
    output = tmp_path / "out"
    argv = ["--input", versions["second_path"], "--output", str(output), "--reuse", str(earlier)]
    code = main([*argv, *versions["flags"]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert "part-00000-of-00001.parquet" in lines[0]
    assert ("changed after launch" if replacement == "same_names" else "cannot be read any more") in lines[0]
    assert state_lib.read_manifest(str(output)) is None


def test_a_reuse_export_whose_interrupted_commit_cannot_be_finished_names_reuse(versions, tmp_path):
    """Its lock cannot be written (a read-only mount; here a folder where `_LOCK` goes): it said
    "--output '.../earlier' cannot be written ... Choose a writable --output", of the --reuse."""
    earlier = tmp_path / "earlier"
    shutil.copytree(versions["v1"], earlier)
    (earlier / layout_lib.JOURNAL).write_text("{}", encoding="utf-8")  # A commit a crash cut short.
    (earlier / layout_lib.LOCK).mkdir()
    argv = ["--input", versions["second_path"], "--output", str(tmp_path / "out"), "--reuse", str(earlier)]
    with pytest.raises(ExportConfigError) as caught:
        run_export([*argv, *versions["flags"]])
    message = str(caught.value)
    assert message.startswith(f"--reuse {str(earlier)!r} holds an export whose commit was cut short"), message
    assert "Make it writable" in message and "--output" not in message, message


def test_a_reuse_export_being_committed_by_another_run_names_reuse(versions, tmp_path):
    """It said "--output '.../A' is in use ... choose another --output": A was the --reuse, not the output."""
    from pipeline.writing.lock import OutputLock

    earlier = tmp_path / "earlier"
    shutil.copytree(versions["v1"], earlier)
    (earlier / layout_lib.JOURNAL).write_text("{}", encoding="utf-8")  # Another run's commit in flight.
    output = str(tmp_path / "out")
    with OutputLock(str(earlier)), pytest.raises(ExportConfigError) as caught:
        run_export(
            [
                "--input",
                versions["second_path"],
                "--output",
                output,
                "--reuse",
                str(earlier),
                *versions["flags"],
            ]
        )
    message = str(caught.value)
    assert message.startswith(f"--reuse {str(earlier)!r} is being committed by another run"), message
    assert "--output" not in message


def test_on_keras_forward_pass_a_row_does_not_depend_on_how_many_documents_share_its_batch(
    tiny_bundle, tmp_path
):
    """TensorFlow's kernels took other sums for the last row of a batch of odd size (~2e-9 off the same
    document's row in an even batch), so on Keras's forward pass (--fast_path off, and every model the fast
    path does not cover) a --reuse or resumed export was not bit for bit a full export: which documents
    share a batch depends on what else the run embeds. Each row is now what it is in any other batch."""
    import keras

    from pipeline.inference.embedder import Embedder
    from pipeline.planning.build import build_plan
    from pipeline.planning.options import ExportOptions

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "content": "word1", "title": "word2"}\n')
    flags = ["--model", tiny_bundle[0], "--input", str(corpus), "--output", str(tmp_path / "o")]
    plan, model_source = build_plan(ExportOptions([*flags, "--fast_path", "off", "--layer", "lstm_content"]))
    embedder = Embedder(plan, model_source)
    rng = np.random.default_rng(0)
    model = tiny_bundle[1]
    features = {t.name: rng.integers(1, 50, (65, t.shape[1])).astype(np.int32) for t in model.inputs}
    whole = embedder.keras_predict(features)["lstm_content"]
    for size in (*range(1, 34, 2), 64):  # odd batches, whose last row was the odd one out
        part = embedder.keras_predict({name: values[:size] for name, values in features.items()})
        assert np.array_equal(part["lstm_content"], whole[:size]), size
    expected = keras.Model(model.inputs, model.get_layer("lstm_content").output).predict(features, verbose=0)
    np.testing.assert_allclose(whole, expected, atol=1e-5)
