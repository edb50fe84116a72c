"""The 2-D PCA projection of a vector column, drawn as a PNG coloured by a label."""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from pipeline.analysis.answer_file import write_answer
from pipeline.analysis.dataset import (
    DEFAULT_SAMPLE,
    DEFAULT_SEED,
    AnalysisError,
    VectorDataset,
    sample_vectors,
)

# Beyond this many label values the smallest share one "other" colour.
MAX_PLOT_CLASSES = 20
# The refusal of `plot` where matplotlib is missing: a plain `pip install .` has no [analysis] extra.
MATPLOTLIB_MISSING = (
    "plot draws with matplotlib, which is not installed in this Python environment; install it with "
    "pip install 'embexport[analysis]' (or pip install matplotlib), then run the command again."
)
OTHER_LABEL = "(other)"
MISSING_LABEL = "(missing)"


class Plotted(NamedTuple):
    """What `plot_pca` drew: the file, the rows plotted of how many, and each axis's share of variance."""

    path: str
    rows: int
    total: int
    explained: np.ndarray


def project_pca(vectors: np.ndarray, components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Projects rows onto their first principal components.

    Returns:
        `(points, explained)`: an (n, components) array and the fraction of the
        total variance each component explains.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape[0] < 2 or vectors.shape[1] < components:
        raise AnalysisError(
            f"PCA to {components} components needs at least 2 rows and {components} dimensions; "
            f"received {vectors.shape[0]} rows of {vectors.shape[1]} values."
        )
    centered = vectors - vectors.mean(axis=0)
    # The covariance is dim x dim, small next to the rows, so eigh is cheaper than an SVD of the data.
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered)
    order = np.argsort(eigenvalues)[::-1][:components]
    basis = eigenvectors[:, order].T
    # Eigenvectors have no inherent sign; fixing it makes reruns draw the same picture.
    signs = np.sign(basis[np.arange(components), np.abs(basis).argmax(axis=1)])
    basis *= signs[:, None]
    total = np.clip(eigenvalues, 0, None).sum()
    explained = np.clip(eigenvalues[order], 0, None) / total if total > 0 else np.zeros(components)
    return centered @ basis.T, explained


def _plot_groups(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """Label values to draw, most frequent first; beyond MAX_PLOT_CLASSES the rest become "other"."""
    counts = collections.Counter(labels)
    ranked = [name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    if len(ranked) <= MAX_PLOT_CLASSES:
        return ranked, list(labels)
    shown = set(ranked[: MAX_PLOT_CLASSES - 1])
    return ranked[: MAX_PLOT_CLASSES - 1] + [OTHER_LABEL], [x if x in shown else OTHER_LABEL for x in labels]


def literal(text: str) -> str:
    """`text` as matplotlib draws it literally: a label value (or a path) holding two `$` is mathtext to
    it, drawn as a formula without the `$` ("$5 to $10"), or a ValueError when it does not parse."""
    return text.replace("$", r"\$")


def plot_projection(
    points: np.ndarray,
    labels: Sequence[str] | None,
    path: str,
    title: str,
    axis_labels: Sequence[str],
    legend_title: str | None = None,
    overwrite: bool = True,
) -> str:
    """Draws 2-D `points` coloured by `labels` (or one colour if None) into a PNG at `path`."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AnalysisError(MATPLOTLIB_MISSING) from None
    figure = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    if labels is None:
        axes.scatter(points[:, 0], points[:, 1], s=8, alpha=0.6, linewidths=0)
    else:
        groups, grouped = _plot_groups(labels)
        values = np.asarray(grouped, dtype=object)
        colours = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
        handles, names = [], []
        for index, group in enumerate(groups):
            mask = values == group
            colour = "lightgrey" if group == OTHER_LABEL else colours(index)
            handles.append(
                axes.scatter(points[mask, 0], points[mask, 1], s=8, alpha=0.6, linewidths=0, color=colour)
            )
            names.append(literal(f"{group} ({int(mask.sum())})"))
        # Handles and names given explicitly: matplotlib leaves out of an automatic legend every
        # label that starts with "_" (fastText's "__label__sports"), which would leave it empty.
        axes.legend(
            handles,
            names,
            title=None if legend_title is None else literal(legend_title),
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            markerscale=2.5,
            fontsize="small",
            frameon=False,
        )
    axes.set_title(literal(title))
    axes.set_xlabel(literal(axis_labels[0]))
    axes.set_ylabel(literal(axis_labels[1]))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    # As batch answers are: whole or not at all, locally or on object storage.
    extension = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    write_answer(path, lambda sink: figure.savefig(sink, format=extension), overwrite)
    return path


def plot_pca(
    data: VectorDataset,
    column: str | None,
    label: str | None,
    path: str,
    sample: int = DEFAULT_SAMPLE,
    seed: int = DEFAULT_SEED,
    overwrite: bool = True,
) -> Plotted:
    """Samples rows, projects `column` with PCA and writes a PNG coloured by `label`.

    Returns:
        A `Plotted`: the file, rows plotted, total rows and explained variance fractions.
    """
    drawn = sample_vectors(data, column, label, sample, seed)
    column, total, rows = drawn.column, drawn.total, len(drawn.vectors)
    if rows < 2 <= total:
        # The sample is what is short, not the export: say so, or "received 1 rows" reads as the export's.
        raise AnalysisError(
            f"plot needs at least 2 rows; the sample holds {rows} of the {total} usable rows of {column!r}. "
            "Raise --sample to 2 or more."
        )
    points, explained = project_pca(drawn.vectors)
    labels = None
    if drawn.labels is not None:
        labels = [MISSING_LABEL if value is None else value for value in drawn.labels]
    shown = f"{total} rows" if rows == total else f"random sample of {rows} of {total} rows"
    title = f"PCA of {column}" + (f" coloured by {label}" if label else "") + f"\n{data.location} ({shown})"
    axis_labels = [f"PC{i + 1} ({fraction:.1%} of variance)" for i, fraction in enumerate(explained)]
    plot_projection(points, labels, path, title, axis_labels, legend_title=label, overwrite=overwrite)
    return Plotted(path, rows, total, explained)
