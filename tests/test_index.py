"""Tests of `python -m pipeline.analyze OUT index` and the commands that use the index, on real exports.

The reference is numpy brute force over the vectors read back with pandas, and
the existing exact scan (`find_neighbors`, `score_label_agreement`).
"""

import glob
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.bundle import DEFAULT_BUNDLE as DEFAULT_BUNDLE_PATH
from pipeline import analyze
from pipeline.analysis import index_build
from pipeline.analysis.dataset import AnalysisError, open_documents, open_vocabulary
from pipeline.analysis.knn import knn_score_indexed, score_label_agreement
from pipeline.analysis.neighbors import find_neighbors, indexed_neighbors, open_index
from pipeline.errors import ExportConfigError
from pipeline.running.export import run_export
from pipeline.writing import commit as commit_lib
from pipeline.writing import layout as layout_lib
from pipeline.writing import lock as lock_lib
from pipeline.writing import state as state_lib

# The repository root: a child process run there imports this checkout's packages.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMN = "lstm_content"
ROWS = 300
# Similarities closer than this count as ties (float32 in the index, float64 in the scan).
TIE = 1e-5
# Parameters that make HNSW exact: with room for as many links per node as there are rows,
# usearch prunes no link (its neighbour heuristic only runs on a full list) and an insert
# that considers every row links each new row to all rows before it, so the graph is
# complete; a search that keeps as many candidates as there are rows then visits them all.
EXACT_SETTINGS = {"connectivity": ROWS, "expansion_add": 512, "expansion_search": 512}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A real export of 300 documents of the sample corpus: two vector columns and two kept fields."""
    directory = str(tmp_path_factory.mktemp("index") / "export")
    flags = ["--output", directory, "--layer", COLUMN, "--layer", "lstm_title", "--keep_fields", "kind,topic"]
    summary = run_export([*flags, "--limit", str(ROWS)])
    assert summary.exit_code == 0, summary.message
    return directory


@pytest.fixture()
def export_copy(export_dir, tmp_path):
    """A private copy of the export, for tests that write an index or replace the export."""
    target = str(tmp_path / "export")
    shutil.copytree(export_dir, target)
    return target


@pytest.fixture(scope="module")
def rows(export_dir):
    """The rows in the export's position order (part files by name, rows in order), read with pandas."""
    files = sorted(glob.glob(os.path.join(export_dir, "part-*.parquet")))
    return pd.concat([pd.read_parquet(path) for path in files], ignore_index=True)


def build(directory, column=COLUMN, **settings):
    data = open_documents(directory)
    return index_build.build_index(data, column, index_build.IndexSettings(**settings))


def brute_force(vectors, query, metric):
    """Scores of every row against `query`, higher nearer, in float64."""
    vectors, query = vectors.astype(np.float64), query.astype(np.float64)
    if metric == "cos":
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ (query / np.linalg.norm(query))
    if metric == "ip":
        return vectors @ query
    return -((vectors - query) ** 2).sum(axis=1)


def assert_same_ranking(found_positions, found_scores, expected_scores, k, self_position):
    """The found rows are an exact top k (ties at the boundary allowed), with their true scores."""
    expected = expected_scores.copy()
    expected[self_position] = -np.inf
    kth = np.sort(expected)[::-1][k - 1]
    tolerance = 1e-4 * max(1.0, abs(kth))
    assert len(found_positions) == k
    assert self_position not in found_positions
    for position, score in zip(found_positions, found_scores, strict=True):
        assert expected[position] >= kth - tolerance, (position, expected[position], kth)
        assert score == pytest.approx(expected[position], rel=1e-4, abs=1e-4)


# --- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cos", "ip", "l2"])
def test_index_answers_are_the_exact_neighbours(export_copy, rows, metric):
    build(export_copy, metric=metric, **EXACT_SETTINGS)
    data = open_documents(export_copy)
    loaded = open_index(data, COLUMN)
    vectors = np.stack(rows[COLUMN].to_numpy())
    positions, scores = loaded.search(vectors, 10, exclude=[{i} for i in range(len(vectors))])
    for i in range(len(vectors)):
        expected = brute_force(vectors, vectors[i], metric)
        assert_same_ranking(positions[i], scores[i], expected, 10, i)


