"""Reconstruction fidelity of an SAE: pooled variance explained, L0, and bootstrap intervals
(a studentized bootstrap over questions for variance explained).

All sums run over row chunks in float64, so a memory-mapped [N, d] float16/float32 array is read
once per pass and never copied whole.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

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


NOMINAL_BELOW_CLUSTERS = 30  # fewer resampled questions than this: an interval's coverage is below 93%


@dataclass(frozen=True)
class QuestionSums:
    """Variance explained's sums per question (cluster): rows, squared error, squared deviation about
    the overall mean m, and the deviations' sum [G, d]. With multiplicities w over questions, the pooled
    SST is w.sq_dev - ||w.dev_sum||^2 / w.rows (the shift from m to the weighted mean), so any resample
    or leave-one-out needs only these."""

    rows: np.ndarray
    sq_err: np.ndarray
    sq_dev: np.ndarray
    dev_sum: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, x_hat: np.ndarray, groups: np.ndarray) -> QuestionSums:
        _, question = np.unique(groups, return_inverse=True)
        question = question.reshape(len(x))
        n_questions = int(question.max()) + 1
        mean = _column_mean(x)
        dev_sum = torch.zeros(n_questions, x.shape[1], dtype=torch.float64)
        for rows in _row_chunks(len(x)):
            dev_sum.index_add_(0, torch.from_numpy(question[rows]), torch.from_numpy(x[rows].astype(np.float64) - mean))
        return cls(np.bincount(question, minlength=n_questions).astype(np.float64),
                   np.bincount(question, weights=_row_sq_dist(x, x_hat), minlength=n_questions),
                   np.bincount(question, weights=_row_sq_dist(x, mean), minlength=n_questions), dev_sum.numpy())

    def resampled(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(VE [B], jackknife standard error [B]) for question multiplicities weights [B, G]: the
        jackknife leaves out one drawn question at a time, (M - 1) / M x sum of squared deviations."""
        rows, sq_err, sq_dev = weights @ self.rows, weights @ self.sq_err, weights @ self.sq_dev
        dev = weights @ self.dev_sum  # [B, d]
        dev_sq = np.einsum("bj,bj->b", dev, dev)
        ve = _ve(sq_err, sq_dev - dev_sq / rows)
        # Leaving out question g once: ||S - s_g||^2 = ||S||^2 - 2 S.s_g + ||s_g||^2.
        own_sq = np.einsum("gj,gj->g", self.dev_sum, self.dev_sum)
        loo_rows = rows[:, None] - self.rows
        loo_dev_sq = dev_sq[:, None] - 2 * dev @ self.dev_sum.T + own_sq
        with np.errstate(divide="ignore", invalid="ignore"):
            loo = _ve(sq_err[:, None] - self.sq_err, sq_dev[:, None] - self.sq_dev - loo_dev_sq / loo_rows)
        return ve, jackknife_se(loo, weights)


