"""Launch-time validation: a wrong flag, model or output is refused with a useful message, writing nothing."""

import os
import shutil
import sys

import forkserver
import keras
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from pipeline_fixtures import (
    REPOSITORY,
    Reference,
    export_args,
    is_empty_or_absent,
    manifest_of,
    read_rows,
    rows_by_id,
    sample_documents,
    snapshot,
    write_jsonl,
)
from sizes import LENGTHS, SIZES

from models.bundle import MODEL_FILE, TOKENIZER_FILE
from models.tokenizer import Tokenizer
from pipeline.errors import ExportConfigError
from pipeline.planning.build import build_plan
from pipeline.planning.options import ExportOptions
from pipeline.run import EXIT_CONFIG_ERROR
from pipeline.running.export import run_export
from pipeline.writing.layout import MANIFEST, STAGING

TOPOLOGY = "two_inputs_two_outputs"
# A Conv1D of kernel 3 without padding shortens the content by two positions.
CONVOLVED_LENGTH = LENGTHS["content"] - 2


@pytest.fixture(scope="module")
def bundle(shared_bundle):
    return shared_bundle(TOPOLOGY)


@pytest.fixture(scope="module")
def documents():
    return sample_documents(count=12, seed=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, documents):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", documents)


def assert_refused(argv, output, pattern):
    """Builds the plan of `argv`, expects ExportConfigError matching `pattern`, and nothing written.

    `run_export` builds the plan before it touches the output, so the plan shows
    each refusal; `test_output_with_foreign_files_is_refused` runs a whole refused export.
    """
    with pytest.raises(ExportConfigError, match=pattern) as caught:
        build_plan(PipelineOptions(argv).view_as(ExportOptions))
    assert is_empty_or_absent(output), os.listdir(output)
    return str(caught.value)


def test_missing_layer_lists_the_layers_with_call_counts_and_the_close_name(bundle, corpus, tmp_path):
    output = tmp_path / "out"
    message = assert_refused(
        export_args(bundle, corpus, output, "--layer=lstm_contnt"), output, "no layer named 'lstm_contnt'"
    )
    assert "Did you mean 'lstm_content'" in message
    for described in ("emb (2 calls)", "lstm_content (1 call)", "lstm_title (1 call)", "out_title (1 call)"):
        assert described in message


def test_call_index_out_of_range_names_the_valid_calls(bundle, corpus, tmp_path):
    output = tmp_path / "out"
    message = assert_refused(
        export_args(bundle, corpus, output, "--layer=emb:2"), output, r"Layer 'emb' has 2 call\(s\)"
    )
    assert "call 2 does not exist; use emb:0 .. emb:1." in message
    assert_refused(
        export_args(bundle, corpus, output, "--layer=lstm_title:1"),
        output,
        r"'lstm_title' has 1 call\(s\) in this model, so call 1 does not exist; use lstm_title:0\.$",
    )


def test_input_map_for_an_input_the_sub_model_does_not_need(bundle, corpus, tmp_path):
    output = tmp_path / "out"
    assert_refused(
        export_args(bundle, corpus, output, "--layer=lstm_content", "--input_map=title=title"),
        output,
        r"--input_map names \['title'\], which the exported layers do not need; "
        r"the sub-model's inputs are \['content'\]",
    )


def test_input_map_for_an_input_the_model_does_not_have(bundle, corpus, tmp_path):
    """A name the model lacks (Keras 2 numbers inputs per process: input_1 may be input_3) is told apart."""
    output = tmp_path / "out"
    assert_refused(
        export_args(bundle, corpus, output, "--layer=lstm_content", "--input_map=input_1=body"),
        output,
        r"--input_map names \['input_1'\], which the model has no input of; its inputs are "
        r"\['content', 'title'\], and the exported layers need \['content'\]. Rename those --input_map "
        r"entries to the model's input names, e.g. content=body ",
    )


@pytest.mark.parametrize("entry", ["content", "=body", "content=", "content:body"])
def test_input_map_syntax(entry, bundle, corpus, tmp_path):
    output = tmp_path / "out"
    assert_refused(
        export_args(bundle, corpus, output, f"--input_map={entry}"),
        output,
        f"Invalid --input_map '{entry}': expected INPUT=FIELD",
    )


