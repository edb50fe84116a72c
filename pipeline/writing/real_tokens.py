"""Per-token values at the real tokens only (`RealTokens`), and pooling them into one vector per document."""

from __future__ import annotations

import typing
from collections.abc import Sequence

import numpy as np


class RealTokens(typing.NamedTuple):
    """A per-token column at its documents' real tokens only, without the padding.

    Real token `t` of the batch is `rows[row_index[t]]`; each document's tokens are
    consecutive and in document order, `counts[i]` of them for row `i`.  An
    Embedding column is its table and the real tokens' ids (`lookup`), so
    neither the padded (documents, positions, dim) tensor nor even the real
    tokens' vectors need to be built to pool them.
    """

    rows: np.ndarray  # (any, dim)
    # (real tokens,) int: row of `rows` of each real token (not `index`, which would hide tuple.index).
    row_index: np.ndarray
    counts: np.ndarray  # (documents,) int: real tokens per document

    @classmethod
    def lookup(cls, table: np.ndarray, ids: np.ndarray) -> RealTokens:
        """The rows of `table` at the real (non-zero) token ids of `ids` (documents, positions).

        Raises:
            IndexError: an id outside the table (the forward pass would fail on it too).
        """
        ids = np.asarray(ids)
        mask = ids != 0
        index = ids[mask].astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(table)):
            raise IndexError(f"token ids must be in [0, {len(table)}); received {index.min()}..{index.max()}")
        return cls(table, index, mask.sum(axis=1))

    @classmethod
    def of_padded(cls, values: np.ndarray, mask: np.ndarray) -> RealTokens:
        """The real tokens marked in `mask` (documents, positions) of padded `values` (.., .., dim)."""
        values = np.asarray(values)
        return cls(values.reshape(-1, values.shape[-1]), np.flatnonzero(mask), mask.sum(axis=1))

    def vectors(self) -> np.ndarray:
        """(real tokens, dim): every real token's vector, documents in row order."""
        # np.take copies whole rows; fancy indexing was 4x slower on (4000, 300) float32 tables.
        return np.take(self.rows, self.row_index, axis=0)


def concatenate_real_tokens(parts: Sequence[RealTokens]) -> RealTokens:
    """One `RealTokens` of several batches' (their documents in order)."""
    if all(part.rows is parts[0].rows for part in parts):
        rows, indexes = parts[0].rows, [part.row_index for part in parts]
    else:
        starts = np.cumsum([0] + [len(part.rows) for part in parts[:-1]])
        rows = np.concatenate([part.rows for part in parts])
        indexes = [part.row_index + start for part, start in zip(parts, starts, strict=True)]
    return RealTokens(rows, np.concatenate(indexes), np.concatenate([part.counts for part in parts]))


def pool_real_tokens(tokens: RealTokens, pooling: str) -> np.ndarray:
    """Pools each document's real tokens (`RealTokens`) into one (documents, dim) vector.

    The mean adds a document's tokens one after the other in document order,
    in the rows' dtype, so it is bit for bit the sum over the padded positions
    with the padding weighted 0 that `schema` computed before (whose padding
    only ever added zeros).  Work is proportional to the real tokens.  Values
    narrower than float32 (a mixed-precision model's) are pooled in float32.

    A row with no real token (an empty title beside a non-empty content) pools to
    a zero vector whatever the pooling, as an empty mean does: not -inf (max) nor
    the padding position's vector (last).  Parquet cannot hold a null
    fixed-size list that pyarrow reads back (apache/arrow#35692), so zeros it is.
    """
    if pooling not in ("mean", "max", "last"):
        raise ValueError(f"Unknown pooling {pooling!r}; expected mean, max or last.")
    rows, index = tokens.rows, tokens.row_index
    if rows.dtype.itemsize < 4:
        # A mixed-precision model's float16 (or bfloat16) values: summed in float16, a mean of
        # values of 1,000 overflows and ordinary ones lose three digits. Pooled in float32.
        rows = rows.astype(np.float32)
    counts = np.asarray(tokens.counts, dtype=np.int64)
    pooled = np.zeros((len(counts), rows.shape[1]), dtype=rows.dtype)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if pooling == "last":
        real = np.flatnonzero(counts)
        pooled[real] = np.take(rows, index[starts[real] + counts[real] - 1], axis=0)
        return pooled
    # Documents longest first, so the documents that still have a k-th token are a prefix.
    order = np.argsort(-counts, kind="stable")
    counts, starts = counts[order], starts[order]
    combine = np.add if pooling == "mean" else np.maximum
    for k in range(int(counts[0]) if len(counts) else 0):
        active = int(np.searchsorted(-counts, -k, side="left"))
        token_rows = np.take(rows, index[starts[:active] + k], axis=0)
        if k == 0:
            pooled[:active] = token_rows
        else:
            combine(pooled[:active], token_rows, out=pooled[:active])
    if pooling == "mean":
        pooled /= np.maximum(counts, 1).astype(rows.dtype)[:, None]
    restored = np.empty_like(pooled)
    restored[order] = pooled
    return restored


def pool_sequence(values: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """Pools (n, tokens, dim) `values` over the real tokens marked in `mask` (n, tokens)."""
    return pool_real_tokens(RealTokens.of_padded(values, mask), pooling)
