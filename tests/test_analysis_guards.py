"""Attacks on `pipeline.analyze` and `pipeline.vocabulary`: what they write and read, and their flags.

Each test drives the command line (`analyze.main`, `vocabulary.main`) on a real
export of the sample corpus or on Parquet files written here, and checks the
files on disk afterwards.
"""

import glob
import hashlib
import json
import os
import shutil
import sys
import warnings

import forkserver
import matplotlib.cbook
import matplotlib.figure
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.paths import DEFAULT_BUNDLE
from pipeline import analyze, vocabulary
from pipeline.analysis import index_build, index_search
from pipeline.analysis.dataset import open_documents, open_vocabulary
from pipeline.analysis.exact import exact_top_k
from pipeline.analysis.knn import knn_score, knn_score_indexed, score_label_agreement
from pipeline.analysis.neighbors import find_neighbors, indexed_neighbors, open_index
from pipeline.analysis.plot import plot_projection
from pipeline.running.export import run_export
from pipeline.writing import lock as lock_lib
from pipeline.writing.layout import MANIFEST

COLUMN = "lstm_title"
ROWS = 60
# Settings under which HNSW finds the exact neighbours of a few hundred rows (see test_index).
EXACT_SETTINGS = {"connectivity": 400, "expansion_add": 512, "expansion_search": 512}
SHARD = "part-00000-of-00001.parquet"
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A real export of 60 documents: one vector column and the kept fields kind and topic."""
    directory = str(tmp_path_factory.mktemp("guards") / "export")
    flags = ["--output", directory, "--layer", COLUMN, "--keep_fields", "kind,topic", "--limit", str(ROWS)]
    summary = run_export(flags)
    assert summary.exit_code == 0, summary.message
    return directory


@pytest.fixture()
def export_copy(export_dir, tmp_path):
    target = str(tmp_path / "export")
    shutil.copytree(export_dir, target)
    return target


@pytest.fixture()
def ids_file(export_dir, tmp_path):
    """A .txt of three ids of the export and one that is not in it."""
    ids = pq.read_table(glob.glob(os.path.join(export_dir, "part-*.parquet"))[0])["id"].to_pylist()[:3]
    path = tmp_path / "ids.txt"
    path.write_text("\n".join([*ids, "no-such-id"]) + "\n", encoding="utf-8")
    return str(path)


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def write_export(directory, columns, manifest=True):
    """A finished export of one row file; its manifest lists the file with its size, as a run's does."""
    os.makedirs(directory)
    path = os.path.join(directory, SHARD)
    pq.write_table(pa.table(columns), path)
    if manifest:
        shards = {"rows": [{"file": SHARD, "rows": len(columns["id"]), "bytes": os.path.getsize(path)}]}
        with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump({"rows_written": len(columns["id"]), "shards": shards}, handle)
    return directory


def error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


# --- what --out writes ------------------------------------------------------------------------------


def test_batch_out_never_clobbers_a_file_beside_it_nor_writes_through_a_link(
    export_copy, ids_file, tmp_path, capsys
):
    precious = tmp_path / "answers.parquet.tmp"
    precious.write_text("my precious notes")
    part = os.path.join(export_copy, SHARD)
    before = sha256(part)
    os.symlink(part, tmp_path / "out2.parquet.tmp")
    for out in ("answers.parquet", "out2.parquet"):
        argv = [
            export_copy,
            "neighbors",
            "--queries",
            ids_file,
            "--exact",
            "-k",
            "3",
            "--out",
            str(tmp_path / out),
        ]
        assert analyze.main(argv) == 0
        assert pq.read_table(tmp_path / out).num_rows == 3 * 3 + 1
    assert precious.read_text() == "my precious notes"
    assert sha256(part) == before
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["answers.parquet", "answers.parquet.tmp", "out2.parquet", "out2.parquet.tmp", "export", "ids.txt"]
    )


def test_kept_fields_named_like_answer_columns_are_renamed_not_put_in_their_place(tmp_path, capsys):
    rng = np.random.default_rng(3)
    rows = 30
    columns = {
        "id": [f"d{i}" for i in range(rows)],
        "v": pa.array(list(rng.normal(size=(rows, 4))), pa.list_(pa.float32(), 4)),
        "query": [f"search term {i}" for i in range(rows)],
        "similarity": [f"s{i}" for i in range(rows)],
        "problem": [f"p{i}" for i in range(rows)],
        "topic": [f"t{i % 3}" for i in range(rows)],
    }
    export = write_export(str(tmp_path / "log"), columns)
    queries = tmp_path / "q.txt"
    queries.write_text("d1\nd2\nnope\n", encoding="utf-8")
    out = tmp_path / "a.parquet"
    assert analyze.main([export, "neighbors", "--queries", str(queries), "-k", "2", "--out", str(out)]) == 0
    table = pq.read_table(out)
    fixed = ["query", "rank", "id", "similarity"]
    kept = ["field.query", "field.similarity", "field.problem", "topic"]
    assert table.column_names == [*fixed, *kept, "problem"]
    assert table.schema.field("similarity").type == pa.float64()
    answers = table.to_pylist()
    assert [a["query"] for a in answers] == ["d1", "d1", "d2", "d2", "nope"]
    for answer in answers[:4]:
        number = int(answer["id"][1:])
        assert answer["field.query"] == f"search term {number}"
        assert answer["field.problem"] == f"p{number}" and answer["problem"] is None
    assert answers[4]["problem"] == "no row has the key 'nope'"


def test_batch_queries_on_a_vocabulary_keep_the_token_id_type(tmp_path, capsys):
    rng = np.random.default_rng(5)
    tokens = ["<pad>", "<oov>", *[f"w{i}" for i in range(20)]]
    table = pa.table(
        {
            "token_id": pa.array(range(len(tokens)), pa.int32()),
            "token": tokens,
            "vector": pa.array(list(rng.normal(size=(len(tokens), 4))), pa.list_(pa.float32(), 4)),
        }
    )
    os.makedirs(tmp_path / "voc")
    pq.write_table(table, tmp_path / "voc" / vocabulary.VOCABULARY_FILE)
    words = tmp_path / "words.txt"
    words.write_text("w3\nw7\n", encoding="utf-8")
    out = tmp_path / "a.parquet"
    argv = [str(tmp_path / "voc"), "neighbors", "--queries", str(words), "-k", "2", "--out", str(out)]
    assert analyze.main(argv) == 0
    answers = pq.read_table(out)
    assert answers.schema.field("token_id").type == pa.int32()
    data = open_vocabulary(str(tmp_path / "voc"))
    expected = [n.key for n in find_neighbors(data, "w3", "vector", k=2)[0]]
    assert answers.to_pylist()[0]["token"] == expected[0]
    assert answers["token_id"].to_pylist()[0] == tokens.index(expected[0])


def test_an_answer_read_while_an_overwrite_committed_over_the_export_is_refused(
    export_copy, monkeypatch, capsys
):
    """A run's --overwrite renamed its row files over those being scanned: the answer mixed two
    exports' rows, exit 0."""
    key = pq.read_table(glob.glob(os.path.join(export_copy, "part-*.parquet"))[0])["id"][0].as_py()
    answer = analyze.run_command

    def committed_over_meanwhile(args):
        text = answer(args)
        # As a commit does: a new file of the same name renamed over one that was read.
        shard = sorted(glob.glob(os.path.join(export_copy, "part-*.parquet")))[0]
        shutil.copy(shard, shard + ".new")
        os.replace(shard + ".new", shard)
        return text

    monkeypatch.setattr(analyze, "run_command", committed_over_meanwhile)
    assert analyze.main([export_copy, "neighbors", "--id", key, "--exact"]) == 2
    assert "changed while it was read" in error_line(capsys)
    monkeypatch.undo()
    assert analyze.main([export_copy, "neighbors", "--id", key, "--exact"]) == 0


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "new_file"])
@pytest.mark.parametrize("command", ["neighbors", "plot"])
def test_an_answer_refused_as_read_while_the_export_changed_leaves_out_as_it_was(
    export_copy, ids_file, tmp_path, monkeypatch, capsys, command, overwrite
):
    """The read was checked only after --out was written: a refused answer still replaced the user's file."""
    out = tmp_path / ("answer.parquet" if command == "neighbors" else "plot.png")
    if overwrite:
        out.write_bytes(b"the user's earlier answer")
    manifest = os.path.join(export_copy, MANIFEST)
    writers = {"neighbors": (pq, "write_table"), "plot": (matplotlib.figure.Figure, "savefig")}
    owner, name = writers[command]
    real = getattr(owner, name)

    def another_run_commits_meanwhile(*args, **kwargs):
        real(*args, **kwargs)
        # As an --overwrite's commit does: a new manifest renamed over the one read.
        shutil.copy(manifest, manifest + ".new")
        os.utime(manifest + ".new", ns=(1, 1))
        os.replace(manifest + ".new", manifest)

    monkeypatch.setattr(owner, name, another_run_commits_meanwhile)
    flags = ["--queries", ids_file, "--exact"] if command == "neighbors" else []
    argv = [export_copy, command, *flags, "--out", str(out)] + (["--overwrite"] if overwrite else [])
    assert analyze.main(argv) == 2
    assert "changed while it was read" in error_line(capsys)
    if overwrite:
        assert out.read_bytes() == b"the user's earlier answer"
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["export", "ids.txt"] + ([out.name] if overwrite else []))


def test_an_out_in_a_missing_directory_fails_before_any_row_is_read(tmp_path, ids_file, capsys):
    # The export does not even exist: the --out check comes first.
    missing = str(tmp_path / "no-export")
    for argv in (
        [missing, "plot", "--out", str(tmp_path / "nodir" / "p.png")],
        [missing, "neighbors", "--queries", ids_file, "--out", str(tmp_path / "nodir" / "a.parquet")],
    ):
        assert analyze.main(argv) == 2
        err = error_line(capsys)
        assert "nodir' does not exist" in err and "--out" in err


def test_an_out_through_a_link_or_a_file_url_into_an_export_is_refused(
    export_copy, ids_file, tmp_path, capsys
):
    def listing():
        return sorted(os.path.relpath(p, export_copy) for p in glob.glob(export_copy + "/**", recursive=True))

    before = listing()
    shortcut = tmp_path / "shortcut"
    os.symlink(os.path.join(export_copy, "errors"), shortcut)
    assert analyze.main([export_copy, "plot", "--out", str(shortcut / "p.png")]) == 2
    assert "an export or vocabulary directory" in error_line(capsys)
    url = "file://" + os.path.join(export_copy, SHARD)
    argv = [export_copy, "neighbors", "--queries", ids_file, "--exact", "--out", url, "--overwrite"]
    assert analyze.main(argv) == 2
    assert "an export or vocabulary directory" in error_line(capsys)
    assert listing() == before
    # A file:// URL outside any export is written where it points.
    elsewhere = tmp_path / "answers.parquet"
    argv = [export_copy, "neighbors", "--queries", ids_file, "--exact", "--out", "file://" + str(elsewhere)]
    assert analyze.main(argv) == 0
    assert pq.read_table(elsewhere).num_rows > 0


# --- what --queries and the export may hold ---------------------------------------------------------


def test_a_queries_file_that_is_not_parquet_or_not_utf8_is_one_error_line(export_dir, tmp_path, capsys):
    bad_parquet = tmp_path / "q.parquet"
    bad_parquet.write_text("not parquet")
    latin1 = tmp_path / "q.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    for path, message in ((bad_parquet, "not a readable Parquet file"), (latin1, "is not UTF-8 text")):
        argv = [
            export_dir,
            "neighbors",
            "--queries",
            str(path),
            "--exact",
            "--out",
            str(tmp_path / "a.parquet"),
        ]
        assert analyze.main(argv) == 2
        assert message in error_line(capsys)
    assert not (tmp_path / "a.parquet").exists()


def test_foreign_parquet_with_integer_ids_or_a_null_first_vector(tmp_path, capsys):
    vectors = [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]]
    integer_ids = write_export(str(tmp_path / "ints"), {"id": [5, 6, 7, 8], "v": vectors}, manifest=False)
    assert analyze.main([integer_ids, "neighbors", "--id", "5", "--exact"]) == 2
    assert "'id' column of type int64" in error_line(capsys)

    first_null = write_export(
        str(tmp_path / "null"), {"id": ["a", "b", "c", "d"], "v": [None, *vectors[1:]]}, manifest=False
    )
    queries = tmp_path / "q.txt"
    queries.write_text("b\na\n", encoding="utf-8")
    out = tmp_path / "a.parquet"
    argv = [first_null, "neighbors", "--queries", str(queries), "--exact", "-k", "1", "--out", str(out)]
    assert analyze.main(argv) == 0
    answers = pq.read_table(out).to_pylist()
    assert (answers[0]["query"], answers[0]["id"]) == ("b", "d")
    assert answers[1]["query"] == "a" and "null" in answers[1]["problem"]


