"""Statistics for the evaluation summary (numpy only, pure functions).

Scores are per problem (1-D, one sample each) or ``[problems, k samples]`` (2-D). Samples of
one problem are correlated (same question), so uncertainty is estimated by resampling
problems, never individual samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _scores_2d(values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [problems] or [problems, k] array, not shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinity")
    return arr


def bootstrap_ci(
    values, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval ``(mean, low, high)``.

    ``values`` is ``[problems]`` or ``[problems, k]``; rows (problems) are resampled with
    replacement and the statistic is the mean over all entries of the resampled rows.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    arr = _scores_2d(values)
    # Every row has k entries, so the mean over entries of resampled rows is the mean of
    # their row means: resample the row means.
    row_means = arr.mean(axis=1)
    n = row_means.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    stats = row_means[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(arr.mean()), float(low), float(high)


def pass_at_1(scores_2d) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over the k columns of per-column accuracy.

    Each column is one full pass over the problems (one sample per problem). With a single
    column the spread is undefined and the sd is NaN.
    """
    arr = _scores_2d(scores_2d)
    per_column = arr.mean(axis=0)
    sd = float(per_column.std(ddof=1)) if per_column.size > 1 else float("nan")
    return float(per_column.mean()), sd


def token_entropy(traces: Sequence[Sequence[int]], vocab_size: int) -> float:
    """Entropy in nats of the token distribution pooled over all traces.

    Token ids must lie in ``[0, vocab_size)`` (e.g. indices into the 64 abstract tokens, for
    which the maximum is ln 64 = 4.16 nats). NaN when there are no tokens at all.
    """
    parts = [np.asarray(t, dtype=np.int64).reshape(-1) for t in traces]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if tokens.size == 0:
        return float("nan")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    counts = np.bincount(tokens, minlength=vocab_size)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


def distinct_count(traces: Sequence[Sequence[int]]) -> int:
    """Number of distinct traces (as exact token sequences)."""
    return len({tuple(int(x) for x in t) for t in traces})


def length_histogram(lengths, bins) -> dict:
    """Histogram of lengths with numpy semantics (half-open bins, the last one closed).

    ``bins`` is a number of equal-width bins or a sequence of edges. Returns
    ``{"edges": [...], "counts": [...], "n": int}`` (plain Python numbers, JSON-ready);
    ``n`` counts every length, including any outside explicit edges (those are not binned).
    """
    arr = np.asarray(lengths, dtype=np.float64).reshape(-1)
    counts, edges = np.histogram(arr, bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "n": int(arr.size)}
