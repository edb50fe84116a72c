"""The pipeline's own flags, in one `PipelineOptions` subclass; Beam's flags pass through."""

import argparse
import datetime
import os
import secrets

from apache_beam.options.pipeline_options import PipelineOptions

from models.paths import SAMPLE_CORPUS
from models.tokenizer import SIDES
from pipeline.planning.cli import add_model_flags

INPUT_FORMATS = ("auto", "text", "jsonl", "csv", "parquet")
POOLINGS = ("none", "mean", "max", "last")
DTYPES = ("float32", "float16")
TOKEN_STORAGES = ("vectors", "ids")
COMPRESSIONS = ("snappy", "zstd", "gzip", "none")
# A text corpus takes only this one: its ids are FILE:LINE (`checks.check_text_fields`).
DEFAULT_ID_FIELD = "id"


def integer(text: str) -> int | str:
    """An integer flag's value, or its text when it is not one.

    `checks.check_numeric_flags` then refuses the text in one line that names the
    range; argparse would print Beam's whole usage (about 150 lines) before it.
    """
    try:
        return int(text)
    except ValueError:
        return text


def number(text: str) -> float | str:
    """A number flag's value, or its text when it is not one (see `integer`)."""
    try:
        return float(text)
    except ValueError:
        return text


def default_output() -> str:
    """A fresh directory per run under ./output, so the no-argument command can be repeated.

    Absolute: the advice to rerun with it holds from any directory, and a portable
    runner's workers, which do not share this working directory, write where it says.
    The random suffix keeps runs started in the same second (a script launching one
    export per --layer) apart, even from other machines writing the same directory.
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(os.path.join("output", f"embeddings-{stamp}-{secrets.token_hex(3)}"))


class ExportOptions(PipelineOptions):
    """Flags of `python -m pipeline.run`."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        add_model_flags(parser)
        parser.add_argument(
            "--padding",
            default=None,
            choices=SIDES,
            help="Where padding ids go in a short document: pre (before the tokens, as Keras's "
            "pad_sequences) or post. Default: the bundle's recorded choice, else pre.",
        )
        parser.add_argument(
            "--truncating",
            default=None,
            choices=SIDES,
            help="Which end of a long document is cut: pre (its start, as Keras's "
            "pad_sequences) or post. Default: the bundle's recorded choice, else pre.",
        )
        parser.add_argument(
            "--input",
            default=SAMPLE_CORPUS,
            help="File pattern of the corpus, e.g. 'data/*.jsonl' or 'gs://b/c/*.csv'. "
            "Default: the bundled sample corpus (CPython docstrings).",
        )
        parser.add_argument(
            "--input_format",
            default="auto",
            choices=INPUT_FORMATS,
            help="auto picks by file extension (.txt/.text = one document per line, "
            ".jsonl/.json/.ndjson, .csv, .parquet). Default: %(default)s.",
        )
        parser.add_argument(
            "--id_field",
            default=DEFAULT_ID_FIELD,
            help="Record field holding the document id (default: %(default)s). For "
            "text files the id is FILE:LINE, and no other --id_field is taken.",
        )
        parser.add_argument(
            "--input_map",
            action="append",
            default=None,
            metavar="INPUT=FIELD",
            help="Which corpus field feeds which model input; repeatable. Default: the "
            "bundle's manifest, else a field with the input's name (text files: 'text').",
        )
        parser.add_argument(
            "--layer",
            action="append",
            default=None,
            metavar="[COLUMN=]LAYER[:CALL]",
            help="A layer to export; repeatable. CALL picks the call of a layer used "
            "several times (shared embedding: emb:0 on content, emb:1 on title). "
            "COLUMN names the output column (default LAYER, or LAYER_callK for K>0). "
            "Default: the bundle's default layers, else the layers feeding the outputs.",
        )
        parser.add_argument(
            "--pooling",
            default="mean",
            choices=POOLINGS,
            help="How sequence outputs (one vector per token, e.g. emb) become a row: "
            "mean/max over real tokens, last real token, or none = a list with one "
            "vector per real token (padding dropped) plus a COLUMN_tokens count. "
            "Default: %(default)s.",
        )
        parser.add_argument(
            "--token_storage",
            default="vectors",
            choices=TOKEN_STORAGES,
            help="How per-token columns are stored with --pooling none: vectors (one vector per "
            "real token) or ids (the real tokens' ids, plus the layer's table written once as "
            "OUTPUT/_tables/LAYER.parquet; table[ids] gives the vectors exactly, about 300x "
            "smaller). ids applies to every per-token column and needs each one to be the output "
            "of an Embedding layer applied directly to a token-id input; any other per-token "
            "layer is refused, and columns of one vector per document are stored as vectors as "
            "always. Default: %(default)s.",
        )
        parser.add_argument(
            "--dtype", default="float32", choices=DTYPES, help="Vector storage type (default: %(default)s)."
        )
        parser.add_argument(
            "--keep_fields",
            default=None,
            help="Comma-separated record fields copied to the output as strings (for joins). Text "
            "files have one field, 'text'. Default: none.",
        )
        parser.add_argument(
            "--output",
            default=None,
            help="Output directory (local or gs://, s3://). Default: output/embeddings-<timestamp>-<random>.",
        )
        parser.add_argument(
            "--reuse",
            default=None,
            metavar="EARLIER_OUTPUT",
            help="A finished earlier export (local, gs://, s3://) made with the same model, tokenizer, "
            "layers, pooling, dtype, padding and truncation: a document whose id is there and whose "
            "model inputs are unchanged (same input_sha256) gets its rows copied instead of "
            "recomputed. Everything else is embedded; ids gone from the corpus are gone from the "
            "output. --output is still a complete export (it may be the same directory, with --overwrite).",
        )
        parser.add_argument(
            "--overwrite",
            action="store_true",
            default=False,
            help="Replace an existing finished output in --output.",
        )
        parser.add_argument(
            "--batch_size",
            type=integer,
            default=512,
            help="Documents per forward pass (default: %(default)s).",
        )
        parser.add_argument(
            "--compression",
            default="snappy",
            choices=COMPRESSIONS,
            help="Parquet compression codec (default: %(default)s, which BigQuery, DuckDB "
            "and Spark all read).",
        )
        parser.add_argument(
            "--max_error_fraction",
            type=number,
            default=0.5,
            help="Exit non-zero after the run if more than this fraction of records was "
            "dead-lettered (a wrong --input_map or --input_format). Default: %(default)s.",
        )
        parser.add_argument(
            "--max_record_bytes",
            type=integer,
            default=1_000_000,
            help="Records larger than this are dead-lettered as too_large (default: %(default)s).",
        )
        parser.add_argument(
            "--fast_path",
            default="auto",
            choices=("auto", "off"),
            help="auto: run Embedding->LSTM/GRU/Bidirectional chains on the exact fast path "
            "(folded input projection, padding skipped) and the layers after them as Keras "
            "layers, when it matches Keras on a sample batch to 1e-5; off: always Keras's own "
            "forward pass. Default: %(default)s.",
        )
        parser.add_argument(
            "--tf_threads",
            type=integer,
            default=0,
            help="TensorFlow intra-op threads per worker process. 0 = cores / worker processes: 1 on "
            "Dataflow (one SDK process per vCPU), cores // --direct_num_workers with multi_processing, "
            "TensorFlow's default for a single process. Default: %(default)s.",
        )
        parser.add_argument(
            "--limit",
            type=integer,
            default=None,
            metavar="N",
            help="A quick trial: read only the first N records (by file path, then position in the "
            "file). The output is a finished export whose manifest says it was limited. Default: every "
            "record.",
        )
        parser.add_argument(
            "--shard_mb",
            type=number,
            default=256,
            help="Target size of an output row file in MB: a file is closed once it reaches it, so "
            "readers that load files in parallel (DuckDB, Spark, BigQuery) get several. "
            "Default: %(default)s.",
        )
        parser.add_argument(
            "--checkpoint_seconds",
            type=number,
            default=60,
            help="Rows become durable at least this often: a worker closes its open row file once "
            "it has held rows this long, so a killed run loses at most this much work per worker. "
            "0.01 to 604800 (a week: then only --shard_mb and the end of a bundle close a file). "
            "Default: %(default)s.",
        )
        parser.add_argument(
            "--resume",
            default="auto",
            choices=("auto", "off"),
            help="auto: a run of the same export (same model, flags and input files) that died "
            "before its commit is continued: the rows of its complete files are kept and only the "
            "other documents are embedded. off: remove what it left and start from zero. "
            "Default: %(default)s.",
        )
        parser.add_argument(
            "--progress_seconds",
            type=number,
            default=10,
            help="Seconds between progress lines of a local run when stderr is not a terminal (a "
            "terminal gets a live bar); on Dataflow, between polls of the job; on portable runners "
            "(Flink, Spark), between lines of the job's state. Default: %(default)s.",
        )
        parser.add_argument(
            "--stall_timeout",
            type=number,
            default=1800,
            metavar="SECONDS",
            help="Local runs with worker processes (--direct_running_mode multi_processing, the "
            "default from 64 MB of input): end the run with an error when it has made no progress "
            "(no id scanned, record read or row written, and no process of it computing) for this "
            "many seconds (its workers' start-up included), as when a worker is stopped, deadlocked or "
            "waits on a hung mount; its rows are kept and the rerun continues from them. 0 waits forever; "
            "otherwise at least 10. "
            "Default: %(default)s.",
        )
        parser.add_argument(
            "--worker_start_timeout",
            type=number,
            default=300,
            metavar="SECONDS",
            help="Portable runners (PortableRunner, Flink, Spark): cancel the job and exit with an error "
            "naming what to check when no worker has started running it this many seconds after "
            "submission (a worker pool whose python lacks Beam or this package, an image that cannot "
            "be pulled). 0 waits forever. Default: %(default)s.",
        )