# --- flags --------------------------------------------------------------------------------------------


# The child's address space is capped (as `prlimit --as`), so an allocation sized by k fails instead of
# swapping. Forked from the warm server (tests/forkserver.py), which sets the limit in the child, not by
# a preexec_fn: that runs Python in a fork of this process, whose gRPC threads (an earlier test's
# pipeline) can abort the child before its exec. A cold start imported Beam for each of the 8 runs.
ADDRESS_SPACE = 4 << 30


def test_a_huge_k_is_capped_at_the_rows_and_huge_hnsw_settings_are_refused(export_copy, ids_file, tmp_path):
    huge = "1000000000"

    def analyze_run(*argv):
        return forkserver.run(
            [sys.executable, "-m", "pipeline.analyze", export_copy, *argv],
            capture_output=True,
            text=True,
            cwd=REPOSITORY,
            timeout=120,
            address_space=ADDRESS_SPACE,
        )

    def ranks(stdout):
        return [line for line in stdout.splitlines() if line.strip()[:1].isdigit()]

    with open(ids_file, encoding="utf-8") as handle:
        ids = handle.read().split()
    built = analyze_run("index", "--column", COLUMN, "--recall_k", huge, "--recall_queries", "5")
    assert built.returncode == 0, built.stderr
    assert f"recall@{ROWS - 1} " in built.stdout
    for exact in ([], ["--exact"]):
        found = analyze_run("neighbors", "--id", ids[0], "--column", COLUMN, "-k", huge, *exact)
        assert found.returncode == 0, found.stderr
        assert 0 < len(ranks(found.stdout)) <= ROWS - 1
        out = str(tmp_path / "a.parquet")
        batch = analyze_run(
            "neighbors",
            "--queries",
            ids_file,
            "--column",
            COLUMN,
            "-k",
            huge,
            "--out",
            out,
            "--overwrite",
            *exact,
        )
        assert batch.returncode == 0, batch.stderr
        answers = pq.read_table(out)
        assert 3 < answers.num_rows <= 3 * (ROWS - 1) + 1
    for flag, value in (("--connectivity", huge), ("--threads", "100000"), ("--expansion_add", huge)):
        refused = analyze_run("index", "--column", COLUMN, flag, value)
        assert (
            refused.returncode == 2 and refused.stderr.startswith("error: ") and "at most" in refused.stderr
        )


@pytest.mark.parametrize("command", [["plot"], ["knn-score", "--label", "topic"], ["index"]])
def test_a_negative_seed_is_refused_before_any_work(export_dir, capsys, command):
    with pytest.raises(SystemExit) as exited:
        analyze.main([export_dir, *command, "--seed", "-1"])
    assert exited.value.code == 2
    assert "--seed: must be an integer of at least 0" in capsys.readouterr().err


# --- the index and the export -----------------------------------------------------------------------


def test_knn_score_all_scores_k_labelled_neighbours_as_the_sample_does(tmp_path):
    rng = np.random.default_rng(11)
    rows, labelled_every = 400, 4
    centres = rng.normal(size=(3, 8))
    classes = rng.integers(0, 3, size=rows)
    vectors = centres[classes] + rng.normal(scale=1.5, size=(rows, 8))
    topics = [f"t{c}" if i % labelled_every == 0 else None for i, c in enumerate(classes)]
    export = write_export(
        str(tmp_path / "e"),
        {
            "id": [f"d{i:03d}" for i in range(rows)],
            "v": pa.array(list(vectors), pa.list_(pa.float32(), 8)),
            "topic": topics,
        },
    )
    data = open_documents(export)
    index_build.build_index(data, "v", index_build.IndexSettings(**EXACT_SETTINGS))
    everything, total = knn_score(data, "v", "topic", k=10, sample=rows)
    assert total == everything.rows == rows // labelled_every
    indexed = knn_score_indexed(data, open_index(data, "v"), "topic", k=10)
    assert indexed.rows == everything.rows
    assert indexed.agreement == pytest.approx(everything.agreement, abs=1e-12)
    assert indexed.per_class.keys() == everything.per_class.keys()
    for name, (count, agreement) in everything.per_class.items():
        assert indexed.per_class[name] == (count, pytest.approx(agreement, abs=1e-12))


def test_rows_without_a_token_are_neither_indexed_nor_returned(tmp_path):
    """A vocabulary's rows past its tokenizer: not indexed, never an answer, and said to have no token."""
    rng = np.random.default_rng(2)
    size, named = 300, 40
    tokens = ["<pad>", "<oov>", *[f"w{i}" for i in range(named - 2)]] + [None] * (size - named)
    table = pa.table(
        {
            "token_id": pa.array(range(size), pa.int32()),
            "token": pa.array(tokens, pa.string()),
            "vector": pa.array(list(rng.normal(size=(size, 6))), pa.list_(pa.float32(), 6)),
        }
    )
    os.makedirs(tmp_path / "voc")
    pq.write_table(table, tmp_path / "voc" / vocabulary.VOCABULARY_FILE)
    data = open_vocabulary(str(tmp_path / "voc"))
    metadata = index_build.build_index(data, "vector", index_build.IndexSettings(**EXACT_SETTINGS))
    assert (metadata["indexed"], metadata["skipped_null"]) == (named, size - named)
    # Their vectors are finite: the report said "260 rows without a finite vector skipped".
    report = index_build.format_build(metadata, str(tmp_path / "voc"))
    assert f"skipped: {size - named} rows without a token (past the tokenizer's vocabulary)" in report
    assert "finite" not in report
    exact, _ = find_neighbors(data, "w5", "vector", k=10)
    through_index, _ = indexed_neighbors(data, open_index(data, "vector"), "w5", k=10)
    assert [n.key for n in through_index] == [n.key for n in exact]
    assert None not in [n.key for n in through_index]


def test_row_files_that_differ_from_the_manifest_are_refused_and_untie_the_index(export_copy, capsys):
    key = pq.read_table(os.path.join(export_copy, SHARD))["id"][0].as_py()
    assert analyze.main([export_copy, "index", "--column", COLUMN, "--recall_queries", "0"]) == 0
    capsys.readouterr()
    part = os.path.join(export_copy, SHARD)
    # The same bytes written again (same size, manifest untouched): the index is no longer trusted.
    with open(part, "rb") as handle:
        content = handle.read()
    stat = os.stat(part)
    with open(part, "wb") as handle:
        handle.write(content)
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert analyze.main([export_copy, "neighbors", "--id", key, "--column", COLUMN]) == 2
    assert "a row file rewritten in place looks the same, so it is not used" in error_line(capsys)
    assert analyze.main([export_copy, "neighbors", "--id", key, "--column", COLUMN, "--exact"]) == 0
    capsys.readouterr()
    # Another size than the manifest records: rows replaced since the export finished.
    with open(part, "ab") as handle:
        handle.write(b"\0")
    assert analyze.main([export_copy, "neighbors", "--id", key, "--column", COLUMN, "--exact"]) == 2
    assert f"{SHARD} has {len(content) + 1} bytes" in error_line(capsys)
    os.remove(part)
    for argv in (["knn-score", "--label", "topic"], ["index", "--column", COLUMN]):
        assert analyze.main([export_copy, *argv]) == 2
        assert f"missing the row file {SHARD}" in error_line(capsys)


# --- plot and vocabulary ------------------------------------------------------------------------------


