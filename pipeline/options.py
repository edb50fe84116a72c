"""The pipeline's own flags, in one `PipelineOptions` subclass; Beam's flags pass through."""

import datetime
import os

from apache_beam.options.pipeline_options import PipelineOptions

from models.paths import DEFAULT_BUNDLE, SAMPLE_CORPUS
from models.tokenizer import SIDES

INPUT_FORMATS = ("auto", "text", "jsonl", "csv", "parquet")
POOLINGS = ("none", "mean", "max", "last")
DTYPES = ("float32", "float16")
COMPRESSIONS = ("snappy", "zstd", "gzip", "none")


def default_output():
    """A fresh directory per run, so the no-argument command can be repeated."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("output", f"embeddings-{stamp}")


class ExportOptions(PipelineOptions):
    """Flags of `python -m pipeline.run`."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--model",
            default=DEFAULT_BUNDLE,
            help="Model bundle directory (from `python -m models.train`) or a .keras/.h5 "
            "file; local path or any Beam filesystem URI (gs://, s3://). "
            "Default: the bundled model trained on the sample corpus.",
        )
        parser.add_argument(
            "--tokenizer",
            default=None,
            help="Tokenizer for a bare .keras/.h5 model (a bundle carries its own): this "
            "package's tokenizer.json, a Keras 2 `Tokenizer.to_json()` file, or a vocabulary "
            "file with one token per line (id = line number, TextVectorization.get_vocabulary() "
            "order). 'none': the corpus fields already hold lists of token ids. Not needed for "
            "models that take raw strings (TextVectorization inside).",
        )
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
            "--allow_unsafe_deserialization",
            action="store_true",
            default=False,
            help="Load models with Lambda layers. Their Python code is stored in the model file "
            "and runs while it loads, on the launcher and on every worker: only for files you trust.",
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
            default="id",
            help="Record field holding the document id (default: %(default)s). For "
            "text files the id is FILE:LINE.",
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
            "--dtype", default="float32", choices=DTYPES, help="Vector storage type (default: %(default)s)."
        )
        parser.add_argument(
            "--keep_fields",
            default="",
            help="Comma-separated record fields copied to the output as strings (for joins).",
        )
        parser.add_argument(
            "--output",
            default=None,
            help="Output directory (local or gs://, s3://). Default: output/embeddings-<timestamp>.",
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
            "--batch_size", type=int, default=512, help="Documents per forward pass (default: %(default)s)."
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
            type=float,
            default=0.5,
            help="Exit non-zero after the run if more than this fraction of records was "
            "dead-lettered (a wrong --input_map or --input_format). Default: %(default)s.",
        )
        parser.add_argument(
            "--max_record_bytes",
            type=int,
            default=1_000_000,
            help="Records larger than this are dead-lettered as too_large (default: %(default)s).",
        )
        parser.add_argument(
            "--fast_path",
            default="auto",
            choices=("auto", "off"),
            help="auto: use the exact fast path for Embedding->LSTM models (folded input "
            "projection, padding skipped) when the model qualifies and matches Keras on a "
            "sample batch to 1e-5; off: always Keras's own forward pass. Default: %(default)s.",
        )
        parser.add_argument(
            "--tf_threads",
            type=int,
            default=0,
            help="TensorFlow intra-op threads per worker process. 0 = cores / worker processes: 1 on "
            "Dataflow (one SDK process per vCPU), cores // --direct_num_workers with multi_processing, "
            "TensorFlow's default for a single process.",
        )
        parser.add_argument(
            "--limit",
            type=int,
            default=None,
            metavar="N",
            help="A quick trial: read only the first N records (by file path, then position in the "
            "file). The output is a finished export whose manifest says it was limited.",
        )
        parser.add_argument(
            "--shard_mb",
            type=float,
            default=256,
            help="Target size of an output row file in MB: a file is closed once it reaches it, so "
            "readers that load files in parallel (DuckDB, Spark, BigQuery) get several. "
            "Default: %(default)s.",
        )
        parser.add_argument(
            "--progress_seconds",
            type=float,
            default=10,
            help="Seconds between progress lines of a local run when stderr is not a terminal (a "
            "terminal gets a live bar); on Dataflow, between polls of the job. Default: %(default)s.",
        )