def test_finished_export_is_kept_without_overwrite_and_replaced_with_it(bundle, corpus, documents, tmp_path):
    output = tmp_path / "out"
    first = run_export(export_args(bundle, corpus, output, "--layer=lstm_content"))
    assert first.exit_code == 0 and first.rows_written == len(documents)
    before = snapshot(output)
    assert MANIFEST in before

    with pytest.raises(ExportConfigError, match="already holds a finished export. Pass --overwrite"):
        run_export(export_args(bundle, corpus, output, "--layer=lstm_title"))
    assert snapshot(output) == before

    second = run_export(export_args(bundle, corpus, output, "--layer=lstm_title", "--overwrite"))
    assert second.exit_code == 0 and second.rows_written == len(documents)
    assert read_rows(output).column_names == ["id", "lstm_title", "input_sha256"]
    assert [c["column"] for c in manifest_of(output)["columns"]] == ["lstm_title"]
    assert STAGING not in os.listdir(output)


def test_output_with_foreign_files_is_refused(bundle, corpus, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("someone else's file\n")
    with pytest.raises(ExportConfigError, match="holds files that no export wrote"):
        run_export(export_args(bundle, corpus, output))
    assert snapshot(output) == {"notes.txt": b"someone else's file\n"}


def test_model_path_that_does_not_exist(corpus, tmp_path):
    output = tmp_path / "out"
    missing = tmp_path / "no_such_bundle"
    assert_refused(export_args(missing, corpus, output), output, f"--model '{missing}' does not exist")


def test_directory_without_manifest(bundle, corpus, tmp_path):
    output = tmp_path / "out"
    directory = tmp_path / "not_a_bundle"
    directory.mkdir()
    shutil.copy(os.path.join(bundle, MODEL_FILE), directory)
    assert_refused(export_args(directory, corpus, output), output, "is a directory without manifest.json")


def test_unknown_model_file_extension(bundle, corpus, tmp_path):
    output = tmp_path / "out"
    model = tmp_path / "model.pt"
    shutil.copy(os.path.join(bundle, MODEL_FILE), model)
    assert_refused(
        export_args(model, corpus, output),
        output,
        "has an unknown format: expected a bundle directory or a file ending in",
    )


def test_bare_keras_model_needs_a_tokenizer(bundle, corpus, tmp_path):
    output = tmp_path / "out"
    assert_refused(
        export_args(os.path.join(bundle, MODEL_FILE), corpus, output),
        output,
        "is a bare model file, which carries no tokenizer: pass --tokenizer",
    )


def test_input_matching_no_files(bundle, tmp_path):
    output = tmp_path / "out"
    pattern = tmp_path / "corpus" / "*.jsonl"
    assert_refused(export_args(bundle, pattern, output), output, "matches no files")


def test_input_with_unknown_extension_and_auto_format(bundle, corpus, tmp_path):
    output = tmp_path / "out"
    odd = tmp_path / "corpus.dat"
    shutil.copy(corpus, odd)
    assert_refused(
        export_args(bundle, odd, output),
        output,
        r"Cannot tell the format of --input .*corpus\.dat.* pass --input_format",
    )


@pytest.mark.parametrize(
    "name, flags, pattern",
    [
        (
            "corpus.jsonl.bz2",
            [],
            r"\.bz2-compressed, which the reader does not take.*recompress them with gzip",
        ),
        ("corpus.jsonl.bz2", ["--input_format", "jsonl"], r"\.bz2-compressed"),
        ("corpus.CSV.ZST", ["--input_format", "csv"], r"\.zst-compressed"),
        ("notes.tar", ["--input_format", "text"], r"a tar archive.*tar -xf"),
    ],
)
def test_input_the_reader_cannot_decompress_is_refused_whatever_the_format(
    name, flags, pattern, bundle, corpus, tmp_path
):
    """`--input c.jsonl.bz2` said "Cannot tell the format ...; pass --input_format", and with it the run
    read nothing of the file and failed after its work (exit 5, unreadable_file)."""
    compressed = tmp_path / name
    compressed.write_bytes(b"BZh91AY&SY")
    output = tmp_path / "out"
    assert_refused(export_args(bundle, compressed, output, *flags), output, pattern)


def test_the_format_is_told_from_an_extension_in_any_case():
    """`*.jsonl.GZ` was refused ("Cannot tell the format"), though `*.JSONL` was taken and .GZ read."""
    from pipeline.planning.checks import detect_format

    assert detect_format("data/*.JSONL", "auto") == "jsonl"
    assert detect_format("data/*.jsonl.GZ", "auto") == "jsonl"
    assert detect_format("data/*.CSV.Gz", "auto") == "csv"


@pytest.mark.parametrize(
    "flag,value,valid_range",
    [
        ("batch_size", "0", "from 1 to 100,000"),
        ("batch_size", "-3", "from 1 to 100,000"),
        ("batch_size", "10000000000", "from 1 to 100,000"),
        ("shard_mb", "inf", "from 0.001 to 1,000,000.0"),
        ("shard_mb", "nan", "from 0.001 to 1,000,000.0"),
        ("shard_mb", "0", "from 0.001 to 1,000,000.0"),
        ("shard_mb", "-1", "from 0.001 to 1,000,000.0"),
        ("max_record_bytes", "99999999999999999999", "from 1 to 1,073,741,824"),
        ("max_record_bytes", "0", "from 1 to 1,073,741,824"),
        ("progress_seconds", "0", "from 0.1 to 86,400.0"),
        ("progress_seconds", "-1", "from 0.1 to 86,400.0"),
        ("progress_seconds", "nan", "from 0.1 to 86,400.0"),
        ("progress_seconds", "inf", "from 0.1 to 86,400.0"),
        ("max_error_fraction", "nan", "from 0.0 to 1.0"),
        ("max_error_fraction", "-0.1", "from 0.0 to 1.0"),
        ("max_error_fraction", "1.5", "from 0.0 to 1.0"),
        ("limit", "0", "from 1 to"),
        ("limit", "-5", "from 1 to"),
        ("limit", "99999999999999999999999", "from 1 to"),
        ("tf_threads", "-1", "from 0 to 1,024"),
        ("tf_threads", "100000", "from 0 to 1,024"),
        ("direct_num_workers", "-1", "from 0 to 1,024"),
        ("direct_num_workers", "5000", "from 0 to 1,024"),
        # Not numbers of the flag's kind: one line too, not argparse's usage of every Beam flag.
        ("batch_size", "1e3", "from 1 to 100,000"),
        ("limit", "inf", "from 1 to"),
        ("limit", "ten", "from 1 to"),
        ("shard_mb", "64MB", "from 0.001 to 1,000,000.0"),
        ("checkpoint_seconds", "", "from 0.01 to 604,800.0"),
        ("worker_start_timeout", "5m", "from 0.0 to 86,400.0"),
        ("stall_timeout", "-1", "from 0.0 to 604,800.0"),
        # Accepted, it ended a healthy run as stalled, "no progress for 0:00:00".
        ("stall_timeout", "0.5", "0 (never) or at least 10 seconds"),
        ("tf_threads", "all", "from 0 to 1,024"),
    ],
)
def test_every_numeric_flag_out_of_range_is_one_error_line_and_exit_2(
    flag, value, valid_range, bundle, corpus, tmp_path, capsys
):
    from pipeline.run import main

    output = tmp_path / "out"
    code = main(export_args(bundle, corpus, output, f"--{flag}={value}"))
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --{flag} must be "), err
    assert valid_range in lines[0] and f"received {value}" in lines[0].replace("'", "")
    assert is_empty_or_absent(output)


@pytest.mark.parametrize(
    ("flag", "value", "valid_range", "received"),
    [
        ("shard_mb", "-inf", "from 0.001 to 1,000,000.0", "-inf"),
        ("shard_mb", "-1e3", "from 0.001 to 1,000,000.0", "-1000.0"),
        ("max_error_fraction", "-nan", "from 0.0 to 1.0", "nan"),
        ("limit", "-1e3", "from 1 to", "-1e3"),
    ],
)
def test_a_negative_number_as_the_next_argument_reaches_the_flags_own_check(
    flag, value, valid_range, received, bundle, corpus, tmp_path, capsys
):
    """`--shard_mb -inf` (not `=-inf`) got argparse's "argument --shard_mb: expected one argument":
    argparse takes only `-1` and `-0.5` after a flag as a number."""
    from pipeline.run import main

    output = tmp_path / "out"
    code = main(export_args(bundle, corpus, output, f"--{flag}", value))
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --{flag} must be "), err
    assert valid_range in lines[0] and f"received {received}" in lines[0].replace("'", "")
    assert is_empty_or_absent(output)


@pytest.mark.parametrize("flag", ["tokenizer", "model", "input", "reuse"])
def test_a_file_uri_is_refused_in_one_line_naming_the_local_path(flag, bundle, corpus, tmp_path, capsys):
    """`--tokenizer file:///PATH` ended in a ValueError traceback after the model load; `--model file://`
    was refused saying to `pip install apache-beam[gcp]` (the bundled model's path was taken)."""
    from pipeline.run import main

    paths = {
        "tokenizer": os.path.join(bundle, TOKENIZER_FILE),
        "model": os.path.join(bundle, MODEL_FILE),
        "input": str(corpus),
        "reuse": str(tmp_path / "earlier"),
    }
    flags = ["--tokenizer", paths["tokenizer"]] if flag == "model" else []
    output = tmp_path / "out"
    args = [*export_args(bundle, corpus, output, *flags), f"--{flag}", "file://" + paths[flag]]
    if flag in ("model", "input"):  # given once: the file:// one replaces export_args's
        position = args.index(f"--{flag}")
        del args[position : position + 2]
    code = main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_CONFIG_ERROR
    assert lines == [
        f"error: --{flag} 'file://{paths[flag]}' is a file:// URI, which Beam's filesystems do not "
        f"read; give the local path itself, '{paths[flag]}'."
    ]
    assert is_empty_or_absent(output)


def test_a_negative_number_after_a_flag_of_the_other_commands_is_its_value():
    from models.command_line import CommandParser, join_negative_numbers

    parser = CommandParser()
    parser.add_argument("--k", type=float)
    parser.add_argument("--verbose", action="store_true")
    assert parser.parse_args(["--k", "-inf"]).k == float("-inf")
    assert parser.parse_args(["--k", "-1e3"]).k == -1000.0
    # Only to a flag that takes one value, never a flag (a forgotten value: "-verbose" for
    # "--verbose"), and nothing after "--".
    args = ["--verbose", "-1", "--k", "-verbose", "--", "--k", "-2e1"]
    assert join_negative_numbers(parser, args) == args


def test_a_value_starting_with_a_dash_that_names_no_flag_is_the_flags_value():
    """A file -draft.jsonl, a token -lrb- (Penn Treebank's "("), an id -a7: argparse took each for a flag and
    said "argument --input: expected one argument", though one was given."""
    from models.command_line import join_negative_numbers
    from pipeline.analyze import build_parser
    from pipeline.running.export import beam_parser, check_known_flags

    assert build_parser().parse_args(["OUT", "neighbors", "--word", "-lrb-"]).word == "-lrb-"
    assert build_parser().parse_args(["OUT", "neighbors", "--id", "-a7"]).id == "-a7"
    args = join_negative_numbers(beam_parser(), ["--input", "-draft.jsonl", "--output", "-o"])
    check_known_flags(args)
    options = PipelineOptions(args).view_as(ExportOptions)
    assert (options.input, options.output) == ("-draft.jsonl", "-o")


@pytest.mark.parametrize("runner", ["Foo", "PrismRunner", "BundleBasedDirectRunner", "InteractiveRunner"])
def test_a_runner_an_export_does_not_run_on_is_refused_before_anything_is_written(
    runner, bundle, corpus, tmp_path, capsys
):
    """An unknown name was Beam's traceback once the model had loaded and `_staging` existed."""
    from pipeline.run import main

    output = tmp_path / "out"
    code = main(export_args(bundle, corpus, output, "--runner", runner))
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG_ERROR
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --runner '{runner}' is not a runner"), err
    assert "DataflowRunner" in lines[0] and "FlinkRunner" in lines[0]
    assert is_empty_or_absent(output)


@pytest.mark.parametrize("runner", [None, "DirectRunner", "direct", "directrunner", "Direct", "DIRECTRUNNER"])
def test_every_spelling_of_the_direct_runner_runs_on_the_local_runner(runner):
    """`--runner Direct` passed the runner check, then ran on Beam's own DirectRunner (which
    tries Prism, downloaded from GitHub) without our worker settings."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from pipeline.running.runners import local_runner

    options = PipelineOptions([] if runner is None else ["--runner", runner])
    assert isinstance(local_runner(options), FnApiRunner)


@pytest.mark.parametrize("id_field", ["", "  "])
def test_an_empty_id_field_is_refused(id_field, bundle, corpus, tmp_path):
    output = tmp_path / "out"
    argv = export_args(bundle, corpus, output, f"--id_field={id_field}")
    assert_refused(argv, output, "--id_field must name")


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--id_field", "doc"], r"--id_field 'doc' has no field to read in text input.*FILE:LINE"),
        (["--keep_fields", "text,topic"], r"--keep_fields 'topic' is no field of text input"),
    ],
)
def test_a_field_flag_a_text_corpus_cannot_honour_is_refused(flags, pattern, bundle, tmp_path):
    """A text corpus (one document per line, ids FILE:LINE): `--id_field doc` was silently ignored
    (exit 0), and `--keep_fields topic` a null column said only in a warning after the whole run."""
    notes = tmp_path / "notes.txt"
    notes.write_text("open the socket\nread the file\n")
    output = tmp_path / "out"
    assert_refused(export_args(bundle, notes, output, "--layer", "lstm_content", *flags), output, pattern)


@pytest.mark.parametrize("flag", ["--output", "--reuse", "--tokenizer"])
def test_an_empty_output_or_reuse_is_refused(flag, bundle, corpus, tmp_path, monkeypatch):
    """An unset $OUT is not "no --output": it exported into ./output/, --reuse "" embedded all,
    and --tokenizer "" used the bundle's own tokenizer without a word."""
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(bundle), "--input", str(corpus), f"{flag}=", "--limit", "3"]
    if flag == "--reuse":
        argv += ["--output", str(tmp_path / "out")]
    with pytest.raises(ExportConfigError, match=f"{flag} is empty"):
        run_export(argv)
    assert not (tmp_path / "output").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["", " ", ",", " , "])
