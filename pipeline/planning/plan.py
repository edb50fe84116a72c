"""The export plan: the small, picklable data classes workers receive, and the names their fields take.

This module imports neither Keras nor Beam, so worker-side modules (the corpus
reader, the feature parser) can import its constants cheaply.  The plan is
built on the launching machine by `pipeline.planning.build.build_plan`;
workers receive only the plan and load the model themselves.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from models import __version__

if TYPE_CHECKING:
    from models.truncate import LayerSpec
    from pipeline.reading.listing import InputFile

# The one field of a text-file record: the line itself.
TEXT_FIELD = "text"
# What an input takes (`InputInfo.takes`): token ids the pipeline computes (or reads
# as id lists), or the raw string for a model that tokenizes itself (TextVectorization).
IDS_INPUT = "ids"
TEXT_INPUT = "text"
# What an exported column holds (`ColumnInfo.kind`): one vector per document, or one per token.
VECTOR = "vector"
SEQUENCE = "sequence"
# `--tokenizer none`: the corpus fields of token-id inputs already hold lists of ids.
NO_TOKENIZER = "none"


def wants_no_tokenizer(tokenizer_uri: str | None) -> bool:
    """Whether `--tokenizer` says the corpus already holds token ids (`--tokenizer none`)."""
    return (tokenizer_uri or "").strip().lower() == NO_TOKENIZER


@dataclasses.dataclass(frozen=True)
class InputInfo:
    """A model input the sub-model needs: its name, corpus field and length.

    For `takes` TEXT_INPUT (a string input of `rank` 1 or 2), `length` is the
    output length of the TextVectorization layer it feeds, whose non-zero ids
    mark the real tokens of per-token outputs; 0 when there is none of fixed
    length, so only vector outputs can be exported from it.
    """

    name: str
    field: str
    length: int
    takes: str = IDS_INPUT  # IDS_INPUT or TEXT_INPUT
    rank: int = 2
    # Token ids must be below this: the smallest input_dim of the Embeddings the
    # input feeds (0: no Embedding found, any int32 id).
    id_limit: int = 0


@dataclasses.dataclass(frozen=True)
class ColumnInfo:
    """An exported output column.

    `kind` is VECTOR (one vector per document) or SEQUENCE (one vector per
    token of `source_input`, turned into a row by `pooling`).  A sequence column
    with pooling "none" and `token_storage` "ids" holds the real tokens' ids;
    `table` is then its layer's table, relative to the output directory.
    """

    column: str
    layer: str
    call: int
    kind: str
    dim: int
    source_input: str
    pooling: str
    token_storage: str = "vectors"
    table: str = ""


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What workers need to run the export; holds no model, only its URI."""

    model_uri: str
    tokenizer_uri: str
    model_sha256: str
    tokenizer_sha256: str
    layer_specs: tuple[LayerSpec, ...]
    inputs: tuple[InputInfo, ...]
    columns: tuple[ColumnInfo, ...]
    input_pattern: str
    input_format: str
    id_field: str
    keep_fields: tuple[str, ...]
    output: str
    dtype: str
    batch_size: int
    compression: str
    max_record_bytes: int
    tf_threads: int
    padding: str
    fast_path: str = "auto"
    package_version: str = __version__
    truncating: str = "pre"
    allow_unsafe_deserialization: bool = False
    # --reuse: the earlier export, its row shards (from its manifest) and their digests as recorded
    # there (`planning.reuse.recorded_digest`), which the rows read later must still match.
    reuse: str = ""
    reuse_files: tuple[str, ...] = ()
    reuse_digests: tuple[str, ...] = ()
    # Total size of the input files as listed at launch (0: not listed), for the ETA and split size.
    input_bytes: int = 0
    # SHA-256 of the input listing (each file's real path, size and modification time, in the read's
    # order; "" if not listed): a resume continues only a run that read the same files, however
    # --input spelled them (`pipeline.planning.locations.listing_sha256`, `pipeline.writing.resume`).
    input_listing_sha256: str = ""
    # The launch listing: the files the run reads, each checked unchanged before and after it
    # is read. Empty: not listed (a --dry_run of an object-store pattern).
    # `graph.build_pipeline` hands it to ReadCorpus only, so no DoFn carries it.
    input_files: tuple[InputFile, ...] = ()
    # (column, forward pass, reason) as chosen at launch (the launcher's `Embedder.forward_pass_records()`,
    # see `pipeline.inference.embedder.choose_forward_passes`); workers refuse to use another, so
    # the manifest's record holds.  Empty: workers choose.
    forward_passes: tuple[tuple[str, str, str], ...] = ()
    # Where the launch checked the fast path against Keras (`forward_pass.fast_path_environment`):
    # a worker in the same environment trusts `forward_passes` instead of checking again.
    fast_path_checked_on: str = ""
    # Whether the launch's TensorFlow runs its oneDNN kernels (`TF_ENABLE_ONEDNN_OPTS`), which change
    # the last bits of some rows (`forward_pass.onednn_enabled`); None until chosen. Workers refuse
    # the other setting; a resumed run and --reuse compare it.
    onednn: bool | None = None

    @property
    def fields(self) -> dict[str, str]:
        """Model input name -> corpus field."""
        return {info.name: info.field for info in self.inputs}

    @property
    def tokenizes(self) -> bool:
        """Whether text in the fields of token-id inputs is tokenized (False for `--tokenizer none`)."""
        return not wants_no_tokenizer(self.tokenizer_uri)