def jackknife_se(left_out: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B] jackknife standard errors over the M drawn clusters of each replicate: left_out [B, G] is
    the statistic without one copy of cluster g, counted as often as g was drawn (weights [B, G]);
    se^2 = (M - 1) / M x the sum over draws of (left_out - their mean)^2."""
    drawn = weights.sum(axis=1)
    left_out = np.where(weights > 0, left_out, 0.0)
    centre = (weights * left_out).sum(axis=1) / drawn
    return np.sqrt((drawn - 1) / drawn * (weights * (left_out - centre[:, None]) ** 2).sum(axis=1))


def question_weights(rng: np.random.Generator, n_questions: int, n_boot: int) -> Iterator[np.ndarray]:
    """Batches of cluster-bootstrap multiplicities [b, G]: each row draws the G questions with
    replacement, rng.integers(0, G, G) after rng.integers(0, G, G)."""
    for first in range(0, n_boot, _BOOT_BATCH):
        draws = rng.integers(0, n_questions, (min(_BOOT_BATCH, n_boot - first), n_questions))
        yield np.stack([np.bincount(row, minlength=n_questions) for row in draws]).astype(np.float64)


@dataclass(frozen=True)
class _BootstrapT:
    """One statistic with its jackknife se on all questions, and its (values [b], se [b]) per batch of
    question-bootstrap replicates."""

    estimate: float
    se: float
    replicates: list[tuple[np.ndarray, np.ndarray]]

    def interval(self, alpha: float) -> tuple[float, float] | None:
        values, errors = (np.concatenate(part) for part in zip(*self.replicates))
        return studentized_interval(self.estimate, self.se, values, errors, alpha=alpha)


_WithSE = Callable[[np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]  # weights [b, G] -> name: (values, se)


def _question_bootstrap(n_questions: int, with_se: _WithSE, *, n_boot: int, seed: int) -> dict[str, _BootstrapT]:
    """Each statistic of with_se on all questions (weights 1) and on n_boot replicates drawn by question_weights."""
    if n_questions < 2:
        raise ValueError("an interval over questions needs at least 2 questions")
    estimates = with_se(np.ones((1, n_questions)))
    replicates: dict[str, list] = {name: [] for name in estimates}
    for weights in question_weights(np.random.default_rng(seed), n_questions, n_boot):
        for name, pair in with_se(weights).items():
            replicates[name].append(pair)
    return {name: _BootstrapT(estimate, se, replicates[name]) for name, ((estimate,), (se,)) in estimates.items()}


def ratio_bootstrap_t(sums: np.ndarray, statistics: Callable[[np.ndarray], dict[str, np.ndarray]], *,
                      n_boot: int, seed: int, alpha: float = DEFAULT_ALPHA) -> dict[str, tuple[float, float] | None]:
    """Studentized question-bootstrap interval of each statistic of the totals of per-question sums
    [G, k] (`statistics` maps totals [..., k] to named arrays [...]), as variance_explained_ci: each
    replicate's standard error is the jackknife over its drawn questions. None for a statistic that is
    undefined on all the data; non-finite replicates are left out."""

    def with_se(weights: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        totals = weights @ sums  # [b, k]
        left_out = statistics(totals[:, None, :] - sums[None, :, :])  # one copy of each question less
        with np.errstate(invalid="ignore"):
            return {name: (value, jackknife_se(left_out[name], weights)) for name, value in statistics(totals).items()}

    boot = _question_bootstrap(len(sums), with_se, n_boot=n_boot, seed=seed)
    return {name: b.interval(alpha) if np.isfinite(b.estimate) and np.isfinite(b.se) else None
            for name, b in boot.items()}


def _ve(sq_err: np.ndarray, sq_dev: np.ndarray) -> np.ndarray:
    return 1.0 - sq_err / sq_dev


def studentized_interval(estimate: float, se: float, replicates: np.ndarray, replicate_se: np.ndarray, *,
                         alpha: float) -> tuple[float, float] | None:
    """Bootstrap-t interval: estimate - t*_(1 - alpha/2) se .. estimate - t*_(alpha/2) se, with t* the
    replicates' (replicate - estimate) / replicate_se (replicates without a finite, positive se left out;
    None when none is left: the data have no spread to resample)."""
    usable = np.isfinite(replicates) & np.isfinite(replicate_se) & (replicate_se > 0)
    if not usable.any():
        return None
    t = (replicates[usable] - estimate) / replicate_se[usable]
    low_t, high_t = np.quantile(t, [alpha / 2, 1 - alpha / 2])
    return float(estimate - high_t * se), float(estimate - low_t * se)


def variance_explained_ci(
    x: np.ndarray,
    x_hat: np.ndarray,
    groups: np.ndarray,
    *,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
) -> tuple[float, float] | None:
    """Studentized (bootstrap-t) interval of variance_explained, resampling whole questions (`groups`
    [N]: each row's question, since tokens of one rollout or question are not independent).

    Each replicate draws the G questions with replacement; the estimate's
    and every replicate's standard error is the jackknife over its drawn questions (QuestionSums), and
    the interval inverts the replicates' t statistics, which follows the skew of a ratio over few
    clusters better than the percentiles do. Needs at least 2 questions; at fewer than
    NOMINAL_BELOW_CLUSTERS its coverage is below the nominal level (tests/test_coverage.py).
    """
    x, x_hat = np.asarray(x), np.asarray(x_hat)
    _check_pair(x, x_hat)
    _check_boot(n_boot, alpha)
    if np.shape(groups) != (len(x),):
        raise ValueError(f"groups must have one entry per row ({len(x)}), got shape {np.shape(groups)}")
    return question_bootstrap_t(QuestionSums.of(x, x_hat, groups), n_boot=n_boot, seed=seed, alpha=alpha)


def question_bootstrap_t(sums: QuestionSums, *, n_boot: int, seed: int, alpha: float) -> tuple[float, float] | None:
    """variance_explained_ci's interval from the per-question sums."""
    boot = _question_bootstrap(len(sums.rows), lambda weights: {"ve": sums.resampled(weights)},
                               n_boot=n_boot, seed=seed)
    interval = boot["ve"].interval(alpha)
    if interval is None:
        return None
    return interval[0], min(interval[1], 1.0)  # no reconstruction explains more than all the variance