@pytest.fixture()
def drawn(monkeypatch) -> list[matplotlib.figure.Figure]:
    """The figures the test's plots save, in order (each is still saved as usual)."""
    figures: list[matplotlib.figure.Figure] = []
    real = matplotlib.figure.Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append(figure)
        return real(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figures


def test_plot_legend_names_labels_that_start_with_an_underscore(tmp_path, drawn):
    points = np.random.default_rng(0).normal(size=(30, 2))
    labels = ["__label__sports"] * 10 + ["__label__news"] * 15 + ["_x"] * 5
    plot_projection(points, labels, str(tmp_path / "p.png"), "t", ["a", "b"], legend_title="topic")
    legend = drawn[0].axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [
        "__label__news (15)",
        "__label__sports (10)",
        "_x (5)",
    ]


def test_plot_draws_labels_and_paths_with_dollar_signs_as_written(tmp_path, drawn, capsys):
    """matplotlib reads text between two `$` as a formula: a label "$5 to $10" lost its `$` signs, and
    one that is no formula ("$\\frac{x$") was a ValueError traceback from savefig."""
    labels = ["$5 to $10", "$\\frac{x$", "x"] * 4
    vectors = np.random.default_rng(0).normal(size=(12, 3))
    columns = {
        "id": [f"d{i:02d}" for i in range(12)],
        "v$a$": pa.array(list(vectors), pa.list_(pa.float32(), 3)),
    }
    export = write_export(str(tmp_path / "in $HOME$"), {**columns, "$lab$": labels})
    out = tmp_path / "p.png"
    assert analyze.main([export, "plot", "--label", "$lab$", "--out", str(out)]) == 0, capsys.readouterr().err
    axes = drawn[0].axes[0]
    texts = [axes.get_title(), axes.get_legend().get_title().get_text()]
    texts += [text.get_text() for text in axes.get_legend().get_texts()]
    assert not [text for text in texts if matplotlib.cbook.is_math_text(text)], texts
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vocabulary_refuses_an_output_inside_an_export(export_copy, capsys):
    for output in (export_copy, os.path.join(export_copy, "errors")):
        assert vocabulary.main(["--layer", "emb", "--output", output]) == vocabulary.EXIT_CONFIG_ERROR
        assert "inside the export" in error_line(capsys)
    assert not glob.glob(os.path.join(export_copy, "**", vocabulary.VOCABULARY_FILE + "*"), recursive=True)


def test_word_neighbours_of_an_export_suggest_commands_that_run(export_copy, capsys):
    """`neighbors --word` on an export said "Write one with `python -m pipeline.vocabulary --layer emb
    --output EXPORT`": pasted, vocabulary refused it (inside the export), and it named neither the
    export's model nor a place the vocabulary may go."""
    import shlex

    assert analyze.main([export_copy, "neighbors", "--word", "socket"]) == analyze.EXIT_CONFIG_ERROR
    line = error_line(capsys)
    write, query = [command for command in line.split("`")[1::2]]
    assert shlex.split(write)[:3] == ["python", "-m", "pipeline.vocabulary"]
    assert shlex.split(write)[3:5] == ["--model", DEFAULT_BUNDLE]
    assert vocabulary.main(shlex.split(write)[3:]) == 0, capsys.readouterr().err
    argv = [arg.replace("WORD", "socket") for arg in shlex.split(query)[3:]]
    assert analyze.main(argv) == 0, capsys.readouterr().err
    assert "socket" in capsys.readouterr().out


@pytest.mark.parametrize("output", ["", " ", "dangling"])
def test_vocabulary_refuses_an_empty_output_and_names_a_dangling_link(output, tmp_path, monkeypatch, capsys):
    """An unset $OUT wrote vocabulary.parquet into the working directory, " " made a directory
    named " ", and a link to a missing directory was called a file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "missing" / "dir")
    assert vocabulary.main(["--layer", "emb", "--output", output]) == vocabulary.EXIT_CONFIG_ERROR
    if output.strip():
        assert error_line(capsys).strip() == (
            f"error: --output 'dangling' leads through '{tmp_path / 'dangling'}', a symbolic link to "
            f"'{tmp_path / 'missing' / 'dir'}', which does not exist; create that directory or choose "
            "another --output."
        )
    else:
        empty = "error: --output is empty (an unset shell variable?); give it a directory."
        assert error_line(capsys).strip() == empty
    assert os.listdir(tmp_path) == ["dangling"]


@pytest.mark.parametrize(
    "command, flags",
    [
        ("vocabulary", ["--model", " "]),
        ("vocabulary", ["--tokenizer="]),
        ("inspect", [str(DEFAULT_BUNDLE), "--tokenizer", ""]),
    ],
)
def test_an_empty_model_or_tokenizer_is_refused(command, flags, tmp_path, capsys):
    """`--model "$MODEL"` with $MODEL unset wrote the bundled model's table, and an empty
    --tokenizer meant the bundle's own, both without a word."""
    from pipeline import inspect

    main = {"vocabulary": vocabulary.main, "inspect": inspect.main}[command]
    output = tmp_path / "voc"
    argv = [*flags, "--output", str(output)] if command == "vocabulary" else flags
    assert main(argv) == vocabulary.EXIT_CONFIG_ERROR
    flag = "--model" if "--model" in flags else "--tokenizer"
    assert error_line(capsys).strip().startswith(f"error: {flag} is empty (an unset shell variable?)")
    assert not output.exists()


def test_vocabulary_never_replaces_a_file_beside_it_nor_writes_through_a_link(tmp_path, capsys):
    """It deleted a user's `vocabulary.parquet.tmp`, the name it wrote through."""
    output = tmp_path / "voc"
    output.mkdir()
    precious = output / (vocabulary.VOCABULARY_FILE + ".tmp")
    precious.write_text("my notes", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere.parquet"
    elsewhere.write_text("not a vocabulary", encoding="utf-8")
    (output / ".vocabulary-link.parquet.tmp").symlink_to(elsewhere)
    assert vocabulary.main(["--layer", "emb", "--output", str(output)]) == 0
    assert precious.read_text(encoding="utf-8") == "my notes"
    assert elsewhere.read_text(encoding="utf-8") == "not a vocabulary"
    assert pq.read_table(output / vocabulary.VOCABULARY_FILE).num_rows > 0
    assert sorted(os.listdir(output)) == sorted(
        [vocabulary.VOCABULARY_FILE, precious.name, ".vocabulary-link.parquet.tmp"]
    )


@pytest.mark.parametrize("meanwhile", ["same_command", "an_export"])
def test_vocabulary_never_replaces_what_appeared_at_its_output_while_it_ran(
    meanwhile, tmp_path, monkeypatch, capsys
):
    """Two `vocabulary --output X` at once: the second replaced the first's file (checked before the
    model load only); an export started in X meanwhile got a vocabulary file among its own."""
    from pipeline.planning import model_source

    output = tmp_path / "voc"
    load = model_source.load_model_source

    def meanwhile_loading(*args, **kwargs):
        loaded = load(*args, **kwargs)
        output.mkdir(exist_ok=True)
        if meanwhile == "same_command":
            (output / vocabulary.VOCABULARY_FILE).write_text("the other command's", encoding="utf-8")
        else:
            # A live export holds its lock (one left by a killed run or index build does not count).
            started.append(lock_lib.OutputLock(str(output)).__enter__())
        return loaded

    started: list = []
    monkeypatch.setattr(model_source, "load_model_source", meanwhile_loading)
    try:
        assert vocabulary.main(["--layer", "emb", "--output", str(output)]) == 2
    finally:
        for lock in started:
            lock.release()
    err = error_line(capsys)
    assert ("--overwrite" in err) if meanwhile == "same_command" else ("inside the export" in err), err
    if meanwhile == "same_command":
        assert (output / vocabulary.VOCABULARY_FILE).read_text(encoding="utf-8") == "the other command's"
    assert [name for name in os.listdir(output) if name.endswith(".tmp")] == []


def test_an_out_that_appeared_while_analyze_ran_is_not_replaced(export_copy, tmp_path, monkeypatch, capsys):
    """Two `plot --out P` at once: --out was checked before the rows were read, then renamed over."""
    out = tmp_path / "p.png"
    check = analyze.check_out_file

    def another_wrote_it_meanwhile(path, overwrite):
        checked = check(path, overwrite)
        out.write_bytes(b"the other plot")
        return checked

    monkeypatch.setattr(analyze, "check_out_file", another_wrote_it_meanwhile)
    assert analyze.main([export_copy, "plot", "--out", str(out)]) == 2
    assert "it was not replaced" in error_line(capsys)
    assert out.read_bytes() == b"the other plot"
    assert sorted(os.listdir(tmp_path)) == ["export", "p.png"]


def test_a_full_disk_under_out_is_said_as_such_not_as_a_read_failure(
    export_copy, tmp_path, monkeypatch, capsys
):
    """The line said "Reading OUT or writing --out F failed: No space left on device. Check that it is
    readable (on object storage, the connection and credentials)": the advice of a read failure."""
    import errno

    from pipeline.analysis import answer_file

    def full(path, write, replace=True):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(answer_file, "write_whole_local", full)
    out = tmp_path / "p.png"
    assert analyze.main([export_copy, "plot", "--out", str(out)]) == 2
    err = error_line(capsys)
    assert (
        err.startswith(f"error: Writing --out {str(out)!r} failed: its disk is full")
        and "readable" not in err
    )
    assert not out.exists()


def test_an_export_that_cannot_be_read_is_not_called_a_mix_of_two_exports(export_dir, monkeypatch, capsys):
    from pipeline.analysis import dataset

    def unreachable(location):
        raise OSError("exists() operation failed: Must provide one of client or options")

    monkeypatch.setattr(dataset, "has_pending_commit", unreachable)
    assert analyze.main([export_dir, "knn-score", "--label", "topic"]) == 2
    err = error_line(capsys)
    assert "Cannot read" in err and "credentials" in err and "mix of two exports" not in err


def test_batch_words_on_an_export_of_token_ids_use_its_token_table(tmp_path, capsys):
    output = str(tmp_path / "ids")
    flags = ["--output", output, "--layer", "emb", "--pooling", "none", "--token_storage", "ids"]
    summary = run_export([*flags, "--limit", "5"])
    assert summary.exit_code == 0, summary.message
    words = tmp_path / "words.txt"
    words.write_text("socket\nthread\n", encoding="utf-8")
    out = tmp_path / "a.parquet"
    argv = [output, "neighbors", "--queries", str(words), "-k", "3", "--out", str(out)]
    assert analyze.main(argv) == 0
    answers = pq.read_table(out)
    data = open_vocabulary(output)
    expected = [n.key for n in find_neighbors(data, "socket", "vector", k=3)[0]]
    assert answers.column_names[:3] == ["query", "rank", "token"]
    assert (
        answers.to_pylist()[0]["token"] == expected[0] and answers["problem"].null_count == answers.num_rows
    )


def test_an_index_that_finds_fewer_rows_than_asked_says_so(export_copy, capsys):
    key = pq.read_table(os.path.join(export_copy, SHARD))["id"][0].as_py()
    # A graph this sparse, searched this narrowly, reaches only part of the rows (one thread: the same graph).
    poor = ["--connectivity", "2", "--expansion_add", "1", "--expansion_search", "1", "--threads", "1"]
    assert analyze.main([export_copy, "index", "--column", COLUMN, *poor]) == 0
    capsys.readouterr()
    assert analyze.main([export_copy, "neighbors", "--id", key, "--column", COLUMN, "-k", str(ROWS - 1)]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert 0 < len(listed) < ROWS - 1
    assert f"The index found {len(listed)} of the {ROWS - 1} neighbours asked for" in out
    assert analyze.main([export_copy, "neighbors", "--id", key, "--column", COLUMN, "-k", "1"]) == 0
    assert "neighbours asked for" not in capsys.readouterr().out


def test_a_plot_that_fails_while_drawing_leaves_the_earlier_file_and_nothing_else(tmp_path, monkeypatch):
    path = tmp_path / "p.png"
    path.write_bytes(b"the earlier plot")
    real = matplotlib.figure.Figure.savefig

    def full_disk(figure, sink, *args, **kwargs):
        real(figure, sink, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    points = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(OSError, match="No space left"):
        plot_projection(points, None, str(path), "t", ["a", "b"])
    assert path.read_bytes() == b"the earlier plot"
    assert os.listdir(tmp_path) == ["p.png"]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real)
    plot_projection(points, ["x"] * 10, str(path), "t", ["a", "b"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["p.png"]


def test_plot_where_matplotlib_is_not_installed_is_one_error_line(export_dir, tmp_path, monkeypatch, capsys):
    """A plain `pip install .` has no matplotlib: the --out extension check imported it first, and
    the command ended in a ModuleNotFoundError traceback instead of the install hint."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "p.png"
    status = analyze.main([str(export_dir), "plot", "--label", "topic", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("error: plot draws with matplotlib, which is not installed")
    assert "pip install 'embexport[analysis]'" in err and not out.exists()


@pytest.mark.parametrize("metric", ["cos", "l2"])
def test_tied_rows_are_ranked_by_id_in_every_mode(tmp_path, capsys, metric):
    """Three modes gave three top-k lists when rows tied: ties went by position in the batch scan,
    and the index cut at k by position before it sorted by id."""
    rng = np.random.default_rng(11)
    same = rng.normal(size=4)
    tied = [f"t{n:02d}" for n in rng.permutation(40)]  # ids in no order, spread over every batch
    others = [f"o{n}" for n in range(20)]
    ids = ["q", *tied, *others]
    vectors = [same] * (1 + len(tied)) + list(rng.normal(size=(len(others), 4)) * 3)
    order = rng.permutation(len(ids))
    columns = {
        "id": [ids[i] for i in order],
        "v": pa.array([list(vectors[i]) for i in order], pa.list_(pa.float32(), 4)),
    }
    export = write_export(str(tmp_path / "ties"), columns)
    queries = tmp_path / "q.txt"
    queries.write_text("q\n", encoding="utf-8")
    data = open_documents(export)
    for k in (1, 2, 5, 39):
        expected = sorted(tied)[:k]
        if metric == "cos":
            assert [n.key for n in find_neighbors(data, "q", "v", k, batch_rows=7)[0]] == expected
        query = np.asarray([same], dtype=np.float32)
        positions, _ = exact_top_k(data, "v", query, k, metric, batch_rows=7)
        assert [columns["id"][p] for p in positions[0]] == sorted(["q", *tied])[:k]
        out = tmp_path / f"exact{k}.parquet"
        argv = [export, "neighbors", "--queries", str(queries), "--exact", "-k", str(k), "--out", str(out)]
        if metric == "cos":
            assert analyze.main(argv) == 0
            assert pq.read_table(out)["id"].to_pylist() == expected
    index_build.build_index(data, "v", index_build.IndexSettings(metric=metric, **EXACT_SETTINGS))
    capsys.readouterr()
    for k in (1, 2, 5, 39):
        expected = sorted(tied)[:k]
        out = tmp_path / f"index{k}.parquet"
        assert (
            analyze.main([export, "neighbors", "--queries", str(queries), "-k", str(k), "--out", str(out)])
            == 0
        )
        assert pq.read_table(out)["id"].to_pylist() == expected
        assert analyze.main([export, "neighbors", "--id", "q", "-k", str(k)]) == 0
        listed = [
            line.split()[2] for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()
        ]
        assert listed == expected


def test_rows_pointing_the_same_way_tie_and_are_ranked_by_id_in_every_mode(tmp_path, capsys):
    """[c, c, 0, 0] for any c points exactly where the query [1, 1, 0, 0] does, but the float64 scans
    ranked such rows by the rounding of their arithmetic (1.0 against 0.9999999999999998), usearch by
    its float32 rounding, knn-score by float32 matrix products: four orders, none by id."""
    rng = np.random.default_rng(5)
    scales = [0.3, 3.0, 7.1, 1e-3, 3e38, 1e-30, 123.456, 0.77, 2.9, 5.1, 1e5, 0.013]
    same = [f"s{n:02d}" for n in rng.permutation(len(scales))]  # [c, c, 0, 0]: similarity 1
    half = [f"h{n:02d}" for n in rng.permutation(len(scales))]  # [c, 0, 0, 0]: similarity 1/sqrt(2)
    others = [f"o{n:02d}" for n in range(30)]
    vectors = [[1, 1, 0, 0], *([c, c, 0, 0] for c in scales), *([c, 0, 0, 0] for c in scales)]
    vectors += [[0, 0, *point] for point in rng.normal(size=(len(others), 2))]
    ids = ["q", *same, *half, *others]
    order = rng.permutation(len(ids))
    labels = ["ab"[i % 2] for i in range(len(ids))]
    columns = {
        "id": [ids[i] for i in order],
        "v": pa.array([vectors[i] for i in order], pa.list_(pa.float32(), 4)),
        "lab": [labels[i] for i in order],
    }
    export = write_export(str(tmp_path / "directions"), columns)
    queries = tmp_path / "q.txt"
    queries.write_text("q\n", encoding="utf-8")
    expected = sorted(same) + sorted(half)
    k = len(expected)

    def listed(argv):
        assert analyze.main([export, "neighbors", "--id", "q", "-k", str(k), *argv]) == 0
        lines = capsys.readouterr().out.splitlines()
        return [line.split()[2] for line in lines if line.strip()[:1].isdigit()]

    def batch(name, argv):
        out = tmp_path / name
        assert (
            analyze.main(
                [export, "neighbors", "--queries", str(queries), "-k", str(k), "--out", str(out), *argv]
            )
            == 0
        )
        capsys.readouterr()
        return pq.read_table(out).to_pylist()

    assert listed(["--exact"]) == expected
    answers = batch("exact.parquet", ["--exact"])
    assert [a["id"] for a in answers] == expected
    # Equal is shown equal: the file holds one similarity for all rows of a direction.
    assert {a["similarity"] for a in answers[: len(same)]} == {1.0}
    assert len({a["similarity"] for a in answers[len(same) :]}) == 1
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "5"]) == 0
    sampled = capsys.readouterr().out.splitlines()[1]
    assert analyze.main([export, "index", "--threads", "1", *_exact_flags()]) == 0
    capsys.readouterr()
    assert listed([]) == expected
    assert [a["id"] for a in batch("index.parquet", [])] == expected
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "5", "--all"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == sampled


def test_hundreds_of_duplicate_rows_are_ranked_by_id_through_the_index(tmp_path, capsys):
    """500 documents with one vector: HNSW's search reached about 300 of them and returned rows of lower
    similarity in place of the rest, so the tie looked over and the index listed other duplicates than
    the first by id (the exact scan's)."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(1000, 8)).astype(np.float32)
    vectors[:500] = vectors[0]
    ids = [f"d{i:04d}" for i in rng.permutation(1000)]
    export = write_export(
        str(tmp_path / "dups"), {"id": ids, "v": pa.array(list(vectors), pa.list_(pa.float32(), 8))}
    )
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(ids[:3]) + "\n", encoding="utf-8")
    expected = {query: sorted(set(ids[:500]) - {query})[:5] for query in ids[:3]}
    assert analyze.main([export, "index", "--threads", "1", "--recall_queries", "0"]) == 0
    capsys.readouterr()
    out = tmp_path / "a.parquet"
    assert analyze.main([export, "neighbors", "--queries", str(queries), "-k", "5", "--out", str(out)]) == 0
    capsys.readouterr()
    answers = pq.read_table(out).to_pylist()
    assert {query: [a["id"] for a in answers if a["query"] == query] for query in ids[:3]} == expected
    assert analyze.main([export, "neighbors", "--id", ids[0], "-k", "5"]) == 0
    listed = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert listed == expected[ids[0]]


def _duplicated_export(tmp_path, seed):
    """An export of 400 rows of 8-dim vectors, the first 300 one vector, under shuffled ids d0000-d0399
    and labels a/b (`lab`): (its directory, the ids by position, the vectors by position)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(400, 8)).astype(np.float32)
    vectors[:300] = vectors[0]
    ids = [f"d{i:04d}" for i in rng.permutation(400)]
    labels = ["ab"[i % 2] for i in range(400)]
    columns = {"id": ids, "v": pa.array(list(vectors), pa.list_(pa.float32(), 8)), "lab": labels}
    return write_export(str(tmp_path / "dups"), columns), ids, vectors


def test_a_tie_longer_than_the_widest_search_is_ranked_by_id_through_the_index(tmp_path, monkeypatch, capsys):
    """More duplicates than TIE_SEARCH_ROWS (4,096): the index listed the first of them in its own order,
    at similarity 1 like the rest, where --exact lists the first by id. A small cap stands for it here."""
    monkeypatch.setattr(index_search, "TIE_SEARCH_ROWS", 64)
    export, ids, vectors = _duplicated_export(tmp_path, seed=3)
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(ids[:3]) + "\n", encoding="utf-8")

    def answers(*flags):
        out = tmp_path / "a.parquet"
        argv = [export, "neighbors", "--queries", str(queries), "-k", "40", "--out", str(out), "--overwrite"]
        assert analyze.main([*argv, *flags]) == 0
        capsys.readouterr()
        return pq.read_table(out).select(["query", "id", "similarity"]).to_pylist()

    exact = answers("--exact")
    assert [a["id"] for a in exact[:40]] == sorted(set(ids[:300]) - {ids[0]})[:40]
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "40"]) == 0
    sampled = capsys.readouterr().out.splitlines()[1]
    # A complete graph: the 100 rows apart from the duplicates are all reached, as the sample finds them.
    assert analyze.main([export, "index", "--threads", "1", "--recall_queries", "0", *_exact_flags()]) == 0
    capsys.readouterr()
    assert answers() == exact
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "40", "--all"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == sampled


def _duplicates_export(directory, rows, duplicates, seed=0):
    """An export of `rows` random 8-dim vectors whose first `duplicates` are one vector, ids in no order."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(rows, 8)).astype(np.float32)
    vectors[:duplicates] = vectors[0]
    ids = [f"d{i:04d}" for i in rng.permutation(rows)]
    write_export(directory, {"id": ids, "v": pa.array(list(vectors), pa.list_(pa.float32(), 8))})
    return vectors, ids


def test_duplicates_go_into_the_graph_last_so_the_other_rows_are_found(tmp_path, capsys):
    """1,700 duplicate documents among 2,000 rows, default settings: inserted in export order they filled
    each other's links, and the other 300 rows' searches missed a fifth of their true neighbours (recall@10
    0.78 for them, the duplicates' own queries hiding it in the recall measured; 0.41 beside 4,500 of
    6,000). The rows of a vector seen before go in after all others."""
    rng = np.random.default_rng(6)
    vectors = rng.normal(size=(2000, 4)).astype(np.float32)
    vectors[:1700] = vectors[0]
    columns = {
        "id": [f"d{i:04d}" for i in range(2000)],
        "v": pa.array(list(vectors), pa.list_(pa.float32(), 4)),
    }
    export = write_export(str(tmp_path / "dups"), columns)
    assert analyze.main([export, "index", "--column", "v", "--threads", "1", "--recall_queries", "0"]) == 0
    capsys.readouterr()
    loaded = open_index(open_documents(export), "v")
    others = np.arange(1700, 2000)
    positions, _ = loaded.search(vectors[others], 10, exclude=[{int(p)} for p in others])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    found = 0
    for row, query in enumerate(others):
        similarities = unit @ unit[query]
        similarities[query] = -np.inf
        kth = np.sort(similarities)[-10]
        found += int((similarities[positions[row]] >= kth - 1e-6).sum())
    assert found / (10 * len(others)) > 0.99


def test_a_long_tie_above_the_kth_place_is_searched_whole_and_one_query_fits(tmp_path, capsys):
    """600 duplicates of 1,000 rows, -k 500: HNSW reached about 250 of them and went on with rows of
    similarity -0.5, the tie above the k-th looking whole; -k 998: the one query's search returned 534
    rows and the tie's wider answer did not fit in it (a ValueError traceback)."""
    export = str(tmp_path / "dups")
    _, ids = _duplicates_export(export, 1000, 600)
    assert analyze.main([export, "index", "--threads", "1", "--recall_queries", "0"]) == 0
    capsys.readouterr()

    def listed(*flags):
        assert analyze.main([export, "neighbors", "--id", ids[0], *flags]) == 0
        return [
            line.split()[2] for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()
        ]

    for k in ("998", "500"):
        assert listed("-k", k) == listed("-k", k, "--exact")
    assert listed("-k", "500") == sorted(set(ids[:600]) - {ids[0]})[:500]


def test_a_tie_at_the_kth_place_of_a_search_as_wide_as_the_cap_is_ranked_by_id(tmp_path, monkeypatch, capsys):
    """-k of 4,095 or more: the first search is already TIE_SEARCH_ROWS wide, so no wider one followed a
    tie running past its end, and the rows listed were usearch's choice of the tie. A cap of 8 stands for
    it here, with a tie of 20 rows (shorter than LONG_TIE_ROWS)."""
    monkeypatch.setattr(index_search, "TIE_SEARCH_ROWS", 8)
    export = str(tmp_path / "dups")
    vectors, ids = _duplicates_export(export, 200, 20, seed=4)
    assert analyze.main([export, "index", "--threads", "1", "--recall_queries", "0", *_exact_flags()]) == 0
    queries = tmp_path / "q.npy"
    np.save(queries, vectors[:1])
    out = tmp_path / "a.parquet"
    assert analyze.main([export, "neighbors", "--queries", str(queries), "-k", "10", "--out", str(out)]) == 0
    assert pq.read_table(out)["id"].to_pylist() == sorted(ids[:20])[:10]


@pytest.mark.parametrize("cap, duplicates", [(64, 300), (index_search.TIE_SEARCH_ROWS, 100)])
def test_the_queries_of_one_duplicated_vector_scan_its_long_tie_once(
    tmp_path, monkeypatch, capsys, cap, duplicates
):
    """Each query of a duplicated vector ran usearch's exhaustive search over every row: past
    TIE_SEARCH_ROWS before the tie cache was looked at, below it with no cache at all (100 duplicates'
    queries, 100 exhaustive searches; knn-score --all queries every one of them)."""
    monkeypatch.setattr(index_search, "TIE_SEARCH_ROWS", cap)
    export = str(tmp_path / "dups")
    _, ids = _duplicates_export(export, 400, duplicates)
    assert analyze.main([export, "index", "--threads", "1", "--recall_queries", "0"]) == 0
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(ids[:20]) + "\n", encoding="utf-8")
    exhaustive = []
    search = index_search.raw_search

    def counted(index, vectors, count, threads=0, exhaustive_search=False):
        exhaustive.append(exhaustive_search)
        return search(index, vectors, count, threads, exhaustive_search)

    monkeypatch.setattr(index_search, "raw_search", counted)
    out = tmp_path / "a.parquet"
    assert analyze.main([export, "neighbors", "--queries", str(queries), "-k", "5", "--out", str(out)]) == 0
    assert sum(exhaustive) == 1
    answers = pq.read_table(out).to_pylist()
    for query in ids[:20]:
        assert [a["id"] for a in answers if a["query"] == query] == sorted(set(ids[:duplicates]) - {query})[
            :5
        ]


def test_the_keys_that_break_ties_are_ordered_once_per_index(tmp_path, monkeypatch, capsys):
    """Every query of a long tie (duplicate documents) ranked all its tied rows by a Python sort of their
    ids, taken anew for each query: knn-score --all over 4,500 duplicates of 5,000 rows took a CPU
    minute, tens of thousands hours. The keys are put in order once per loaded index; the answers are
    still the exact scan's. A cap of 64 stands for TIE_SEARCH_ROWS, 300 duplicates for thousands."""
    monkeypatch.setattr(index_search, "TIE_SEARCH_ROWS", 64)
    export, ids, vectors = _duplicated_export(tmp_path, seed=5)
    assert analyze.main([export, "index", "--threads", "1", "--recall_queries", "0", *_exact_flags()]) == 0
    capsys.readouterr()
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "20"]) == 0
    sampled = capsys.readouterr().out.splitlines()[1]
    orderings = []
    key_order = index_search.key_order

    def counted(keys):
        orderings.append(len(keys))
        return key_order(keys)

    monkeypatch.setattr(index_search, "key_order", counted)
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "20", "--all"]) == 0
    assert capsys.readouterr().out.splitlines()[2] == sampled
    assert orderings == [400]
    data = open_documents(export)
    loaded = open_index(data, "v")
    positions, _ = loaded.search(vectors[:3], 20, exclude=[{0}, {1}, {2}])
    for row in range(3):
        assert [ids[p] for p in positions[row]] == sorted(set(ids[:300]) - {ids[row]})[:20]