def test_neighbors_command_through_the_index_equals_the_exact_scan(export_copy, rows, capsys):
    build(export_copy, **EXACT_SETTINGS)
    data = open_documents(export_copy)
    loaded = open_index(data, COLUMN)
    for key in rows["id"][::15]:
        indexed, _ = indexed_neighbors(data, loaded, key, k=10)
        exact, _ = find_neighbors(data, key, COLUMN, k=11)
        # The index computes in float32, the scan in float64: near-equal similarities may swap.
        np.testing.assert_allclose(
            [n.similarity for n in indexed], [n.similarity for n in exact[:10]], rtol=0, atol=TIE
        )
        if exact[9].similarity - exact[10].similarity > TIE:
            assert {n.key for n in indexed} == {n.key for n in exact[:10]}
        truth = {n.key: n for n in exact}
        for found in indexed:
            if found.key in truth:
                assert found.details == truth[found.key].details
                assert found.similarity == pytest.approx(truth[found.key].similarity, abs=TIE)
    key = rows["id"][0]
    assert analyze.main([export_copy, "neighbors", "--id", key, "--column", COLUMN]) == 0
    printed = capsys.readouterr().out
    assert f"Using the index {export_copy}/_index/{COLUMN}.usearch" in printed
    assert "(index of 300 rows)" in printed
    assert analyze.main([export_copy, "neighbors", "--id", key, "--column", COLUMN, "--exact"]) == 0
    printed = capsys.readouterr().out
    assert "Using the index" not in printed and "(299 rows compared)" in printed


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_ranks_by_the_metric_of_the_columns_index(export_copy, rows, metric, tmp_path, capsys):
    """With an ip or l2 index, --exact ranked by cosine similarity: another answer than the index's to the
    same question, so the index could not be checked against it, and "--exact finds them all" was false."""
    build(export_copy, metric=metric, **EXACT_SETTINGS)
    vectors = np.stack(rows[COLUMN].to_numpy())
    key = rows["id"][0]

    def listed(*flags):
        argv = [export_copy, "neighbors", "--id", key, "--column", COLUMN, "-k", "5", *flags]
        assert analyze.main(argv) == 0
        return [
            line.split()[2] for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()
        ]

    def nearest(by):
        scores = brute_force(vectors, vectors[0], by)
        scores[0] = -np.inf
        return [rows["id"][i] for i in np.argsort(-scores, kind="stable")[:5]]

    assert listed() == listed("--exact") == nearest(metric)
    # The other metrics stay at hand, by a scan.
    assert listed("--metric", "cos") == nearest("cos")
    queries = tmp_path / "q.txt"
    queries.write_text(key + "\n", encoding="utf-8")
    out = tmp_path / "a.parquet"
    argv = [
        export_copy,
        "neighbors",
        "--queries",
        str(queries),
        "--column",
        COLUMN,
        "-k",
        "5",
        "--out",
        str(out),
    ]
    assert analyze.main([*argv, "--exact"]) == 0
    assert pq.read_table(out)["id"].to_pylist() == nearest(metric)


def test_knn_score_over_the_whole_export_equals_brute_force(export_copy, rows, capsys):
    build(export_copy, column="lstm_title", **EXACT_SETTINGS)
    data = open_documents(export_copy)
    loaded = open_index(data, "lstm_title")
    score = knn_score_indexed(data, loaded, "topic", k=10)
    reference = score_label_agreement(np.stack(rows["lstm_title"].to_numpy()), rows["topic"], k=10)
    assert score.rows == reference.rows == ROWS
    assert score.agreement == pytest.approx(reference.agreement, abs=1e-9)
    assert score.chance == pytest.approx(reference.chance)
    assert score.per_class.keys() == reference.per_class.keys()
    for name, (count, agreement) in reference.per_class.items():
        assert score.per_class[name] == (count, pytest.approx(agreement, abs=1e-9))
    argv = [export_copy, "knn-score", "--column", "lstm_title", "--label", "topic", "--all"]
    assert analyze.main(argv) == 0
    assert f"agreement  {reference.agreement:.4f}" in capsys.readouterr().out


def test_knn_score_all_without_an_index_says_how_to_build_one(export_dir, capsys):
    argv = [export_dir, "knn-score", "--column", COLUMN, "--label", "kind", "--all"]
    assert analyze.main(argv) == 2
    assert f"index --column {COLUMN}" in capsys.readouterr().err