def test_a_keep_fields_that_names_no_field_is_refused(value, bundle, corpus, tmp_path):
    """`--keep_fields "$FIELDS"` with the variable unset exported without any kept field, exit 0,
    without a word: the join the fields were for was impossible."""
    output = tmp_path / "out"
    argv = export_args(bundle, corpus, output, "--keep_fields", value, "--limit", "3")
    with pytest.raises(ExportConfigError, match=rf"--keep_fields {value!r} names no field \(an unset shell"):
        run_export(argv)
    assert not output.exists()


def test_every_numeric_flag_of_the_options_has_a_range():
    from pipeline.planning.checks import NUMERIC_FLAGS
    from pipeline.planning.options import ExportOptions, integer, number

    parsers = []
    ExportOptions([]).get_all_options(current_only=True, add_extra_args_fn=parsers.append)
    numeric = {action.dest for action in parsers[0]._actions if action.type in (int, float, integer, number)}
    assert numeric == {name for name, *_ in NUMERIC_FLAGS}


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory, bundle):
    """A bare .keras model with a length-changing Conv1D and a three-output LSTM, and a tokenizer file.

    Neither layer's output can be a row: (batch, CONVOLVED_LENGTH, 4) is aligned with no
    input, and `lstm_state` returns three tensors per call.
    """
    keras.utils.set_random_seed(3)
    content = keras.Input(shape=(LENGTHS["content"],), dtype="int32", name="content")
    embedded = keras.layers.Embedding(SIZES["vocabulary_size"], SIZES["embedding_dim"], name="emb")(content)
    convolved = keras.layers.Conv1D(4, 3, name="conv")(embedded)
    sequence, _, _ = keras.layers.LSTM(5, return_state=True, name="lstm_state")(convolved)
    model = keras.Model(content, keras.layers.Dense(1, name="output")(sequence))
    directory = tmp_path_factory.mktemp("odd_model")
    path = str(directory / "odd.keras")
    model.save(path)
    tokenizer = str(directory / "tokenizer.json")
    shutil.copy(os.path.join(bundle, TOKENIZER_FILE), tokenizer)
    return path, tokenizer