def test_vectors_whose_squared_norm_overflows_float32_get_their_true_similarities(tmp_path, capsys):
    """Finite float32 values of 3e19: the batch scan and knn-score took the norms in float32, so the
    row scored 0 against every other (1.0 by the single-query scan and the index)."""
    columns = {
        "id": ["r_a", "r_big", "r_b", "r_b2", "r_neg"],
        "v": pa.array(
            [[1, 0, 0, 0], [3e19, 3e19, 0, 0], [1, 1, 0, 0], [2, 2, 0, 0], [-1, 0, 0, 0]],
            pa.list_(pa.float32(), 4),
        ),
    }
    export = write_export(str(tmp_path / "big"), columns)
    data = open_documents(export)
    queries = tmp_path / "q.txt"
    queries.write_text("r_b\nr_big\n", encoding="utf-8")
    out = tmp_path / "a.parquet"
    assert (
        analyze.main(
            [export, "neighbors", "--queries", str(queries), "--exact", "-k", "4", "--out", str(out)]
        )
        == 0
    )
    answers = pq.read_table(out).to_pylist()
    for query in ("r_b", "r_big"):
        single = find_neighbors(data, query, "v", 4)[0]
        batch = [a for a in answers if a["query"] == query]
        assert [a["id"] for a in batch] == [n.key for n in single]
        assert [a["similarity"] for a in batch] == pytest.approx([n.similarity for n in single], abs=1e-6)
    assert [a["similarity"] for a in answers[:2]] == pytest.approx([1.0, 1.0])
    # A query vector of 1e30 (float32, finite): the rows in its direction, not the first rows by position.
    vector_queries = tmp_path / "q.npy"
    np.save(vector_queries, np.asarray([[1e30, 1e30, 0, 0]], dtype=np.float32))
    out = tmp_path / "b.parquet"
    assert (
        analyze.main([export, "neighbors", "--queries", str(vector_queries), "-k", "3", "--out", str(out)])
        == 0
    )
    answer = pq.read_table(out)
    assert sorted(answer["id"].to_pylist()) == ["r_b", "r_b2", "r_big"]
    assert answer["similarity"].to_pylist() == pytest.approx([1.0, 1.0, 1.0])
    # knn-score: the big row's nearest is the row in its direction; the b rows come first, so an
    # all-zero row would take them.
    vectors = np.asarray([[1, -0.5, 1, 0], [1, -0.5, 1.1, 0], [3e19, 3e19, 0, 0], [1, 1, 0, 0]], np.float32)
    score = score_label_agreement(vectors, ["b", "b", "a", "a"], k=1)
    assert score.agreement == 1.0