# --- recall ------------------------------------------------------------------------------------


def test_recall_is_measured_against_brute_force_and_stored(export_copy, rows, capsys):
    """A deliberately weak graph: its recall is below 1 and equals the one recomputed here."""
    argv = [export_copy, "index", "--column", COLUMN, "--connectivity", "2", "--expansion_add", "2"]
    argv += ["--expansion_search", "2", "--recall_queries", "1000"]
    assert analyze.main(argv) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(export_copy, "_index", f"{COLUMN}.json"), encoding="utf-8") as handle:
        metadata = json.load(handle)
    recall = metadata["recall"]
    # More queries asked than rows: every row is a query.
    assert (recall["queries"], recall["k"]) == (ROWS, 10)
    data = open_documents(export_copy)
    loaded = open_index(data, COLUMN)
    vectors = np.stack(rows[COLUMN].to_numpy())
    positions, _ = loaded.search(vectors, 10, exclude=[{i} for i in range(len(vectors))])
    hits = []
    for i in range(len(vectors)):
        expected = brute_force(vectors, vectors[i], "cos")
        expected[i] = -np.inf
        kth = np.sort(expected)[::-1][9]
        hits.append(sum(expected[p] >= kth - 1e-5 for p in positions[i] if p >= 0) / 10)
    assert 0 < recall["recall"] < 1
    assert recall["recall"] == pytest.approx(np.mean(hits), abs=1e-9)
    assert f"recall@10 {recall['recall']:.4f} against the exact scan on 300 random rows" in printed
    assert "build " in printed and "MiB" in printed and "peak RSS" in printed
    assert metadata["build_seconds"] >= 0 and metadata["peak_rss_bytes"] > 0
    index_file = os.path.join(export_copy, "_index", f"{COLUMN}.usearch")
    with open(index_file, "rb") as handle:
        assert metadata["sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert metadata["bytes"] == os.path.getsize(index_file)
    with open(os.path.join(export_copy, layout_lib.MANIFEST), "rb") as handle:
        assert metadata["source"]["manifest_sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert sorted(os.listdir(os.path.join(export_copy, "_index"))) == [f"{COLUMN}.json", f"{COLUMN}.usearch"]


# --- the index belongs to one export ----------------------------------------------------------


def test_overwrite_drops_the_index_and_an_index_kept_over_it_is_refused(export_copy, capsys):
    build(export_copy)
    index_dir = os.path.join(export_copy, "_index")
    kept = str(export_copy) + ".kept-index"
    shutil.copytree(index_dir, kept)
    assert state_lib.output_state(export_copy) == "finished"
    flags = ["--output", export_copy, "--layer", COLUMN, "--limit", "50", "--overwrite"]
    summary = run_export(flags)
    assert summary.exit_code == 0, summary.message
    assert glob.glob(os.path.join(index_dir, "*")) == []
    key = open_documents(export_copy).dataset.head(1, columns=["id"])["id"][0].as_py()
    assert analyze.main([export_copy, "neighbors", "--id", key]) == 0
    assert "rows compared)" in capsys.readouterr().out
    # A commit that left _index/ in place: the index is refused, never used.
    shutil.rmtree(index_dir)
    shutil.copytree(kept, index_dir)
    assert analyze.main([export_copy, "neighbors", "--id", key]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and "was built for another version of this export" in message
    assert f"index --column {COLUMN}" in message and "--exact" in message
    assert analyze.main([export_copy, "neighbors", "--id", key, "--exact"]) == 0


def test_reuse_keeps_the_earlier_exports_index(export_copy, tmp_path, capsys):
    build(export_copy)
    later = str(tmp_path / "later")
    summary = run_export(
        ["--output", later, "--layer", COLUMN, "--layer", "lstm_title"]
        + ["--keep_fields", "kind,topic", "--limit", str(ROWS), "--reuse", export_copy]
    )
    assert summary.exit_code == 0, summary.message
    assert not os.path.exists(os.path.join(later, "_index"))
    key = open_documents(export_copy).dataset.head(1, columns=["id"])["id"][0].as_py()
    assert analyze.main([export_copy, "neighbors", "--id", key]) == 0
    assert "Using the index" in capsys.readouterr().out


def test_a_damaged_index_file_is_refused(export_copy, capsys):
    build(export_copy)
    path = os.path.join(export_copy, "_index", f"{COLUMN}.usearch")
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        handle.write(b"\x00\x01\x02\x03")
    key = open_documents(export_copy).dataset.head(1, columns=["id"])["id"][0].as_py()
    assert analyze.main([export_copy, "neighbors", "--id", key]) == 2
    assert "does not match the SHA-256" in capsys.readouterr().err


def test_a_build_that_dies_before_its_metadata_leaves_no_index(export_copy, monkeypatch, capsys):
    build(export_copy)
    upload = index_build._upload

    def die(*args):
        upload(*args)  # the new index file is in place, its metadata still COLUMN.json.tmp
        raise KeyboardInterrupt

    monkeypatch.setattr(index_build, "_upload", die)
    with pytest.raises(KeyboardInterrupt):
        build(export_copy, metric="l2")
    monkeypatch.undo()
    key = open_documents(export_copy).dataset.head(1, columns=["id"])["id"][0].as_py()
    assert sorted(os.listdir(os.path.join(export_copy, "_index"))) == [
        f"{COLUMN}.json.tmp",
        f"{COLUMN}.usearch",
    ]
    # Neither the old index (its metadata went first) nor the new one without metadata.
    assert analyze.main([export_copy, "neighbors", "--id", key]) == 0
    assert "rows compared)" in capsys.readouterr().out
    # What it left is ours: the export can still be replaced, and the next build works.
    assert state_lib.output_state(export_copy) == "finished"
    assert build(export_copy)["metric"] == "cos"
    assert analyze.main([export_copy, "neighbors", "--id", key]) == 0
    assert "Using the index" in capsys.readouterr().out


def test_no_index_of_an_export_that_is_running_or_unfinished(export_copy, capsys):
    with lock_lib.OutputLock(export_copy):
        assert analyze.main([export_copy, "index", "--column", COLUMN]) == 2
        assert "is in use by" in capsys.readouterr().err
    os.remove(os.path.join(export_copy, layout_lib.MANIFEST))
    assert analyze.main([export_copy, "index", "--column", COLUMN]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(export_copy, "_index"))
    # Killed before any row file was committed: its staging only. It was called "not the --output".
    for name in os.listdir(export_copy):
        if name.startswith("part-"):
            os.remove(os.path.join(export_copy, name))
    os.makedirs(os.path.join(export_copy, layout_lib.STAGING, "0123456789ab"))
    assert analyze.main([export_copy, "neighbors", "--id", "x"]) == 2
    assert "has not finished" in capsys.readouterr().err


# --- flags, the extra, odd vectors --------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--connectivity", "1"], "--connectivity must be an integer of at least 2"),
        (["--expansion_search", "0"], "--expansion_search must be an integer of at least 1"),
        (["--recall_queries", "-1"], "--recall_queries must be an integer of at least 0"),
        (["--threads", "-2"], "--threads must be an integer of at least 0"),
        (["--column", "kind"], "is string, not a vector"),
    ],
)
def test_bad_index_flags_fail_with_one_error_line(export_dir, capsys, flags, message):
    assert analyze.main([export_dir, "index", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(export_dir, "_index"))


def test_missing_usearch_names_the_extra(export_copy, monkeypatch, capsys):
    build(export_copy)
    monkeypatch.setitem(sys.modules, "usearch", None)
    monkeypatch.setitem(sys.modules, "usearch.index", None)
    assert analyze.main([export_copy, "index", "--column", "lstm_title"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install 'embexport[index]'" in err
    key = open_documents(export_copy).dataset.head(1, columns=["id"])["id"][0].as_py()
    assert analyze.main([export_copy, "neighbors", "--id", key]) == 2
    err = capsys.readouterr().err
    assert "pip install 'embexport[index]'" in err and "--exact" in err
    assert analyze.main([export_copy, "neighbors", "--id", key, "--exact"]) == 0


def _write_export(directory, vectors, ids):
    """A minimal finished export: one shard with id and v, and a manifest."""
    os.makedirs(directory)
    # A list<float> column, as other tools write vectors (the export's own are fixed-size lists).
    column = pa.array(vectors, pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": ids, "v": column}), os.path.join(directory, "part-00000-of-00001.parquet"))
    with open(os.path.join(directory, layout_lib.MANIFEST), "w", encoding="utf-8") as handle:
        json.dump({"rows_written": len(ids)}, handle)


def test_null_and_non_finite_vectors_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    vectors = [list(v) for v in rng.normal(size=(40, 4))]
    vectors[3], vectors[7] = None, [np.nan, 0, 0, 1]
    vectors[9] = [np.inf, 0, 0, 1]
    # Two rows with one vector: tied, they rank by id, as in the exact scan.
    vectors[25] = vectors[12]
    directory = str(tmp_path / "odd")
    _write_export(directory, vectors, [f"d{i}" for i in range(40)])
    metadata = build(directory, column="v", **EXACT_SETTINGS)
    assert (metadata["rows"], metadata["indexed"]) == (40, 37)
    assert (metadata["skipped_null"], metadata["skipped_non_finite"]) == (1, 2)
    data = open_documents(directory)
    loaded = open_index(data, "v")
    found, _ = indexed_neighbors(data, loaded, "d0", k=36)
    assert {n.key for n in found} == {f"d{i}" for i in range(1, 40)} - {"d3", "d7", "d9"}
    order = [n.key for n in found]
    assert order.index("d25") == order.index("d12") + 1
    assert order == [n.key for n in find_neighbors(data, "d0", "v", k=36)[0]]
    with pytest.raises(AnalysisError, match=r"has no usable 'v' vector \(it is null\)"):
        indexed_neighbors(data, loaded, "d3", k=5)
    # Not "it is null", as it said of a NaN vector.
    with pytest.raises(AnalysisError, match=r"has no usable 'v' vector \(it has NaN or infinite values\)"):
        indexed_neighbors(data, loaded, "d7", k=5)
    with pytest.raises(AnalysisError, match="NaN or infinite values"):
        find_neighbors(data, "d9", "v", k=5)


# --- batch mode ---------------------------------------------------------------------------------


def test_batch_ids_saved_as_utf8_with_bom_and_crlf_are_all_answered(export_copy, rows, tmp_path, capsys):
    """Notepad's "UTF-8 with BOM": the BOM stayed in the first id, which then matched no row."""
    keys = list(rows["id"][:3])
    ids_file = tmp_path / "ids.txt"
    ids_file.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(keys).encode("utf-8") + b"\r\n")
    out = str(tmp_path / "answers.parquet")
    argv = [export_copy, "neighbors", "--queries", str(ids_file), "--column", COLUMN, "-k", "2"]
    assert analyze.main([*argv, "--out", out, "--exact"]) == 0
    assert "3 queries, 0 of them unanswered" in capsys.readouterr().out
    answers = pq.read_table(out).to_pylist()
    assert sorted({a["query"] for a in answers}) == sorted(keys)
    assert all(a["problem"] is None for a in answers)


def test_batch_neighbors_from_ids_and_vectors_write_parquet(export_copy, rows, tmp_path, capsys):
    build(export_copy, **EXACT_SETTINGS)
    data = open_documents(export_copy)
    loaded = open_index(data, COLUMN)
    keys = list(rows["id"][:5])
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join([*keys, "no-such-id"]) + "\n", encoding="utf-8")
    for extra in ([], ["--exact"]):
        out = str(tmp_path / f"answers{len(extra)}.parquet")
        argv = [export_copy, "neighbors", "--queries", str(ids_file), "--column", COLUMN, "-k", "4"]
        assert analyze.main([*argv, "--out", out, *extra]) == 0
        assert "6 queries, 1 of them unanswered" in capsys.readouterr().out
        answers = pq.read_table(out).to_pylist()
        assert len(answers) == 5 * 4 + 1
        assert answers[-1]["query"] == "no-such-id" and "no row has the key" in answers[-1]["problem"]
        for key in keys:
            mine = [a for a in answers if a["query"] == key]
            expected, _ = find_neighbors(data, key, COLUMN, k=4)
            assert [a["id"] for a in mine] == [n.key for n in expected]
            assert [a["rank"] for a in mine] == [1, 2, 3, 4]
            assert [a["kind"] for a in mine] == [n.details["kind"] for n in expected]
            np.testing.assert_allclose(
                [a["similarity"] for a in mine], [n.similarity for n in expected], atol=1e-5
            )
    vectors = np.stack(rows[COLUMN].to_numpy()[:3]).astype(np.float32)
    np.save(tmp_path / "q.npy", vectors)
    out = str(tmp_path / "vectors.parquet")
    argv = [export_copy, "neighbors", "--queries", str(tmp_path / "q.npy"), "--column", COLUMN, "-k", "2"]
    assert analyze.main([*argv, "--out", out]) == 0
    answers = pq.read_table(out).to_pylist()
    # A vector query has no row to exclude: its own row comes first.
    assert [a["id"] for a in answers if a["rank"] == 1] == list(rows["id"][:3])
    positions, _ = loaded.search(vectors, 2)
    assert [a["id"] for a in answers] == [rows["id"][p] for p in positions.ravel()]
    np.save(tmp_path / "bad.npy", np.zeros((2, 5), np.float32))
    argv[3] = str(tmp_path / "bad.npy")
    assert analyze.main([*argv, "--out", out, "--overwrite"]) == 2
    assert "holds 5-dim vectors; 'lstm_content' has 128" in capsys.readouterr().err


def test_a_full_disk_while_writing_is_one_error_line_and_no_index(export_copy, monkeypatch, capsys):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_build, "_upload", full)
    assert analyze.main([export_copy, "index", "--column", COLUMN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Could not build or write the index") and "No space left" in err
    assert open_index(open_documents(export_copy), COLUMN) is None


def test_an_export_replaced_during_the_build_gets_no_index(export_copy, monkeypatch):
    measure = index_build.measure_recall

    def replace_meanwhile(*args, **kwargs):
        # What another writer (object storage has no lock) does between the stream and the upload.
        with open(os.path.join(export_copy, layout_lib.MANIFEST), "a", encoding="utf-8") as handle:
            handle.write("\n")
        return measure(*args, **kwargs)

    monkeypatch.setattr(index_build, "measure_recall", replace_meanwhile)
    with pytest.raises(AnalysisError, match="was replaced while its index was built"):
        build(export_copy)
    assert not glob.glob(os.path.join(export_copy, "_index", "*"))


def test_index_of_a_vocabulary_is_used_for_words_and_tied_to_its_file(tmp_path, capsys):
    from models.bundle import DEFAULT_BUNDLE
    from pipeline import vocabulary

    directory = str(tmp_path / "vocabulary")
    vocabulary.export_vocabulary(DEFAULT_BUNDLE, None, "emb", directory)
    # Two builds at once: the second is refused, as on an export (both said "Indexed", one was lost).
    with lock_lib.OutputLock(directory, run_label="index"):
        assert analyze.main([directory, "index"]) == 2
        assert "is in use by" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(directory, layout_lib.LOCK))
    assert analyze.main([directory, "index", "--expansion_search", "256"]) == 0
    assert "rows of vector (300 dims, metric cos)" in capsys.readouterr().out
    data = open_vocabulary(directory)
    loaded = open_index(data, "vector")
    for word in ("thread", "socket", "the"):
        indexed, _ = indexed_neighbors(data, loaded, word, k=10)
        exact, _ = find_neighbors(data, word, "vector", k=10)
        assert len({n.key for n in indexed} & {n.key for n in exact}) >= 9
        assert all(n.details["token_id"] is not None for n in indexed)
    assert analyze.main([directory, "neighbors", "--word", "thread"]) == 0
    assert "Using the index" in capsys.readouterr().out
    # A vocabulary written again (here: the same rows, another row-group layout) is another file.
    path = os.path.join(directory, "vocabulary.parquet")
    pq.write_table(pq.read_table(path), path, row_group_size=1000)
    assert analyze.main([directory, "neighbors", "--word", "thread"]) == 2
    assert "was built for another version" in capsys.readouterr().err


def test_only_the_index_files_are_ours(export_copy):
    build(export_copy)
    assert state_lib.output_state(export_copy) == "finished"
    with open(os.path.join(export_copy, "_index", "notes.txt"), "w", encoding="utf-8") as handle:
        handle.write("a user's file: never deleted by an export")
    assert state_lib.output_state(export_copy) == "foreign"
    assert state_lib.foreign_files(export_copy) == ["_index/notes.txt"]


@pytest.mark.parametrize(
    "name, content",
    [
        ("settings.json", '{"note": "a user\'s settings"}'),
        ("my_hnsw_m64.usearch", "a usearch index built by hand"),
        ("mine.usearch.tmp", "a user's file"),
        # Named as an index's metadata, but not ours: another format, or naming another file.
        ("other.json", '{"format": "faiss", "source": {}, "file": "_index/other.usearch"}'),
        ("third.json", '{"format": "usearch", "source": {}, "file": "_index/lstm_content.usearch"}'),
        ("list.json", "[]"),
    ],
)
def test_a_users_file_in_the_index_directory_is_never_deleted_by_overwrite(export_copy, name, content):
    build(export_copy)
    path = os.path.join(export_copy, "_index", name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(content)
    assert state_lib.foreign_files(export_copy) == [f"_index/{name}"]
    with pytest.raises(ExportConfigError, match="holds files that no export wrote"):
        run_export(["--output", export_copy, "--layer", COLUMN, "--limit", "20", "--overwrite"])
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == content
    # The export's own index files are still told apart: once the user's file is gone, it is replaced.
    os.remove(path)
    summary = run_export(["--output", export_copy, "--layer", COLUMN, "--limit", "20", "--overwrite"])
    assert summary.exit_code == 0, summary.message
    assert os.listdir(os.path.join(export_copy, "_index")) == []


@pytest.mark.parametrize(
    "step, when",
    # After _upload, only the rename of the metadata into place is left.
    [("_write_new_file", "after"), ("_upload", "before"), ("_upload", "after")],
)
def test_what_a_build_killed_at_any_step_leaves_is_the_exports_own(export_copy, monkeypatch, step, when):
    """Only files named by index metadata of ours are ours under _index/: a build killed between its
    writes must leave none that --overwrite would refuse as a user's."""
    build(export_copy)
    real = getattr(index_build, step)

    def killed(*args):
        if when == "after":
            real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(index_build, step, killed)
    with pytest.raises(KeyboardInterrupt):
        build(export_copy, metric="l2")
    monkeypatch.undo()
    assert os.path.exists(os.path.join(export_copy, "_index", f"{COLUMN}.json.tmp"))
    assert state_lib.foreign_files(export_copy) == []
    assert state_lib.check_output_state(export_copy, overwrite=True) == "finished"
    assert build(export_copy)["metric"] == "cos"
    assert sorted(os.listdir(os.path.join(export_copy, "_index"))) == [f"{COLUMN}.json", f"{COLUMN}.usearch"]


@pytest.mark.parametrize(
    "link", ["_index", "_index/lstm_content.json.tmp", "_index/lstm_content.usearch.tmp"]
)
def test_a_build_never_writes_or_deletes_through_a_link(export_copy, tmp_path, link, capsys):
    """A link inside the export (a linked `_index`, or an index file of the column that is a link)
    would have the build delete and write the user's files where it points, outside the export."""
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = {f"{COLUMN}.json": '{"a user\'s": "file"}', "notes.txt": "my notes"}
    for name, content in precious.items():
        (outside / name).write_text(content, encoding="utf-8")
    path = os.path.join(export_copy, link)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(str(outside) if link == "_index" else str(outside / "notes.txt"), path)
    assert analyze.main([export_copy, "index", "--column", COLUMN]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is a symbolic link") and err.count("\n") == 1, err
    assert {p.name: p.read_text(encoding="utf-8") for p in outside.iterdir()} == precious


def test_a_first_build_on_a_full_disk_leaves_the_export_replaceable(export_copy, monkeypatch, capsys):
    """The disk fills as the first build writes its metadata: what that leaves (nothing named by
    metadata of ours) must not make --overwrite refuse the export as holding a user's file."""
    write = index_build._write_bytes

    def full(filesystem, target, data):
        write(filesystem, target, data[: len(data) // 2])  # what got onto the disk: half of it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_build, "_write_bytes", full)
    assert analyze.main([export_copy, "index", "--column", COLUMN]) == 2
    assert "No space left" in capsys.readouterr().err
    assert os.listdir(os.path.join(export_copy, "_index")) == []
    assert state_lib.check_output_state(export_copy, overwrite=True) == "finished"


def test_a_full_disk_as_the_build_takes_the_lock_is_one_error_line(export_copy, monkeypatch, capsys):
    def full(self):
        raise OSError(28, "No space left on device", self.path)

    monkeypatch.setattr(lock_lib.OutputLock, "_try_local", full)
    assert analyze.main([export_copy, "index", "--column", COLUMN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot index") and "disk is full" in err and err.count("\n") == 1, err
    assert not os.path.exists(os.path.join(export_copy, "_index"))


def test_a_vocabulary_whose_index_build_was_killed_can_be_written_again(tmp_path, capsys):
    """A build of a vocabulary's index locks its directory; killed, it leaves `_LOCK` (no one holds
    it). That made `pipeline.vocabulary --overwrite` call the directory an export, for good."""
    import forkserver

    from pipeline import vocabulary

    directory = str(tmp_path / "vocabulary")
    vocabulary.export_vocabulary(DEFAULT_BUNDLE_PATH, None, "emb", directory)
    killed_while_locked = (
        "import os, signal, sys\n"
        "from pipeline.writing.lock import OutputLock\n"
        "OutputLock(sys.argv[1], run_label='index').__enter__()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    # Forked from the warm server: the lock's import (Beam) is not what this is about.
    child = forkserver.run([sys.executable, "-c", killed_while_locked, directory], cwd=REPOSITORY)
    assert child.returncode == -9 and os.path.exists(os.path.join(directory, layout_lib.LOCK))
    argv = ["--layer", "emb", "--output", directory, "--overwrite"]
    # Held, it is still refused: a live run or build is using the directory.
    with lock_lib.OutputLock(directory, run_label="index"):
        assert vocabulary.main(argv) == vocabulary.EXIT_CONFIG_ERROR
        assert "(it holds _LOCK)" in capsys.readouterr().err
    os.close(os.open(os.path.join(directory, layout_lib.LOCK), os.O_CREAT | os.O_WRONLY))  # as it was
    assert vocabulary.main(argv) == 0, capsys.readouterr().err


def test_the_index_and_its_metadata_are_on_disk_before_they_are_named(export_copy, monkeypatch):
    """Nothing of the build was flushed: after a power loss `_index/COLUMN.json` could be empty, a file no
    metadata of ours names, and --overwrite would refuse the export for it."""
    flushed = []
    fsync = os.fsync

    def recorded(descriptor):
        flushed.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recorded)
    build(export_copy)
    index = os.path.realpath(os.path.join(export_copy, "_index"))
    names = [os.path.relpath(path, index) for path in flushed if path.startswith(index)]
    assert [name.rsplit(".", 1)[0] for name in names if name.startswith(f"{COLUMN}.json.tmp.")] == [
        f"{COLUMN}.json.tmp"
    ]
    assert f"{COLUMN}.usearch.tmp" in names and "." in names, names


def test_a_stop_signal_as_the_metadata_is_flushed_leaves_nothing_foreign(export_copy, monkeypatch):
    """A Ctrl-C or SIGTERM (a KeyboardInterrupt) while the new metadata's aside was flushed to disk left
    `_index/COLUMN.json.tmp.XXXXXXXX`, named by nothing: --overwrite refused the export as a user's. An
    aside a SIGKILL leaves there, holding our metadata, is ours too."""
    flush = index_build._flush_to_disk

    def stopped(path):
        if ".json.tmp." in path:
            raise KeyboardInterrupt
        flush(path)

    monkeypatch.setattr(index_build, "_flush_to_disk", stopped)
    with pytest.raises(KeyboardInterrupt):
        build(export_copy)
    monkeypatch.undo()
    assert os.listdir(os.path.join(export_copy, "_index")) == []
    build(export_copy)
    # Killed (SIGKILL) between writing the aside and renaming it: the aside holds our metadata.
    index = os.path.join(export_copy, "_index")
    shutil.copy(os.path.join(index, f"{COLUMN}.json"), os.path.join(index, f"{COLUMN}.json.tmp.0123abcd"))
    assert state_lib.foreign_files(export_copy) == []
    assert state_lib.check_output_state(export_copy, overwrite=True) == "finished"
    # The commit of an --overwrite deletes it with the rest, and a replayed journal may name it.
    aside = f"_index/{COLUMN}.json.tmp.0123abcd"
    assert layout_lib.is_ours(aside, commit_lib.owned_index_files(export_copy))
    assert layout_lib.INDEX_FILE.fullmatch(aside)