def test_layer_whose_output_shape_cannot_be_a_row(odd_model, corpus, tmp_path):
    model, tokenizer = odd_model
    output = tmp_path / "out"
    assert_refused(
        export_args(model, corpus, output, "--tokenizer", tokenizer, "--layer=conv"),
        output,
        rf"Layer 'conv' \(call 0\) outputs shape \(None, {CONVOLVED_LENGTH}, 4\); only vectors",
    )
    assert_refused(
        export_args(model, corpus, output, "--tokenizer", tokenizer, "--layer=lstm_state"),
        output,
        # It named no way on: one layer reading the tensor wanted, added to the model, is one.
        r"Layer 'lstm_state' returns 3 tensors per call; .*keras\.layers\.Identity\(name='NAME'\)\(tensor\)"
        r".* pass --layer NAME\.$",
    )


def test_bare_model_with_tokenizer_exports(odd_model, corpus, documents, tmp_path):
    model_path, tokenizer_path = odd_model
    output = tmp_path / "out"
    argv = export_args(model_path, corpus, output, "--tokenizer", tokenizer_path, "--layer=emb")
    summary = run_export(argv)
    assert (summary.exit_code, summary.rows_written, summary.dead_letters) == (0, len(documents), 0)
    weights = keras.saving.load_model(model_path, compile=False).get_layer("emb").embeddings.numpy()
    with open(tokenizer_path, encoding="utf-8") as handle:
        tokenizer = Tokenizer.from_json(handle.read())
    ids = tokenizer.encode_batch([d["content"] for d in documents], LENGTHS["content"])[0]
    rows = rows_by_id(read_rows(output))
    for document, row_ids in zip(documents, ids, strict=True):
        expected = weights[row_ids[row_ids != 0]].mean(axis=0)
        np.testing.assert_allclose(rows[document["id"]]["emb"], expected, atol=1e-5, rtol=0)