def test_kept_fields_named_field_dot_an_answer_column_keep_both_columns(tmp_path, capsys):
    """Kept `query` and `field.query`: the renamed `query` took `field.query`'s name, and one was lost."""
    rows = 12
    rng = np.random.default_rng(4)
    columns = {
        "id": [f"d{i}" for i in range(rows)],
        "v": pa.array(list(rng.normal(size=(rows, 4))), pa.list_(pa.float32(), 4)),
        "query": [f"search {i}" for i in range(rows)],
        "field.query": [f"kept {i}" for i in range(rows)],
        "field.field.query": [f"more {i}" for i in range(rows)],
    }
    export = write_export(str(tmp_path / "log"), columns)
    queries = tmp_path / "q.txt"
    queries.write_text("d1\n", encoding="utf-8")
    out = tmp_path / "a.parquet"
    assert analyze.main([export, "neighbors", "--queries", str(queries), "-k", "3", "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert table.column_names == [
        "query",
        "rank",
        "id",
        "similarity",
        "field.field.field.query",
        "field.query",
        "field.field.query",
        "problem",
    ]
    for answer in table.to_pylist():
        number = int(answer["id"][1:])
        assert answer["query"] == "d1"
        assert answer["field.field.field.query"] == f"search {number}"
        assert answer["field.query"] == f"kept {number}" and answer["field.field.query"] == f"more {number}"


def test_batch_answers_through_an_index_that_cannot_reach_every_row_say_so(tmp_path, capsys):
    """Single mode said "The index found 11 of the 50"; batch mode wrote short lists silently, and counted
    a query with no neighbour as answered."""
    rng = np.random.default_rng(0)
    rows = 400
    vectors = rng.normal(size=(rows, 8)) * np.exp(rng.normal(scale=3, size=(rows, 1)))
    columns = {
        "id": [f"d{i:04d}" for i in range(rows)],
        "v": pa.array(list(vectors), pa.list_(pa.float32(), 8)),
    }
    export = write_export(str(tmp_path / "norms"), columns)
    poor = ["--metric", "ip", "--connectivity", "2", "--expansion_add", "1", "--expansion_search", "1"]
    assert analyze.main([export, "index", *poor, "--threads", "1", "--recall_queries", "0"]) == 0
    queries = tmp_path / "q.txt"
    queries.write_text("".join(f"d{i:04d}\n" for i in range(0, rows, 10)), encoding="utf-8")
    out = tmp_path / "a.parquet"
    capsys.readouterr()
    k = 50
    assert (
        analyze.main([export, "neighbors", "--queries", str(queries), "-k", str(k), "--out", str(out)]) == 0
    )
    summary = capsys.readouterr().out
    answers = pq.read_table(out).to_pandas()
    found = answers.groupby("query")["rank"].count()
    short = found[found < k]
    assert len(short) > 0  # the graph leaves rows out: what this test is about
    assert f"{len(found)} queries, 0 of them unanswered, {len(short)} answered with fewer" in summary
    for query, count in short.items():
        problems = answers[answers["query"] == query]["problem"]
        assert (
            problems == f"the index found {count} of the {k} neighbours asked for; --exact finds them all "
            "(or rebuild it with higher --connectivity / --expansion_search)"
        ).all()
    assert answers[answers["query"].isin(found[found == k].index)]["problem"].isna().all()
    # The same query alone says the same.
    first_short = short.index[0]
    assert analyze.main([export, "neighbors", "--id", first_short, "-k", str(k)]) == 0
    assert f"The index found {short.iloc[0]} of the {k} neighbours asked for" in capsys.readouterr().out


def test_a_query_with_no_neighbour_is_counted_unanswered(tmp_path, capsys):
    columns = {
        "id": ["only", "null", "nan"],
        "v": pa.array([[1.0, 2.0], None, [float("nan"), 1.0]], pa.list_(pa.float32())),
    }
    export = write_export(str(tmp_path / "one"), columns)
    queries = tmp_path / "q.txt"
    queries.write_text("only\n", encoding="utf-8")
    out = tmp_path / "a.parquet"
    assert analyze.main([export, "neighbors", "--queries", str(queries), "--out", str(out)]) == 0
    assert "1 queries, 1 of them unanswered" in capsys.readouterr().out
    assert pq.read_table(out)["problem"].to_pylist() == ["no neighbours"]


@pytest.mark.parametrize(
    "metadata, problem",
    [
        ([], "it holds a JSON list, not an object"),
        ("an index", "it holds a JSON str, not an object"),
        ({"format": "usearch"}, "it lacks bytes, column, dim"),
        ("metric", "its metric 'euclid' is not one of cos, ip, l2"),
        ("recall", "its recall have the wrong type"),
    ],
)
def test_index_metadata_that_is_json_but_not_metadata_is_one_error_line(
    export_copy, capsys, metadata, problem
):
    """`[]` as _index/COLUMN.json ended neighbors and knn-score --all with an AttributeError traceback."""
    assert analyze.main([export_copy, "index", "--column", COLUMN, "--recall_queries", "0"]) == 0
    path = os.path.join(export_copy, "_index", f"{COLUMN}.json")
    if metadata in ("metric", "recall"):
        with open(path, encoding="utf-8") as handle:
            real = json.load(handle)
        metadata = dict(real, metric="euclid") if metadata == "metric" else dict(real, recall=[0.9])
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(metadata, handle)
    key = pq.read_table(os.path.join(export_copy, SHARD))["id"][0].as_py()
    capsys.readouterr()
    for argv in (["neighbors", "--id", key], ["knn-score", "--label", "topic", "--all", "-k", "2"]):
        assert analyze.main([export_copy, *argv]) == 2
        err = error_line(capsys)
        assert f"is not an index's metadata ({problem}" in err, err
        assert f"index --column {COLUMN}" in err and "--exact" in err and err.count("\n") == 1


def test_batch_queries_on_a_damaged_or_unfinished_export_say_what_is_wrong(
    export_copy, ids_file, tmp_path, capsys
):
    """--queries said the export "holds no vocabulary.parquet" where --id says its row file is lost."""
    out = str(tmp_path / "a.parquet")
    os.remove(os.path.join(export_copy, SHARD))
    for argv in (["--id", "x"], ["--queries", ids_file, "--out", out]):
        assert analyze.main([export_copy, "neighbors", *argv]) == 2
        err = error_line(capsys)
        assert SHARD in err and "vocabulary" not in err, err
    os.remove(os.path.join(export_copy, MANIFEST))
    os.makedirs(os.path.join(export_copy, "_staging", "0123456789ab"))
    assert analyze.main([export_copy, "neighbors", "--queries", ids_file, "--out", out]) == 2
    err = error_line(capsys)
    assert "rerun the same command to finish it" in err and "vocabulary" not in err, err
    assert not os.path.exists(out)


def test_knn_score_all_advises_a_flag_it_has(export_copy, capsys):
    """knn-score --all advised "--exact scans every row instead"; knn-score has no --exact."""
    assert analyze.main([export_copy, "index", "--column", COLUMN, "--recall_queries", "0"]) == 0
    capsys.readouterr()
    assert analyze.main([export_copy, "knn-score", "--label", "topic", "--all", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "leave --all out to score a sample instead" in out and "--exact" not in out
    key = pq.read_table(os.path.join(export_copy, SHARD))["id"][0].as_py()
    assert analyze.main([export_copy, "neighbors", "--id", key]) == 0
    assert "--exact scans every row instead" in capsys.readouterr().out


# --- round 34: reads racing a commit, ties in knn-score, token tables, messages ----------------------


def write_shards(directory, columns, shards):
    """A finished export of `shards` row files; its manifest lists each with its size, as a run's does."""
    os.makedirs(directory)
    table = pa.table(columns)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    listed = []
    for number in range(shards):
        name = f"part-{number:05d}-of-{shards:05d}.parquet"
        pq.write_table(
            table.slice(bounds[number], bounds[number + 1] - bounds[number]), f"{directory}/{name}"
        )
        listed.append({"file": name, "bytes": os.path.getsize(f"{directory}/{name}")})
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump({"rows_written": table.num_rows, "shards": {"rows": listed}}, handle)
    return directory


def random_columns(rows, seed=0, dim=4):
    rng = np.random.default_rng(seed)
    return {
        "id": [f"d{i:03d}" for i in range(rows)],
        "v": pa.array(list(rng.normal(size=(rows, dim))), pa.list_(pa.float32(), dim)),
        "lab": (["a", "b", "c"] * rows)[:rows],
    }


@pytest.mark.parametrize(
    "argv", [["neighbors", "--id", "d001", "-k", "3"], ["knn-score", "--label", "lab", "-k", "2"]]
)
def test_a_row_file_a_commit_deletes_while_it_is_read_is_one_error_line(tmp_path, monkeypatch, capsys, argv):
    """An --overwrite committing a new export of fewer shards deletes the old second shard: the scan
    reaching it ended in a FileNotFoundError traceback."""
    export = write_shards(str(tmp_path / "e"), random_columns(40), shards=2)
    real = analyze.check_vector_column

    def committed_meanwhile(data, column):
        os.remove(os.path.join(export, MANIFEST))
        os.remove(os.path.join(export, "part-00001-of-00002.parquet"))
        return real(data, column)

    monkeypatch.setattr(analyze, "check_vector_column", committed_meanwhile)
    assert analyze.main([export, *argv]) == 2
    err = error_line(capsys)
    assert "changed while it was read" in err and err.count("\n") == 1, err


def test_a_commit_that_begins_while_the_files_are_listed_is_not_read_half_done(tmp_path, monkeypatch, capsys):
    """The pending-commit look came before the listing: a run's commit point right after it left the
    listing half old, half new export, read with a "did not finish" warning and exit 0."""
    from pipeline.analysis import dataset
    from pipeline.writing.lock import OutputLock

    export = write_shards(str(tmp_path / "e"), random_columns(40, seed=0), shards=2)
    new = write_shards(str(tmp_path / "new"), random_columns(40, seed=1), shards=2)
    real = dataset._finish_commit
    looked = []

    def commit_point_just_after(location):
        real(location)
        if not looked:
            looked.append(location)
            # The live run's commit: its journal (the commit point), the old manifest gone, a shard renamed.
            journal = {"run": "0123456789ab", "manifest": "_staging/0123456789ab/_MANIFEST.json"}
            with open(os.path.join(export, "_COMMIT.json"), "w", encoding="utf-8") as handle:
                json.dump({**journal, "delete": [], "directories": [], "renames": []}, handle)
            os.remove(os.path.join(export, MANIFEST))
            shutil.copy(os.path.join(new, "part-00000-of-00002.parquet"), export)

    monkeypatch.setattr(dataset, "_finish_commit", commit_point_just_after)
    with OutputLock(export):  # the committing run holds its output
        assert analyze.main([export, "neighbors", "--id", "d001", "-k", "3"]) == 2
    err = error_line(capsys)
    # A live run commits now: nothing to rerun elsewhere, nor an --output to choose (analyze has none).
    assert "is being committed by run" in err and "wait for that run to finish" in err, err
    assert "--output" not in err and "writable" not in err, err


def test_knn_score_breaks_ties_by_id_in_the_sample_as_through_the_index(tmp_path, capsys):
    """Duplicate documents (equal vectors, other labels): the sampled score took the tied neighbours in
    argpartition's order, --all by id, and the two printed different agreements."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 4))
    rows = 36
    ids = [f"d{(i * 7) % rows:02d}" for i in range(rows)]
    labels = ["ab"[(i // 6) % 2] if i % 3 else "c" for i in range(rows)]
    vectors = np.asarray([base[i % 6] for i in range(rows)], np.float32)
    columns = {"id": ids, "v": pa.array(list(vectors), pa.list_(pa.float32(), 4)), "lab": labels}
    export = write_export(str(tmp_path / "dups"), columns)
    # The oracle: each row's 3 nearest others by cosine, equal similarities by id.
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    hits = []
    for i in range(rows):
        others = sorted((j for j in range(rows) if j != i), key=lambda j: (-similarity[i, j], ids[j]))[:3]
        hits.append(np.mean([labels[j] == labels[i] for j in others]))
    expected = f"agreement  {np.mean(hits):.4f}"
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "3"]) == 0
    assert expected in capsys.readouterr().out
    assert analyze.main([export, "index", "--threads", "1", *_exact_flags()]) == 0
    capsys.readouterr()
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "3", "--all"]) == 0
    assert expected in capsys.readouterr().out


def _exact_flags():
    return [f"--{name}={value}" for name, value in EXACT_SETTINGS.items()]


def _ids_export(directory, pooled):
    """An export of token ids (--token_storage ids) and its table; with `pooled`, a vector column too."""
    rng = np.random.default_rng(0)
    columns = {
        "id": [f"d{i}" for i in range(6)],
        "emb": pa.array([[2, 3], [4], [5, 6, 7], [2], [3], [4, 5]], pa.list_(pa.int32())),
    }
    if pooled:
        columns["lstm_content"] = pa.array(list(rng.normal(size=(6, 4))), pa.list_(pa.float32(), 4))
    write_export(directory, columns)
    os.makedirs(os.path.join(directory, "_tables"))
    words = ["<pad>", "<oov>", "thread", "queue", "socket", "file", "path", "lock", "pipe", "fork"]
    table = {
        "token_id": pa.array(range(len(words)), pa.int32()),
        "token": words,
        "vector": pa.array(list(rng.normal(size=(len(words), 3))), pa.list_(pa.float32(), 3)),
    }
    pq.write_table(pa.table(table), os.path.join(directory, "_tables", "emb.parquet"))
    return directory


@pytest.mark.parametrize("pooled", [False, True], ids=["ids_only", "with_pooled_column"])
def test_the_token_table_of_an_export_of_ids_is_indexed_and_batch_queried_by_word(tmp_path, capsys, pooled):
    """The table could not be indexed ("is a file; pass the directory it is in", then "holds no part-*
    files"), and with a pooled column beside the ids, batch queries took every word for a document id."""
    export = _ids_export(str(tmp_path / "ids"), pooled)
    table_flag = ["--column", "vector"] if pooled else []
    assert analyze.main([export, "index", *table_flag, "--recall_queries", "0"]) == 0
    assert "rows of vector" in capsys.readouterr().out
    expected = [n.key for n in find_neighbors(open_vocabulary(export), "thread", "vector", 3)[0]]
    assert analyze.main([export, "neighbors", "--word", "thread", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "Using the index" in out and [line.split()[2] for line in out.splitlines()[2:5]] == expected
    words = tmp_path / "words.txt"
    words.write_text("thread\n", encoding="utf-8")
    answers = str(tmp_path / "a.parquet")
    argv = [export, "neighbors", "--queries", str(words), *table_flag, "-k", "3", "--out", answers]
    assert analyze.main(argv) == 0
    assert pq.read_table(answers)["token"].to_pylist() == expected
    # The table file itself names where its index lives: the export's directory.
    assert analyze.main([os.path.join(export, "_tables", "emb.parquet"), "index"]) == 2
    assert error_line(capsys).rstrip().endswith(f"where the index can live: {export}")


def test_without_a_column_an_export_of_per_token_vectors_or_ids_says_what_it_holds(tmp_path, capsys):
    """Without --column the only words were "has no vector column (a list of floats per row)"."""
    per_token = write_export(
        str(tmp_path / "tokens"),
        {
            "id": ["a", "b"],
            "emb": pa.array([[[1, 2, 3], [4, 5, 6]], [[1, 0, 0]]], pa.list_(pa.list_(pa.float32()))),
        },
    )
    for argv in (["neighbors", "--id", "a"], ["knn-score", "--label", "x"], ["index"]):
        assert analyze.main([per_token, *argv]) == 2
        err = error_line(capsys)
        assert (
            "'emb' holds one vector per token (exported with --pooling none)" in err
            and "--pooling mean" in err
        )
    ids = _ids_export(str(tmp_path / "ids"), pooled=False)
    assert analyze.main([ids, "neighbors", "--id", "d1"]) == 2
    err = error_line(capsys)
    assert "token ids (exported with --token_storage ids)" in err and "neighbors --word WORD" in err


def test_knn_score_all_names_the_metric_of_an_index_that_is_not_cosine(tmp_path, capsys):
    export = write_export(str(tmp_path / "e"), random_columns(30))
    assert analyze.main([export, "index", "--metric", "l2", "--recall_queries", "0"]) == 0
    capsys.readouterr()
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "2", "--all"]) == 0
    assert "3 classes, neighbours by the index's L2 distance)" in capsys.readouterr().out


def test_an_index_of_one_row_claims_no_recall(tmp_path, capsys):
    """One usable row: no query had a neighbour, yet "recall@1 1.0000" was reported and stored."""
    columns = {"id": ["only", "null"], "v": pa.array([[1.0, 2.0], None], pa.list_(pa.float32()))}
    export = write_export(str(tmp_path / "one"), columns)
    assert analyze.main([export, "index"]) == 0
    assert "recall not measured (one row: no neighbours to find)" in capsys.readouterr().out
    with open(os.path.join(export, "_index", "v.json"), encoding="utf-8") as handle:
        assert json.load(handle)["recall"]["recall"] is None


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_the_recall_of_an_l2_or_ip_index_does_not_depend_on_the_vectors_scale(tmp_path, metric):
    """A found row counted as right within an absolute 1e-5 of the k-th exact score: with vectors of 1e-4
    every score is below that, so a graph that finds 6 % of the neighbours measured recall 0.95; and
    duplicates of 1e5 measured a perfect index below 1 (the exact L2's rounding, 1e-14 |q|^2, beat 1e-5)."""
    base = np.random.default_rng(0).normal(size=(1000, 16))
    poor = index_build.IndexSettings(
        metric=metric, connectivity=2, expansion_add=1, expansion_search=1, recall_queries=100, threads=1
    )
    recalls = []
    for scale in (1.0, 1e-4):
        vectors = pa.array(list(base * scale), pa.list_(pa.float32(), 16))
        export = write_export(
            str(tmp_path / f"x{scale}"), {"id": [f"d{i}" for i in range(1000)], "v": vectors}
        )
        recalls.append(index_build.build_index(open_documents(export), "v", poor)["recall"]["recall"])
    assert recalls[0] < 0.5 and recalls[1] == pytest.approx(recalls[0], abs=0.02)
    duplicates = np.repeat(np.random.default_rng(1).normal(size=(50, 16)) * 1e5, 12, axis=0)
    columns = {
        "id": [f"d{i:04d}" for i in range(600)],
        "v": pa.array(list(duplicates), pa.list_(pa.float32(), 16)),
    }
    export = write_export(str(tmp_path / "duplicates"), columns)
    settings = index_build.IndexSettings(metric=metric, recall_queries=200, threads=1)
    assert index_build.build_index(open_documents(export), "v", settings)["recall"]["recall"] == 1.0


def test_large_string_labels_and_kept_fields_are_labels(tmp_path, capsys):
    """pandas' and polars' Arrow strings are large_string: "has no label column 'lab'"."""
    columns = random_columns(20)
    columns = {
        name: pa.array(values, pa.large_string()) if name != "v" else values
        for name, values in columns.items()
    }
    export = write_export(str(tmp_path / "large"), columns)
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "2"]) == 0
    assert "kNN label agreement of v on lab" in capsys.readouterr().out
    assert analyze.main([export, "neighbors", "--id", "d001", "-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["rank", "similarity", "id", "lab"]


def test_dictionary_encoded_labels_and_kept_fields_are_labels(tmp_path, capsys):
    """A pandas `category` column written to Parquet is dictionary-encoded strings: plot and knn-score
    said "has no label column 'lab' ... export with --keep_fields", and neighbors did not show it."""
    plain, categorical = random_columns(30), random_columns(30)
    categorical["lab"] = pa.array(categorical["lab"]).dictionary_encode()
    queries = tmp_path / "q.txt"
    queries.write_text("d001\nd002\n", encoding="utf-8")
    answers = []
    for name, columns in (("plain", plain), ("categorical", categorical)):
        export = write_shards(str(tmp_path / name), columns, 2)
        out = tmp_path / f"{name}.parquet"
        for argv in (
            ["knn-score", "--label", "lab", "-k", "2"],
            ["plot", "--label", "lab", "--out", str(tmp_path / f"{name}.png")],
            ["neighbors", "--id", "d001", "-k", "3"],
            ["index", "--threads", "1", "--recall_queries", "0"],
            ["knn-score", "--label", "lab", "-k", "2", "--all"],
            ["neighbors", "--queries", str(queries), "-k", "2", "--out", str(out)],
        ):
            assert analyze.main([export, *argv]) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out.replace(export, "EXPORT").splitlines()
        # The build's lines name the index's SHA-256 and sizes, which the encoding changes.
        kept = [line for line in printed if "sha256" not in line and "MiB" not in line]
        answers.append((kept, pq.read_table(out).to_pylist()))
    assert answers[1] == answers[0]


def test_a_null_query_id_is_a_problem_and_complex_query_vectors_are_refused(tmp_path, capsys):
    """A null id of a .parquet queries file became the id 'None' (a document of that id answered it);
    complex vectors lost their imaginary parts with a numpy warning."""
    columns = random_columns(4)
    columns["id"] = ["None", "d1", "d2", "d3"]
    export = write_export(str(tmp_path / "e"), columns)
    queries = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": pa.array([None, "d1"], pa.string())}), queries)
    out = tmp_path / "a.parquet"
    assert analyze.main([export, "neighbors", "--queries", str(queries), "-k", "1", "--out", str(out)]) == 0
    null, answered = pq.read_table(out).to_pylist()
    assert null == {
        "query": None,
        "rank": None,
        "id": None,
        "similarity": None,
        "lab": None,
        "problem": "its id is null",
    }
    assert answered["query"] == "d1" and answered["problem"] is None
    complex_queries = tmp_path / "c.npy"
    np.save(complex_queries, np.asarray([[1 + 5j, 0, 0, 0]], np.complex64))
    argv = [export, "neighbors", "--queries", str(complex_queries), "--out", str(tmp_path / "b.parquet")]
    assert analyze.main(argv) == 2
    assert "holds complex64 values" in error_line(capsys)


# --- r35: the index's files, zero vectors, query files ---------------------------------------------


@pytest.mark.parametrize("name", ["v.usearch", "v.json", "v.json.tmp"])
def test_an_index_build_never_replaces_a_file_of_the_users_under_index(tmp_path, capsys, name):
    """The build deleted _index/v.json and renamed its file over _index/v.usearch, whatever they were:
    a user's own index (which the docs call foreign, never deleted) was lost without a word."""
    export = write_export(str(tmp_path / "e"), random_columns(20))
    os.makedirs(os.path.join(export, "_index"))
    mine = os.path.join(export, "_index", name)
    with open(mine, "w", encoding="utf-8") as handle:
        handle.write('{"my": "own index notes"}')
    assert analyze.main([export, "index", "--column", "v", "--recall_queries", "0"]) == 2
    assert f"{mine} is not an index this command built" in error_line(capsys)
    with open(mine, encoding="utf-8") as handle:
        assert handle.read() == '{"my": "own index notes"}'
    assert sorted(os.listdir(os.path.join(export, "_index"))) == [name]
    # Once it is moved away the index is built, and built again over its own files.
    os.remove(mine)
    for _ in range(2):
        assert analyze.main([export, "index", "--column", "v", "--recall_queries", "0"]) == 0
    assert sorted(os.listdir(os.path.join(export, "_index"))) == ["v.json", "v.usearch"]


@pytest.mark.parametrize("mode", ["exact", "index"])
def test_a_null_query_word_is_not_a_vocabulary_row_without_a_token(tmp_path, capsys, mode):
    """pyarrow's index_in matches null to null: a null word of a .parquet queries file was answered as
    the vocabulary's first row past its tokenizer (null token), or, through the index, said to have
    a null vector."""
    rng = np.random.default_rng(0)
    tokens = ["<pad>", "<oov>", "w2", "w3", "w4", "w5", None, None]
    table = pa.table(
        {
            "token_id": pa.array(range(len(tokens)), pa.int32()),
            "token": pa.array(tokens, pa.string()),
            "vector": pa.array(list(rng.normal(size=(len(tokens), 4))), pa.list_(pa.float32(), 4)),
        }
    )
    os.makedirs(tmp_path / "voc")
    pq.write_table(table, tmp_path / "voc" / vocabulary.VOCABULARY_FILE)
    if mode == "index":
        assert analyze.main([str(tmp_path / "voc"), "index", "--recall_queries", "0"]) == 0
    queries = tmp_path / "q.parquet"
    pq.write_table(pa.table({"token": pa.array(["w2", None], pa.string())}), queries)
    out = tmp_path / "a.parquet"
    argv = [str(tmp_path / "voc"), "neighbors", "--queries", str(queries), "-k", "2", "--out", str(out)]
    assert analyze.main(argv) == 0
    rows = pq.read_table(out).to_pylist()
    assert [row["query"] for row in rows] == ["w2", "w2", None]
    assert rows[-1]["problem"] == "its id is null" and rows[-1]["token"] is None


def test_knn_score_all_gives_zero_vectors_similarity_zero_as_the_sample_does(tmp_path):
    """usearch's cosine distance of two zero vectors is 0: through the index a zero row's nearest were
    the other zero rows, where the sample (and the exact scan) rank every row at 0, ties by id."""
    rng = np.random.default_rng(3)
    rows = 60
    vectors = rng.normal(size=(rows, 3)).astype(np.float32)
    vectors[20:26] = 0
    ids = [f"d{(i * 7) % rows:02d}" for i in range(rows)]
    labels = [["a", "b", "c"][i % 3] for i in range(rows)]
    columns = {"id": ids, "v": pa.array(list(vectors), pa.list_(pa.float32(), 3)), "lab": labels}
    data = open_documents(write_export(str(tmp_path / "e"), columns))
    index_build.build_index(data, "v", index_build.IndexSettings(**EXACT_SETTINGS))
    loaded = open_index(data, "v")
    # The brute force: every zero row's neighbours are the first other rows by id.
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1), 1e-30)[:, None]
    for k in (1, 3):
        hits = []
        for i in range(rows):
            others = sorted((j for j in range(rows) if j != i), key=lambda j: (-(unit[i] @ unit[j]), ids[j]))
            hits.append(np.mean([labels[j] == labels[i] for j in others[:k]]))
        sampled, _ = knn_score(data, "v", "lab", k=k, sample=rows)
        indexed = knn_score_indexed(data, loaded, "lab", k=k)
        assert sampled.agreement == pytest.approx(np.mean(hits), abs=1e-12)
        assert indexed.agreement == pytest.approx(np.mean(hits), abs=1e-12)
    positions, scores = loaded.search(np.zeros((1, 3), np.float32), 3, exclude=[{ids.index("d00")}])
    assert [ids[p] for p in positions[0]] == ["d01", "d02", "d03"] and scores[0].tolist() == [0.0] * 3


def test_an_npz_archive_as_queries_is_one_error_line(tmp_path, capsys):
    """np.load reads an .npz archive whatever its name: asking it for .dtype was a traceback."""
    export = write_export(str(tmp_path / "e"), random_columns(10))
    np.savez(tmp_path / "q.npz", vectors=np.ones((2, 4)))
    os.replace(tmp_path / "q.npz", tmp_path / "q.npy")
    argv = [export, "neighbors", "--queries", str(tmp_path / "q.npy"), "--out", str(tmp_path / "a.parquet")]
    assert analyze.main(argv) == 2
    assert "is an .npz archive of arrays, not one array" in error_line(capsys)


def test_an_empty_queries_file_of_vectors_is_an_empty_answer(tmp_path, capsys):
    """A .parquet of query vectors with no row (a filter that matched nothing) was refused as holding
    "0-dim vectors; 'v' has 4", where an empty .npy or .txt is an answer of 0 queries."""
    columns = {"id": ["a", "b"], "v": pa.array([[1, 0, 0, 0], [0, 1, 0, 0]], pa.list_(pa.float32(), 4))}
    export = write_export(str(tmp_path / "export"), columns)
    queries = tmp_path / "q.parquet"
    pq.write_table(pa.table({"v": pa.array([], pa.list_(pa.float32()))}), queries)
    out = tmp_path / "a.parquet"
    assert analyze.main([export, "neighbors", "--queries", str(queries), "--out", str(out)]) == 0
    assert "0 queries" in capsys.readouterr().out
    assert pq.read_table(out).num_rows == 0


def test_a_batch_out_that_is_the_queries_file_is_refused_and_the_queries_kept(tmp_path, capsys):
    """`--queries q.parquet --out q.parquet` said "already exists; pass --overwrite", and with it the
    answer replaced the user's queries file; the same file through a link too."""
    export = write_export(str(tmp_path / "e"), random_columns(10))
    queries = tmp_path / "q.parquet"
    pq.write_table(pa.table({"id": ["d001", "d002"]}), queries)
    before = queries.read_bytes()
    (tmp_path / "link.parquet").symlink_to(queries)
    for out, flags in ((queries, []), (queries, ["--overwrite"]), (f"file://{queries}", ["--overwrite"])):
        argv = [export, "neighbors", "--queries", str(tmp_path / "link.parquet"), "--out", str(out), *flags]
        assert analyze.main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "is the --queries file" in err[0], err
    assert queries.read_bytes() == before


def test_a_batch_query_skips_every_row_of_its_own_id(tmp_path, capsys):
    """Batch mode excluded only the first row of a query's id: a second row of that id (another tool's
    export) was the query's own nearest neighbour, through the index and by the exact scan, where
    `neighbors --id` skips every row of the id."""
    columns = random_columns(30)
    vectors = np.stack(columns["v"].to_numpy(zero_copy_only=False))
    columns["id"][20] = "d010"
    vectors[20] = vectors[10] + 0.01  # the nearest row to d010's first row, of the same id
    columns["v"] = pa.array(list(vectors), pa.list_(pa.float32(), 4))
    export = write_export(str(tmp_path / "e"), columns)
    queries = tmp_path / "q.txt"
    queries.write_text("d010\nd011\n", encoding="utf-8")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = {}
    for query, first in (("d010", 10), ("d011", 11)):
        similarities = unit @ unit[first]
        similarities[[i for i, key in enumerate(columns["id"]) if key == query]] = -np.inf
        expected[query] = [columns["id"][i] for i in np.argsort(-similarities)[:5]]
    for label, flags in (("exact", ["--exact"]), ("index", [])):
        if label == "index":
            assert analyze.main([export, "index", "--column", "v"]) == 0
        out = tmp_path / f"{label}.parquet"
        argv = [export, "neighbors", "--queries", str(queries), "--column", "v", "-k", "5", "--out", str(out)]
        assert analyze.main([*argv, *flags]) == 0, capsys.readouterr().err
        answer = pq.read_table(out).to_pylist()
        assert not [row for row in answer if row["problem"]], answer
        for query in ("d010", "d011"):
            found = [row["id"] for row in answer if row["query"] == query]
            assert found == expected[query], (label, query, found)
        single = find_neighbors(open_documents(export), "d010", "v", 5)[0]
        assert [n.key for n in single] == expected["d010"]


def test_the_temporary_file_of_a_killed_answer_is_removed_by_the_next_one(tmp_path, capsys):
    """An answer killed while written (SIGKILL, the OOM killer) left its `.NAME.XXXXXXXX.tmp` beside --out
    for good, one more per kill. The next answer to that --out removes the ones nobody holds; one a live
    command holds (its flock), and a user's file of another name, stay."""
    import fcntl

    export = write_export(str(tmp_path / "e"), random_columns(10))
    queries = tmp_path / "q.txt"
    queries.write_text("d001\n", encoding="utf-8")
    answers = tmp_path / "answers"
    answers.mkdir()
    dead, live, users = (
        answers / name
        for name in (".a.parquet.k1ll3d_x.tmp", ".a.parquet.w0rk1ng_.tmp", ".a.parquet.notes.tmp")
    )
    for path in (dead, live, users):
        path.write_bytes(b"PAR1 half an answer")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        argv = [export, "neighbors", "--queries", str(queries), "--out", str(answers / "a.parquet")]
        assert analyze.main(argv) == 0, capsys.readouterr().err
    assert sorted(os.listdir(answers)) == sorted([live.name, users.name, "a.parquet"])
    assert pq.read_table(answers / "a.parquet").num_rows == 9


@pytest.mark.parametrize("flag", ["--id", "--word"])
def test_a_key_that_is_not_utf8_is_one_error_line(tmp_path, capsys, flag):
    """`--id $'caf\\xe9'` from a Latin-1 terminal reaches Python as a lone surrogate: pyarrow's comparison
    with the ids was a traceback (TypeError by the scan, UnicodeEncodeError by --exact)."""
    export = write_export(str(tmp_path / "e"), random_columns(10))
    for flags in ([], ["--exact"]):
        assert analyze.main([export, "neighbors", flag, "caf\udce9", *flags]) == 2
        err = error_line(capsys)
        assert f"{flag} b'caf\\xe9' is not UTF-8 text" in err and "LANG=C.UTF-8" in err, err


def test_a_per_token_column_with_no_pooled_one_beside_it_says_so(tmp_path, capsys):
    """--column of a --pooling none (or token ids) column of an export with no pooled column said "Pick
    a pooled column (none)" (or "pick a vector column (none)"): a choice of nothing."""
    per_token = pa.array([[[1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]], pa.list_(pa.list_(pa.float32(), 2)))
    token_ids = pa.array([[2, 3], [4]], pa.list_(pa.int32()))
    export = write_export(str(tmp_path / "e"), {"id": ["a", "b"], "emb": per_token, "ids": token_ids})
    for column, said in (
        ("emb", "The export has no pooled column: re-export it"),
        ("ids", "this directory, or"),
    ):
        assert analyze.main([export, "neighbors", "--id", "a", "--column", column]) == 2
        err = error_line(capsys)
        assert said in err and "(none)" not in err, err


def test_an_out_that_is_the_data_read_is_refused_and_the_rows_kept(tmp_path, capsys):
    """OUTPUT_DIR as one .parquet file, or a directory of row files without a manifest (no marker of an
    export): `--out` naming that file said "already exists; pass --overwrite", and with it the answer
    replaced the rows it was computed from; a plot inside such a directory was written there too."""
    single = tmp_path / "vectors.parquet"
    pq.write_table(pa.table(random_columns(10)), single)
    unfinished = write_export(str(tmp_path / "unfinished"), random_columns(10), manifest=False)
    part = os.path.join(unfinished, SHARD)
    queries = tmp_path / "q.txt"
    queries.write_text("d001\n", encoding="utf-8")
    before = {path: sha256(path) for path in (str(single), part)}
    cases = [
        [str(single), "neighbors", "--queries", str(queries), "--out", str(single)],
        [unfinished, "neighbors", "--queries", str(queries), "--out", part],
        [unfinished, "neighbors", "--queries", str(queries), "--out", f"file://{part}"],
        [unfinished, "plot", "--out", os.path.join(unfinished, "plot.png")],
    ]
    for argv in cases:
        assert analyze.main([*argv, "--overwrite"]) == 2
        err = error_line(capsys)
        assert "the data this command reads" in err and "choose a path outside it" in err, err
    assert {path: sha256(path) for path in before} == before
    assert not os.path.exists(os.path.join(unfinished, "plot.png"))


def test_queries_files_as_other_tools_write_them_are_answered(tmp_path, capsys):
    """A BINARY id column (Hive, Impala, older Spark) made every id "b'd001'", which no row has; a
    pandas frame of integer lists (list<int64>) was "neither a vector column nor an id column"; and
    IDS.TXT was told to be "a .txt file of ids"."""
    export = write_export(str(tmp_path / "e"), random_columns(10))
    pq.write_table(pa.table({"id": pa.array([b"d001", b"d002"], pa.binary())}), tmp_path / "ids.parquet")
    pq.write_table(
        pa.table({"v": pa.array([[1, 0, 0, 0], [0, 2, 0, 0]], pa.list_(pa.int64()))}), tmp_path / "v.parquet"
    )
    (tmp_path / "IDS.TXT").write_text("d001\nd002\n", encoding="utf-8")
    expected = {}
    for name in ("ids.parquet", "v.parquet", "IDS.TXT"):
        out = tmp_path / f"{name}.answer.parquet"
        argv = [export, "neighbors", "--queries", str(tmp_path / name), "-k", "2", "--out", str(out)]
        assert analyze.main(argv) == 0, capsys.readouterr().err
        answers = pq.read_table(out).to_pylist()
        assert not [a for a in answers if a["problem"]], answers
        expected[name] = [(a["query"], a["id"]) for a in answers]
    data = open_documents(export)
    assert expected["ids.parquet"] == expected["IDS.TXT"]
    assert [q for q, _ in expected["ids.parquet"]] == ["d001", "d001", "d002", "d002"]
    assert [key for _, key in expected["ids.parquet"][:2]] == [
        n.key for n in find_neighbors(data, "d001", "v", 2)[0]
    ]
    pq.write_table(pa.table({"id": pa.array([b"\xff\xfe"], pa.binary())}), tmp_path / "bad.parquet")
    argv = [
        export,
        "neighbors",
        "--queries",
        str(tmp_path / "bad.parquet"),
        "--out",
        str(tmp_path / "b.parquet"),
    ]
    assert analyze.main(argv) == 2
    assert "holds bytes that are not UTF-8 text" in error_line(capsys)


def test_query_vectors_of_other_lengths_or_beyond_float32_are_said_so(tmp_path, capsys):
    """Vectors of several lengths in a queries file were "The vectors have different lengths", as if the
    export's were; a float64 query of 1e300 printed numpy's overflow warning and was said to hold NaN or
    infinite values."""
    export = write_export(str(tmp_path / "e"), random_columns(10))
    pq.write_table(pa.table({"v": pa.array([[1.0] * 4, [1.0] * 3])}), tmp_path / "ragged.parquet")
    argv = [
        export,
        "neighbors",
        "--queries",
        str(tmp_path / "ragged.parquet"),
        "--out",
        str(tmp_path / "a.parquet"),
    ]
    assert analyze.main(argv) == 2
    assert "ragged.parquet': its 'v' vectors have different lengths [3, 4]" in error_line(capsys)
    np.save(tmp_path / "big.npy", np.asarray([[1e300, 1, 0, 0], [1, 1, 0, 0]]))
    argv = [
        export,
        "neighbors",
        "--queries",
        str(tmp_path / "big.npy"),
        "-k",
        "1",
        "--out",
        str(tmp_path / "b.parquet"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning is an exception here
        assert analyze.main(argv) == 0
    problems = pq.read_table(tmp_path / "b.parquet")["problem"].to_pylist()
    assert "beyond float32's range" in problems[0] and problems[1] is None, problems


def test_knn_score_says_when_the_sample_is_what_is_short(tmp_path, capsys):
    """--sample 5 with k 10 said "received 5. Lower -k." of an export of 30 labelled rows."""
    export = write_export(str(tmp_path / "e"), random_columns(30))
    assert analyze.main([export, "knn-score", "--label", "lab", "--sample", "5"]) == 2
    assert "the sample holds 5 of the 30 labelled rows. Raise --sample above 10" in error_line(capsys)


def test_knn_score_says_what_its_rows_are_and_what_too_few_needs(tmp_path, capsys):
    """-k 1 with one labelled row said "Lower -k." (it cannot go lower); "20 rows, random sample of 80
    labelled rows" read as a sample of 80; a label holding a newline split the per-class table."""
    columns = random_columns(80)
    columns["lab"] = (["a\nb", "c"] * 40)[:80]
    export = write_export(str(tmp_path / "e"), columns)
    assert analyze.main([export, "knn-score", "--label", "lab", "-k", "3", "--sample", "20"]) == 0
    out = capsys.readouterr().out
    assert "(k=3, a random sample of 20 of the 80 labelled rows, 2 classes)" in out, out
    assert "    a\\nb  " in out and len(out.strip().splitlines()) == 7, out
    columns["one"] = ["x"] + [None] * 79
    columns["three"] = ["x", "y", "x"] + [None] * 77
    export = write_export(str(tmp_path / "f"), columns)
    assert analyze.main([export, "knn-score", "--label", "one", "-k", "1"]) == 2
    err = error_line(capsys)
    assert "needs at least 2 labelled rows with a finite vector" in err and "Lower -k" not in err, err
    assert analyze.main([export, "knn-score", "--label", "three", "-k", "5"]) == 2
    assert "received 3. Lower -k to at most 2." in error_line(capsys)


def test_neighbors_table_keeps_one_line_per_row_whatever_the_fields_hold(tmp_path, capsys):
    """A kept title holding a newline or a tab was printed raw: the row broke in two, its columns shifted."""
    columns = random_columns(3)
    columns["title"] = ["t", "two\nlines", "tab\there"]
    columns["id"] = ["d000", "d\n001", "d002"]
    export = write_export(str(tmp_path / "e"), columns)
    assert analyze.main([export, "neighbors", "--id", "d000"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and "\t" not in "".join(lines), lines
    assert any("d\\n001" in line and "two\\nlines" in line for line in lines), lines


def test_neighbors_table_says_when_no_other_row_has_a_vector_and_shows_huge_scores_short(tmp_path, capsys):
    """One usable row printed a lone table header, as if the answer were cut short; a dot product of
    vectors of 3e38 was printed as a 40-digit number."""
    vectors = pa.array([[1.0, 2.0], [np.nan, 1.0]], pa.list_(pa.float32(), 2))
    lone = write_export(str(tmp_path / "lone"), {"id": ["a", "b"], "v": vectors})
    assert analyze.main([lone, "neighbors", "--id", "a"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "  No other document has a usable v vector (null, NaN or infinite ones are left out)."
    )
    vectors = pa.array([[3e38, 3e38], [1.0, 1.0]], pa.list_(pa.float32(), 2))
    huge = write_export(str(tmp_path / "huge"), {"id": ["a", "b"], "v": vectors})
    assert analyze.main([huge, "index", "--metric", "ip", "--threads", "1"]) == 0
    capsys.readouterr()
    assert analyze.main([huge, "neighbors", "--id", "a"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["1", "6.0000e+38", "b"]


def test_plot_says_when_the_sample_is_what_is_short(tmp_path, capsys):
    """--sample 1 of 10 rows said "PCA ... needs at least 2 rows; received 1 rows", as if the export
    had one."""
    export = write_export(str(tmp_path / "e"), random_columns(10))
    assert analyze.main([export, "plot", "--sample", "1", "--out", str(tmp_path / "p.png")]) == 2
    assert "the sample holds 1 of the 10 usable rows of 'v'. Raise --sample to 2" in error_line(capsys)
    assert not os.path.exists(tmp_path / "p.png")


def test_a_column_no_index_file_can_be_named_after_is_scanned(tmp_path, capsys):
    """neighbors looked for the column's index first and refused the name: "Cannot name an index file
    after the column 'título'", though no index exists or is needed."""
    columns = random_columns(10)
    columns["título"] = columns.pop("v")
    export = write_export(str(tmp_path / "e"), columns)
    assert analyze.main([export, "neighbors", "--id", "d001", "-k", "2"]) == 0
    assert "(9 rows compared)" in capsys.readouterr().out
    assert analyze.main([export, "index"]) == 2
    assert "Rename the column to index it" in error_line(capsys)


def test_index_files_copied_to_another_columns_name_are_refused(tmp_path, capsys):
    """_index/w.* copied from _index/v.* matched their SHA-256 and the export, and answered for w
    with v's neighbours."""
    columns = random_columns(20)
    columns["w"] = random_columns(20, seed=1)["v"]
    export = write_export(str(tmp_path / "e"), columns)
    assert analyze.main([export, "index", "--column", "v", "--recall_queries", "0"]) == 0
    for suffix in (".usearch", ".json"):
        shutil.copy(
            os.path.join(export, "_index", "v" + suffix), os.path.join(export, "_index", "w" + suffix)
        )
    capsys.readouterr()
    assert analyze.main([export, "neighbors", "--id", "d001", "--column", "w"]) == 2
    assert "is that of 'v' (_index/v.usearch), not of 'w'" in error_line(capsys)


def test_an_index_of_the_rows_column_named_vector_is_not_the_token_tables(tmp_path, capsys):
    """An export of token ids with a pooled column named `vector`: once that column was indexed,
    --word loaded its index for the table and said the vocabulary had been replaced."""
    rng = np.random.default_rng(0)
    columns = random_columns(20)
    columns["vector"] = columns.pop("v")
    columns["emb"] = pa.array([[2, 3]] * 20, pa.list_(pa.int32()))
    export = write_export(str(tmp_path / "e"), columns)
    os.makedirs(os.path.join(export, "_tables"))
    table = {
        "token_id": pa.array(range(10), pa.int32()),
        "token": [f"w{i}" for i in range(10)],
        "vector": pa.array(list(rng.normal(size=(10, 3))), pa.list_(pa.float32(), 3)),
    }
    pq.write_table(pa.table(table), os.path.join(export, "_tables", "emb.parquet"))
    assert analyze.main([export, "neighbors", "--word", "w1", "-k", "3"]) == 0
    scanned = capsys.readouterr().out
    assert analyze.main([export, "index", "--column", "vector", "--recall_queries", "0"]) == 0
    capsys.readouterr()
    assert analyze.main([export, "neighbors", "--word", "w1", "-k", "3"]) == 0
    assert capsys.readouterr().out == scanned


def test_vectors_of_other_lengths_in_another_row_file_are_one_error_line(tmp_path, capsys):
    """list<float> vectors of 3 values in one file and 4 in another reached numpy's matmul: traceback."""
    columns = random_columns(20)
    columns["v"] = columns["v"].cast(pa.list_(pa.float32()))  # as pandas writes them: no fixed size
    export = write_shards(str(tmp_path / "e"), columns, shards=2)
    second = os.path.join(export, "part-00001-of-00002.parquet")
    rows = pq.read_table(second)
    longer = pa.array([[*v, 1.0] for v in rows["v"].to_pylist()], pa.list_(pa.float32()))
    pq.write_table(rows.set_column(rows.schema.get_field_index("v"), "v", longer), second)
    manifest_path = os.path.join(export, MANIFEST)
    with open(manifest_path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    manifest["shards"]["rows"][1]["bytes"] = os.path.getsize(second)
    with open(manifest_path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle)
    (tmp_path / "q.txt").write_text("d001\n", encoding="utf-8")
    for argv in (
        ["neighbors", "--id", "d001"],
        ["neighbors", "--queries", str(tmp_path / "q.txt"), "--out", str(tmp_path / "a.parquet")],
    ):
        assert analyze.main([export, *argv]) == 2
        assert "vectors have different lengths" in error_line(capsys)


def test_an_export_with_two_token_tables_says_why_neither_can_be_indexed(tmp_path, capsys):
    """`index` on the export said "pass one of them instead", and on the table file "pass the
    directory it is in": a circle, as a table's index is the export's one _index/vector.*."""
    rng = np.random.default_rng(0)
    ids = pa.array([[2, 3]] * 10, pa.list_(pa.int32()))
    export = write_export(str(tmp_path / "e"), {"id": [f"d{i}" for i in range(10)], "a": ids, "b": ids})
    os.makedirs(os.path.join(export, "_tables"))
    for name in ("a_emb", "b_emb"):
        table = {
            "token_id": pa.array(range(10), pa.int32()),
            "token": [f"w{i}" for i in range(10)],
            "vector": pa.array(list(rng.normal(size=(10, 3))), pa.list_(pa.float32(), 3)),
        }
        pq.write_table(pa.table(table), os.path.join(export, "_tables", f"{name}.parquet"))
    for location in (export, os.path.join(export, "_tables", "a_emb.parquet")):
        assert analyze.main([location, "index"]) == 2
        assert "holds 2 token tables (_tables/), and a table's index is the export's" in error_line(capsys)
    assert not os.path.exists(os.path.join(export, "_index"))
    assert analyze.main([os.path.join(export, "_tables", "a_emb.parquet"), "neighbors", "--word", "w1"]) == 0


def test_an_index_of_row_files_whose_times_alone_changed_says_so(tmp_path, capsys):
    """A copy that does not keep the files' times (`cp -r`) was refused as "built for another version
    of this export ... it was replaced": the user looked for a run that never happened."""
    export = write_export(str(tmp_path / "e"), random_columns(20))
    assert analyze.main([export, "index", "--recall_queries", "0"]) == 0
    stat = os.stat(os.path.join(export, SHARD))
    os.utime(os.path.join(export, SHARD), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert analyze.main([export, "neighbors", "--id", "d001"]) == 2
    message = error_line(capsys)
    assert "was built when its row files had other modification times" in message
    assert "it was replaced" not in message
