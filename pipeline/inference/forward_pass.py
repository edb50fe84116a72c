"""Each column's forward pass: the fast path where it qualifies and matches Keras, else Keras's own.

The launch chooses and checks once; a worker in the same environment follows
that choice (`fast_path_environment`), one elsewhere checks again, and either
refuses to run another forward pass than the one the manifest records.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import typing
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from models.fast_path import KERAS, FastPath, ForwardPass, build_fast_path
from pipeline.errors import ExportConfigError
from pipeline.inference.sub_model import Features, SubModel
from pipeline.planning.plan import TEXT_INPUT
from pipeline.writing import schema as schema_lib
from pipeline.writing.real_tokens import RealTokens

if typing.TYPE_CHECKING:
    from pipeline.planning.plan import ExportPlan, InputInfo

FAST_PATH_TOLERANCE = 1e-5
# The forward pass of a column stored as token ids: none, the ids are the output.
NO_FORWARD_PASS = "none"

# Column -> its values: a numpy array, rows aligned with the batch, or a per-token column's `RealTokens`.
Outputs = dict[str, np.ndarray | RealTokens]
# `(column, engine, reason)` per column, as `ExportPlan.forward_passes` and the manifest hold them.
ForwardPassRecords = tuple[tuple[str, str, str], ...]


def verification_batch(
    inputs: Sequence[InputInfo], padding: str, vocabulary_size: int, rows: int = 48, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random ids of every length from 0 to the input length, per model input (`InputInfo`s).

    Rows alternate between the `padding` side and the other one, and some
    hold a padding id among their tokens, so that every way the fast path
    handles padding (skipped, run through, masked) is compared with Keras.
    A text input gets texts of one word and more, in the shape the model takes.
    The batch never has as many rows as an input has tokens, so that a layer that
    mistakes one axis for the other fails the check instead of passing it by chance.
    """
    while any(info.length == rows for info in inputs):
        rows += 1
    rng = np.random.default_rng(seed)
    batch = {}
    for info in inputs:
        if info.takes == TEXT_INPUT:
            texts = np.array([" ".join(["word"] * (1 + row % 8)) for row in range(rows)], dtype=object)
            batch[info.name] = texts.reshape((rows,) + (1,) * (info.rank - 1))
            continue
        ids = np.zeros((rows, info.length), dtype=np.int32)
        counts = np.linspace(0, info.length, rows).astype(int)
        for row, count in enumerate(counts):
            if not count:
                continue
            # Below this input's own smallest Embedding too (another input's may be smaller).
            limit = min(vocabulary_size, info.id_limit) if info.id_limit else vocabulary_size
            tokens = rng.integers(1, max(2, limit), count)
            if row % 5 == 4 and count > 2:
                tokens[count // 2] = 0
            pre = (padding == "pre") == (row % 2 == 0)
            if pre:
                ids[row, info.length - count :] = tokens
            else:
                ids[row, :count] = tokens
        batch[info.name] = ids
    return batch


def on_sample_batch(
    forward_pass: Callable[[Features], Mapping[str, np.ndarray]], batch: Features
) -> Mapping[str, np.ndarray]:
    """`forward_pass(batch)`, or one `ExportConfigError` line saying why Keras cannot run the model."""
    try:
        return forward_pass(batch)
    except Exception as error:  # Keras's own forward pass fails: so would every batch.
        hint = (
            " TensorFlow runs a layer only if its name is made of letters, digits and `_.-/>`: "
            "rename the layer and save the model again (Keras's own predict fails on it too)."
            if "not a valid scope name" in str(error)
            else ""
        )
        takes_text = any(np.asarray(values).dtype == object for values in batch.values())
        raise ExportConfigError(
            f"The model fails on a sample batch of {'texts' if takes_text else 'token ids'}: "
            f"{type(error).__name__}: "
            f"{_cause_line(error)}{hint}"
        ) from None


def max_difference(
    candidate: Callable[[Features], Mapping[str, np.ndarray]],
    reference: Callable[[Features], Mapping[str, np.ndarray]],
    features: Features,
) -> float:
    """Largest absolute difference between two forward passes over `features`.

    A NaN or infinity that only one of them gives counts as an infinite
    difference; the same one at the same place in both (a masked mean over a
    row of padding only is 0/0 in Keras too) counts as none.
    """
    expected = reference(features)
    actual = candidate(features)
    worst = 0.0
    for name, value in expected.items():
        want, got = np.asarray(value, np.float64), np.asarray(actual[name], np.float64)
        same = (want == got) | (np.isnan(want) & np.isnan(got))
        difference = np.where(same, 0.0, np.abs(want - got))
        worst = max(
            worst, float(np.max(difference, initial=0.0)) if not np.isnan(difference).any() else float("inf")
        )
    return worst


def forward_pass_identity(engine: str, reason: str) -> list[str]:
    """What a column's rows depend on of its forward pass: the engine, and what the fast path runs.

    Keras's own forward pass computes the same rows whatever made the launch choose it,
    and that reason can hold the difference the fast path showed on the launching
    machine, which another launcher measures otherwise: a resumed run compares this,
    not the reason (`--reuse` compares the engines alone).
    """
    return [engine] if engine == KERAS else [engine, reason]


def _cause_line(error: BaseException) -> str:
    """What went wrong in one line, without TensorFlow's frames and Keras's call arguments and colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    for index, line in enumerate(lines[:-1]):
        if "Exception encountered when calling" in line:  # Keras: the cause is the next line.
            return f"{line.split('Exception encountered when calling')[-1].strip()} {lines[index + 1]}"
    plain = [
        line
        for line in lines
        if not line.startswith(("in user code", "File ", "•", "Detected at node", "[["))
    ]
    if len(plain) > 1 and plain[0].endswith(":"):  # TensorFlow's "Graph execution error:" ... the cause last.
        return f"{plain[0]} {plain[-1]}"[:400]
    return plain[0] if plain else type(error).__name__


def onednn_enabled() -> bool:
    """Whether this process's TensorFlow runs its oneDNN kernels: `TF_ENABLE_ONEDNN_OPTS`, read at its import.

    They order some sums otherwise than TensorFlow's own kernels: with `TF_ENABLE_ONEDNN_OPTS=0`
    (which TensorFlow's start notice suggests) the fast path's rows differ in their last bits
    (2e-7 for the bundled model), so the rows of the two settings never share an export.
    """
    import tensorflow as tf  # noqa: F401  (imported first: it reads the variable)

    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # Another TensorFlow build: the variable as TensorFlow reads it.
        value = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower()
        return value not in ("0", "false") and platform.machine() in ("x86_64", "AMD64")


def onednn_text(enabled: bool) -> str:
    """A oneDNN setting as the environment variable that makes it."""
    return "on (TF_ENABLE_ONEDNN_OPTS unset or 1)" if enabled else "off (TF_ENABLE_ONEDNN_OPTS=0)"


def fast_path_environment() -> str:
    """Host, versions and oneDNN setting that compute a forward pass: where a fast path check holds."""
    import keras
    import tensorflow as tf

    return (
        f"{socket.gethostname()} {platform.machine()} tensorflow {tf.__version__} "
        f"keras {keras.__version__} numpy {np.__version__} onednn {onednn_enabled()}"
    )


class Predictor:
    """Computes a sub-model's columns with the forward pass chosen for each.

    The choice is made once, here: Keras's own (`--fast_path off`, or the fast
    path declined or differs from Keras), the fast path checked against Keras
    on a sample batch, or, where the launch checked it in this environment, the
    launch's choice as recorded in the plan.

    Args:
        plan: the `ExportPlan` built at launch.
        model: the plan's `SubModel`.
    """

    plan: ExportPlan
    model: SubModel
    # Columns stored as token ids: no forward pass.
    _id_passes: dict[str, ForwardPass]
    forward_passes: dict[str, ForwardPass]  # column -> which forward pass computes it, and why
    fast_path: FastPath | None  # None: Keras's forward pass computes every column
    # On the fast path: Embedding columns taken from their tables at the real tokens, the rest.
    _tables: dict[str, tuple[str, np.ndarray]]
    _dense_columns: tuple[str, ...]
    _real_token_inputs: dict[str, str]

    def __init__(self, plan: ExportPlan, model: SubModel) -> None:
        self.plan = plan
        self.model = model
        self._id_passes = {
            column.column: ForwardPass(
                NO_FORWARD_PASS, "stored as token ids and a table (--token_storage ids)"
            )
            for column in plan.columns
            if column.token_storage == schema_lib.TOKEN_STORAGE_IDS
        }
        self.forward_passes = dict(self._id_passes)
        self.fast_path = None
        self._tables, self._dense_columns, self._real_token_inputs = {}, (), {}
        if model.keras_model is None:
            return
        if plan.fast_path != "auto":
            self._keras_only(f"--fast_path {plan.fast_path}")
            self._check_keras_runs()
        elif self._launch_checked():
            self.fast_path = self._follow_launch()
        else:
            self.fast_path = self._choose_fast_path()
        self._check_launch_decision()

    def predict(self, features: Features) -> Outputs:
        """Runs the sub-model on {input name: int32 ids}; returns {column: numpy array or RealTokens}.

        On the fast path an Embedding's column is `RealTokens`: its table
        and the real tokens' ids, never the padded (n, length, dim) lookup.
        Columns stored as token ids are not computed, so they are absent.
        """
        if self.fast_path is None:
            return dict(self.model.keras_predict(features))
        return self._fast_outputs(self.fast_path, self.model.model_features(features), wrap=True)

    def _fast_outputs(self, fast: FastPath, features: Features, wrap: bool) -> Outputs:
        """The fast path's columns, each per-token one at the real tokens only.

        Embedding columns come from their tables, per-token recurrent columns
        from `real_tokens=True`: as `RealTokens` with `wrap`, else as the
        real tokens' (tokens, dim) values; the others as the sub-model gives them.
        """
        arrays = fast(features, self._dense_columns, real_tokens=True) if self._dense_columns else {}
        outputs: Outputs = dict(arrays)
        for column, input_name in self._real_token_inputs.items():
            if column in arrays and wrap:
                real = features[input_name] != 0
                values = arrays[column]
                outputs[column] = RealTokens(values, np.arange(len(values)), real.sum(axis=1))
        for column, (input_name, table) in self._tables.items():
            ids = features[input_name]
            outputs[column] = RealTokens.lookup(table, ids) if wrap else table[ids[ids != 0]]
        return outputs

    @property
    def uses_fast_path(self) -> bool:
        """Whether the fast path computes some column."""
        return self.fast_path is not None

    def _keras_only(self, reason: str) -> None:
        self.forward_passes = {
            **self._id_passes,
            **{column: ForwardPass(KERAS, reason) for column in self.model.computed_columns},
        }
        self._tables, self._dense_columns, self._real_token_inputs = {}, (), {}

    def _choose_fast_path(self) -> FastPath | None:
        """The exact fast path if the model qualifies and matches Keras on a sample batch.

        Sets `forward_passes`: for each column, which forward pass computes it and why.
        """
        choice = build_fast_path(self.model.keras_model)
        fast = choice.fast_path
        if fast is None:
            logging.info("Fast path off (%s); using Keras's forward pass.", choice.reason)
            self._keras_only(choice.reason)
            self._check_keras_runs()
            return None
        passes = choice.forward_passes
        batch = self.model.model_features(
            verification_batch(self.plan.inputs, self.plan.padding, fast.vocabulary_size)
        )
        self._use_fast_path(fast, passes)
        real_token_inputs = {**self._real_token_inputs, **{c: name for c, (name, _) in self._tables.items()}}

        def reference(features: Features) -> dict[str, np.ndarray]:
            # Keras's outputs at the positions the fast path computes: real tokens only for its
            # real-token columns (the rows of a per-token column are only those).
            outputs = self.model.keras_predict(features)
            for column, name in real_token_inputs.items():
                outputs[column] = outputs[column][features[name] != 0]
            return outputs

        def candidate(features: Features) -> dict[str, np.ndarray]:
            # Unwrapped (`wrap=False`), every output is an array.
            return typing.cast(dict[str, np.ndarray], self._fast_outputs(fast, features, wrap=False))

        expected = on_sample_batch(reference, batch)
        try:
            # Traced as the batches will run it: the in-memory runner reuses this trace.
            worst = max_difference(candidate, lambda _: expected, batch)
        except Exception as error:  # A Keras layer the hybrid pass cannot feed (a mask it does not fit).
            worst, failure = float("inf"), f"{type(error).__name__}: {_cause_line(error)}"
        else:
            failure = ""
        if not worst <= FAST_PATH_TOLERANCE:
            reason = (
                f"the fast path fails on a sample batch ({failure})"
                if failure
                else f"the fast path differs from Keras by {worst:.3g} (> {FAST_PATH_TOLERANCE:g}) "
                "on a sample batch"
            )
            logging.warning("Fast path off: %s; using Keras's forward pass.", reason)
            self._keras_only(reason)
            return None
        for column, forward_pass in passes.items():
            logging.info("Fast path on for %s: %s: %s.", column, forward_pass.engine, forward_pass.reason)
        logging.info("Fast path checked against Keras on a sample batch: max |diff| %.2g.", worst)
        return fast

    def _check_keras_runs(self) -> None:
        """At launch, Keras's forward pass on a sample batch: a model that fails there fails every batch.

        Workers (the plan records the launch's forward passes) do not repeat it.
        """
        if self.plan.forward_passes:
            return
        # Id 1 only: below every input's Embedding size, whatever the model's vocabulary.
        batch = self.model.model_features(verification_batch(self.plan.inputs, self.plan.padding, 2))
        on_sample_batch(self.model.keras_predict, batch)

    def _launch_checked(self) -> bool:
        """Whether the launch checked the fast path in this environment (same host and versions)."""
        return bool(self.plan.forward_passes) and self.plan.fast_path_checked_on == fast_path_environment()

    def _follow_launch(self) -> FastPath | None:
        """The fast path as the launch chose it, without checking it against Keras again.

        The launch checked this model (same SHA-256) with the same code and
        libraries on this host, so the check would give the same answer.
        """
        recorded = {
            column: ForwardPass(engine, reason) for column, engine, reason in self.plan.forward_passes
        }
        computed = self.model.computed_columns
        if all(recorded[column].engine == KERAS for column in computed if column in recorded):
            self.forward_passes = {**self._id_passes, **recorded}
            return None
        choice = build_fast_path(self.model.keras_model)
        fast = choice.fast_path
        if fast is None:
            raise ExportConfigError(
                f"The launch chose the fast path, but this worker cannot build it ({choice.reason}); "
                "rerun the export."
            )
        self._use_fast_path(fast, choice.forward_passes)
        return fast

    def _use_fast_path(self, fast: FastPath, passes: Mapping[str, ForwardPass]) -> None:
        self.forward_passes = {**self._id_passes, **passes}
        self._tables = fast.embedding_tables()
        self._real_token_inputs = fast.real_token_columns()
        self._dense_columns = tuple(
            column for column in self.model.computed_columns if column not in self._tables
        )

    def _check_launch_decision(self) -> None:
        """Refuses to run columns with another forward pass than the launcher recorded for the manifest.

        Or with the other oneDNN setting (a Dataflow worker's environment is its image's, not the
        launcher's): its rows would differ in their last bits from what the manifest says.
        """
        if self.plan.onednn is not None and self.plan.onednn != onednn_enabled():
            raise ExportConfigError(
                f"This worker's TensorFlow runs with oneDNN {onednn_text(onednn_enabled())}, the launcher's "
                f"with oneDNN {onednn_text(self.plan.onednn)}, and the setting changes the last bits of some "
                "rows: set TF_ENABLE_ONEDNN_OPTS alike for the launcher and the workers, then rerun."
            )
        recorded = {column: engine for column, engine, _ in self.plan.forward_passes}
        mine = {column: forward_pass.engine for column, forward_pass in self.forward_passes.items()}
        if recorded and recorded != mine:
            raise ExportConfigError(
                f"This worker chose the forward passes {mine}, but the launcher chose {recorded} and "
                "the manifest records those; rerun with --fast_path off."
            )

    def records(self) -> ForwardPassRecords:
        """`(column, engine, reason)` per column, as `plan.forward_passes` and the manifest hold them."""
        return tuple((column, p.engine, p.reason) for column, p in self.forward_passes.items())