def test_content_layer_exports_from_a_corpus_without_titles(bundle, documents, tmp_path):
    untitled = [{key: value for key, value in d.items() if key != "title"} for d in documents]
    corpus = write_jsonl(tmp_path / "untitled.jsonl", untitled)
    output = tmp_path / "out"
    summary = run_export(export_args(bundle, corpus, output, "--layer=lstm_content"))
    assert (summary.exit_code, summary.rows_written, summary.dead_letters) == (0, len(documents), 0)
    assert manifest_of(output)["counts"]["records_read"] == len(documents)
    reference = Reference(bundle, untitled)  # titles encode as all padding: lstm_content ignores them
    expected = reference.predict("lstm_content")
    rows = rows_by_id(read_rows(output))
    actual = np.array([rows[document_id]["lstm_content"] for document_id in reference.ids])
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


def run_cli(*argv):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))
    return forkserver.run(
        [sys.executable, "-m", "pipeline.run", *map(str, argv)],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_cli_missing_layer_exits_2_with_an_error_line(bundle, corpus, tmp_path):
    output = tmp_path / "out"
    result = run_cli(*export_args(bundle, corpus, output, "--layer=lstm_contnt"))
    assert result.returncode == EXIT_CONFIG_ERROR == 2, result.stderr[-2000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: The model has no layer named 'lstm_contnt'. Did you mean 'lstm_content'")
    assert "emb (2 calls)" in line
    assert is_empty_or_absent(output)


@pytest.mark.slow
def test_cli_missing_model_exits_2_with_an_error_line(corpus, tmp_path):
    output = tmp_path / "out"
    missing = tmp_path / "no_such_bundle"
    result = run_cli(*export_args(missing, corpus, output))
    assert result.returncode == 2, result.stderr[-2000:]
    assert error_lines(result.stderr) == [
        f"error: --model '{missing}' does not exist. Pass a bundle directory written by "
        "`python -m models.train`, or a .keras/.h5 file."
    ]
    assert result.stdout.strip() == ""
    assert is_empty_or_absent(output)


def test_the_manifest_records_the_token_flags_and_redacts_credentials():
    """--tokenizer and --token_storage are how the export was made; session tokens and keys are secrets."""
    from pipeline.running.report import REDACTED, recorded_command_line, recorded_options

    argv = ["--tokenizer", "tok.json", "--token_storage=ids", "--s3_session_token", "abc"]
    argv += ["--s3_secret_access_key=xyz", "--azure_connection_string", "conn"]
    recorded = recorded_options(PipelineOptions(argv))
    assert recorded["tokenizer"] == "tok.json" and recorded["token_storage"] == "ids"
    assert recorded["s3_session_token"] == recorded["s3_secret_access_key"] == REDACTED
    assert recorded["azure_connection_string"] == REDACTED
    line = recorded_command_line(argv)
    assert line[:3] == ["--tokenizer", "tok.json", "--token_storage=ids"]
    assert "abc" not in line and "xyz" not in " ".join(line) and "conn" not in line


def test_a_kept_field_in_no_record_is_said_in_the_summary_and_the_manifest(bundle, corpus, tmp_path, capsys):
    """A misspelled --keep_fields wrote an all-null column, exit 0, without a word."""
    from pipeline.run import main
    from pipeline.writing.state import read_manifest

    output = tmp_path / "out"
    assert main(export_args(bundle, corpus, output, "--keep_fields", "kind,knd")) == 0
    out = capsys.readouterr().out
    assert "--keep_fields 'knd' is missing or null in all 12 rows: check its name" in out
    assert "'kind'" not in out
    assert read_manifest(str(output))["counts"]["kept_fields_null"] == {"kind": 0, "knd": 12}


def test_the_manifest_and_the_parquet_metadata_describe_the_columns_alike(bundle, corpus, tmp_path):
    """The manifest said pooling "none" (one vector per token, by the flags table) for an LSTM's vector."""
    import pyarrow.parquet as pq
    from pipeline_fixtures import row_files

    from pipeline.writing.schema import read_export_metadata
    from pipeline.writing.state import read_manifest

    output = tmp_path / "out"
    summary = run_export(export_args(bundle, corpus, output, "--layer", "lstm_content", "--layer", "emb"))
    assert summary.exit_code == 0, summary.message
    manifest = {column["column"]: column for column in read_manifest(str(output))["columns"]}
    (shard,) = row_files(output)
    metadata = read_export_metadata(pq.read_schema(shard))
    metadata = {column["column"]: column for column in metadata["columns"]}
    for name in ("lstm_content", "emb"):
        for key in ("pooling", "token_storage", "kind", "dim", "source_input"):
            assert manifest[name][key] == metadata[name][key] or (
                key == "source_input" and not manifest[name][key] and metadata[name][key] is None
            ), (name, key)
    assert manifest["lstm_content"]["pooling"] is None and manifest["emb"]["pooling"] == "mean"


@pytest.mark.parametrize("records", ["", "{broken\n" * 3], ids=["empty_corpus", "all_dead_letters"])
def test_an_export_without_rows_has_one_empty_shard_that_readers_open(bundle, records, tmp_path, capsys):
    """Without a row file the summary's own DuckDB line failed ("No files found"), polars too,
    and pandas read no columns."""
    import re
    import subprocess

    import duckdb
    import polars

    from pipeline.run import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(records, encoding="utf-8")
    output = tmp_path / "out"
    code = main(export_args(bundle, str(corpus), output, "--max_error_fraction", "1"))
    out = capsys.readouterr().out
    assert code == 0, out
    assert sorted(name for name in os.listdir(output) if name.startswith("part-")) == [
        "part-00000-of-00001.parquet"
    ]
    manifest = manifest_of(output)
    assert [shard["rows"] for shard in manifest["shards"]["rows"]] == [0]
    columns = duckdb.sql(f"SELECT * FROM '{output}/part-*.parquet'").columns
    assert columns[0] == "id" and "lstm_content" in columns and "input_sha256" in columns
    assert polars.read_parquet(f"{output}/part-*.parquet").columns == columns
    for line in [line for line in out.splitlines() if "python -c" in line]:
        command = line[line.index("python -c") :].replace("python", f"'{sys.executable}'", 1)
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"rows written\s+0", out)
