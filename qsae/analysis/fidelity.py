"""Reconstruction fidelity of an SAE: pooled variance explained, L0, and bootstrap intervals.

All sums run over row chunks in float64, so a memory-mapped [N, d] float16/float32 array is read
once per pass and never copied whole.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

DEFAULT_ALPHA = 0.05  # two-sided percentile interval: 1 - alpha coverage
_CHUNK_ROWS = 8192
_BOOT_BATCH = 32  # bootstrap replicates evaluated per pass over the rows


def _row_chunks(n_rows: int) -> Iterator[slice]:
    return (slice(start, min(start + _CHUNK_ROWS, n_rows)) for start in range(0, n_rows, _CHUNK_ROWS))


def _check_pair(x: np.ndarray, x_hat: np.ndarray) -> None:
    if x.ndim != 2 or x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must be 2-D arrays of equal shape, got {x.shape} and {x_hat.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"variance explained needs at least 2 rows, got {x.shape[0]}")


def _column_mean(x: np.ndarray) -> np.ndarray:
    total = np.zeros(x.shape[1], dtype=np.float64)
    for rows in _row_chunks(len(x)):
        total += x[rows].sum(axis=0, dtype=np.float64)
    return total / len(x)


def _row_sq_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """||x_i - y_i||^2 per row in float64; y is [N, d] or one [d] vector for every row."""
    out = np.empty(len(x), dtype=np.float64)
    for rows in _row_chunks(len(x)):
        other = y if y.ndim == 1 else y[rows]
        diff = x[rows].astype(np.float64) - other
        out[rows] = np.einsum("ij,ij->i", diff, diff)
    return out


def _ratio(sq_err: float, sq_dev: float) -> float:
    if not np.isfinite(sq_err) or not np.isfinite(sq_dev):
        raise ValueError("x or x_hat contains NaN or inf")
    if sq_dev == 0:
        raise ValueError("variance explained undefined: x has zero variance")
    return 1.0 - sq_err / sq_dev


def variance_explained(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Pooled variance explained: 1 - sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean(x)||^2.

    mean(x) is the mean row; both sums run over all rows and dimensions (pooled, not averaged per
    dimension), accumulated in float64. 1 is perfect reconstruction, 0 is no better than the mean row.
    """
    x, x_hat = np.asarray(x), np.asarray(x_hat)
    _check_pair(x, x_hat)
    return _ratio(_row_sq_dist(x, x_hat).sum(), _row_sq_dist(x, _column_mean(x)).sum())


def mean_l0(values: np.ndarray) -> float:
    """Mean number of firing features (activation > 0) per row of top-k `values` [N, k]."""
    values = np.asarray(values)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"values must be a non-empty [N, k] array, got shape {values.shape}")
    return float((values > 0).sum(axis=1).mean())


def _percentile_interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _check_boot(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def bootstrap_ci(
    stat_fn: Callable[..., float],
    *arrays: np.ndarray,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
) -> tuple[float, float]:
    """Row-bootstrap percentile interval of stat_fn(*arrays).

    Every replicate resamples the same N row indices with replacement from all arrays (which must
    share their first dimension) and evaluates stat_fn on them. Each replicate copies the resampled
    rows; for variance explained on large arrays use `variance_explained_ci`, which is equal and streams.
    """
    _check_boot(n_boot, alpha)
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    arrays = tuple(np.asarray(a) for a in arrays)
    n_rows = len(arrays[0])
    if n_rows == 0 or any(len(a) != n_rows for a in arrays):
        raise ValueError(f"arrays must be non-empty with equal row counts, got {[len(a) for a in arrays]}")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        rows = rng.integers(0, n_rows, n_rows)
        stats.append(stat_fn(*(a[rows] for a in arrays)))
    return _percentile_interval(np.asarray(stats, dtype=np.float64), alpha)


def cluster_resample_counts(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How many times each row appears in one cluster-bootstrap replicate: the G distinct groups
    (np.unique order) are drawn G times with replacement, rng.integers(0, G, G), and a row appears as
    often as its group was drawn."""
    _, group_of_row = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_row.max()) + 1
    return np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[group_of_row]


def variance_explained_ci(
    x: np.ndarray,
    x_hat: np.ndarray,
    *,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile interval of variance_explained under a bootstrap that resamples whole groups of rows
    (`groups` [N]: e.g. each row's question, since tokens of one rollout are not independent), or single
    rows when groups is None (then the same resamples as bootstrap_ci for the same seed).

    No resampled row is copied: with row multiplicities c_i (sum M), the resampled mean is
    m* = m + delta, delta = sum_i c_i (x_i - m) / M, and sum_i c_i ||x_i - m*||^2 =
    sum_i c_i ||x_i - m||^2 - M ||delta||^2, so each replicate needs only per-row squared norms and one
    weighted row sum (a matrix product over row chunks).
    """
    x, x_hat = np.asarray(x), np.asarray(x_hat)
    _check_pair(x, x_hat)
    _check_boot(n_boot, alpha)
    n_rows = len(x)
    if groups is not None and np.shape(groups) != (n_rows,):
        raise ValueError(f"groups must have one entry per row ({n_rows}), got shape {np.shape(groups)}")
    mean = _column_mean(x)
    sq_err, sq_dev = _row_sq_dist(x, x_hat), _row_sq_dist(x, mean)
    rng = np.random.default_rng(seed)

    def replicate_counts() -> np.ndarray:
        if groups is None:
            return np.bincount(rng.integers(0, n_rows, n_rows), minlength=n_rows)
        return cluster_resample_counts(groups, rng)

    stats = []
    for first in range(0, n_boot, _BOOT_BATCH):
        batch = min(_BOOT_BATCH, n_boot - first)
        counts = np.stack([replicate_counts() for _ in range(batch)]).astype(np.float64)
        total = counts.sum(axis=1)
        delta = np.zeros((batch, x.shape[1]), dtype=np.float64)
        for rows in _row_chunks(n_rows):
            delta += counts[:, rows] @ (x[rows].astype(np.float64) - mean)
        delta /= total[:, None]
        sse = counts @ sq_err
        sst = counts @ sq_dev - total * np.einsum("bj,bj->b", delta, delta)
        stats.extend(_ratio(e, t) for e, t in zip(sse, sst))
    return _percentile_interval(np.asarray(stats), alpha)
