"""Flags shared by the command-line tools: the model, its tokenizer, and loading Lambda layers."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from models.paths import DEFAULT_BUNDLE

if TYPE_CHECKING:  # Beam is imported only by the command that builds the parser.
    from apache_beam.options.pipeline_options import PipelineOptions

MODEL_HELP = (
    "Model bundle directory (from `python -m models.train`) or a .keras/.h5 file; local path or "
    "any Beam filesystem URI (gs://, s3://)."
)
TOKENIZER_HELP = (
    "Tokenizer for a bare .keras/.h5 model (a bundle carries its own): this package's "
    "tokenizer.json, a Keras 2 `Tokenizer.to_json()` file, or a vocabulary file with one token per "
    "line (id = line number, TextVectorization.get_vocabulary() order). 'none': the corpus fields "
    "already hold lists of token ids. Not needed for models that take raw strings "
    "(TextVectorization inside)."
)
UNSAFE_HELP = (
    "Load models with Lambda layers. Their Python code is stored in the model file and runs while "
    "it loads, on the launcher and on every worker: only for files you trust."
)


def add_model_flags(parser: argparse.ArgumentParser, positional_model: bool = False) -> None:
    """Adds the model, --tokenizer and --allow_unsafe_deserialization flags to an argparse parser.

    Args:
        parser: an `argparse.ArgumentParser` (or Beam's, in `ExportOptions`).
        positional_model: the model is a positional argument (inspect), or `--model` as the
            other commands take it (`model_option`), instead of `--model` defaulting to the bundled model.
    """
    if positional_model:
        parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
        # The other commands' spelling: `inspect --model X` said only "unrecognized arguments: --model".
        parser.add_argument(
            "--model", dest="model_option", default=None, metavar="MODEL", help="The same as MODEL."
        )
    else:
        parser.add_argument(
            "--model",
            default=DEFAULT_BUNDLE,
            help=MODEL_HELP + " Default: the bundled model trained on the sample corpus.",
        )
    parser.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    parser.add_argument(
        "--allow_unsafe_deserialization", action="store_true", default=False, help=UNSAFE_HELP
    )


def options_parser(
    options_class: type[PipelineOptions], prog: str, description: str | None
) -> argparse.ArgumentParser:
    """An argparse parser holding only `options_class`'s flags (a `PipelineOptions` subclass), for --help.

    Beam builds the parser of a PipelineOptions subclass itself; `get_all_options`
    with `current_only` hands it over without reaching into private methods.
    """
    captured: list[argparse.ArgumentParser] = []
    options_class([]).get_all_options(current_only=True, add_extra_args_fn=captured.append)
    # Beam's parser brings -h/--help with it.
    return argparse.ArgumentParser(parents=[captured[0]], add_help=False, prog=prog, description=description)
