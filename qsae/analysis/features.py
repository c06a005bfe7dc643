"""Per-feature statistics from sparse top-k codes: fire rates, feature health, correctness AUROC.

Codes arrive as the SAE produces them: `values [N, k]` (>= 0, 0 = not firing) and
`indices [N, k]` (feature ids in [0, n)). Everything works on the firing entries only, so memory
grows with N * k, never with N * n.
"""
from __future__ import annotations

import numpy as np
import torch

HEALTHY_RANGE = (0.005, 0.30)  # fire rate band of a useful feature, as in the original release
CHANCE_AUROC = 0.5  # AUROC of a feature that carries no information about the label


class UndefinedAUROCError(ValueError):
    """AUROC needs both classes among the labels."""


def firing_entries(
    indices: np.ndarray, values: np.ndarray, n_features: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate top-k codes and return the firing entries as (rows, features, activations), row-major."""
    indices, values = np.asarray(indices), np.asarray(values)
    if indices.ndim != 2 or indices.shape != values.shape:
        raise ValueError(f"indices and values must share one [N, k] shape, got {indices.shape} and {values.shape}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integer feature ids, got dtype {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_features):
        raise ValueError(f"feature ids must lie in [0, {n_features}), got [{indices.min()}, {indices.max()}]")
    if not np.isfinite(values).all():
        raise ValueError("values contain NaN or inf")
    if (values < 0).any():
        raise ValueError("values must be >= 0 (ReLU'd top-k activations)")
    firing = values > 0
    # A row must not list one firing feature twice: sort each row by id and compare neighbours.
    order = np.argsort(indices, axis=1, kind="stable")
    ids, fires = np.take_along_axis(indices, order, 1), np.take_along_axis(firing, order, 1)
    if ((ids[:, 1:] == ids[:, :-1]) & fires[:, 1:] & fires[:, :-1]).any():
        raise ValueError("a row lists the same firing feature id more than once")
    rows = np.nonzero(firing)[0]
    return rows, indices[firing].astype(np.int64), values[firing]


def fire_counts(indices: np.ndarray, values: np.ndarray, n_features: int) -> np.ndarray:
    """Number of rows on which each feature fires, int64 [n_features]."""
    _, features, _ = firing_entries(indices, values, n_features)
    return np.bincount(features, minlength=n_features).astype(np.int64)


def fire_rates(indices: np.ndarray, values: np.ndarray, n_features: int) -> np.ndarray:
    """Fraction of rows on which each feature fires, float64 [n_features]."""
    n_rows = len(np.asarray(indices))
    if n_rows == 0:
        raise ValueError("fire rates need at least one row")
    return fire_counts(indices, values, n_features) / n_rows


def feature_health(fire_rate: np.ndarray, healthy: tuple[float, float] = HEALTHY_RANGE) -> dict[str, int]:
    """Counts of dead (rate 0), rare (0 < rate < low), healthy (low <= rate <= high), dense (> high)."""
    fire_rate = np.asarray(fire_rate, dtype=np.float64)
    low, high = healthy
    if not 0 < low <= high <= 1:
        raise ValueError(f"healthy range must satisfy 0 < low <= high <= 1, got {healthy}")
    if fire_rate.ndim != 1 or ((fire_rate < 0) | (fire_rate > 1) | np.isnan(fire_rate)).any():
        raise ValueError("fire_rate must be a 1-D array of rates in [0, 1]")
    return {
        "dead": int((fire_rate == 0).sum()),
        "rare": int(((fire_rate > 0) & (fire_rate < low)).sum()),
        "healthy": int(((fire_rate >= low) & (fire_rate <= high)).sum()),
        "dense": int((fire_rate > high).sum()),
    }


def _as_labels(labels: np.ndarray, n_rows: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},), got {labels.shape}")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be bool (or 0/1): True = correct rollout")
        labels = labels.astype(bool)
    n_pos = int(labels.sum())
    if n_pos in (0, n_rows):
        raise UndefinedAUROCError(f"AUROC undefined: all labels are {bool(n_pos)}")
    return labels


def _auroc_from_entries(
    features: np.ndarray, activations: np.ndarray, positive: np.ndarray, *, n_pos: int, n_neg: int, n_features: int
) -> np.ndarray:
    """Mann-Whitney AUROC per feature from its firing entries; every other row scores 0.

    AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_pos the sum of the positives' midranks.
    The z_f rows where feature f is silent tie at 0 and share midrank (z_f + 1) / 2; the firing entries
    rank above them, z_f + their midrank among f's firing entries.
    """
    n_active = np.bincount(features, minlength=n_features)
    n_silent = (n_pos + n_neg) - n_active
    order = np.lexsort((activations, features))
    features, activations, positive = features[order], activations[order], positive[order]
    position = np.arange(len(features)) - (np.cumsum(n_active) - n_active)[features]
    run_start = np.ones(len(features), dtype=bool)
    run_start[1:] = (features[1:] != features[:-1]) | (activations[1:] != activations[:-1])
    run = np.cumsum(run_start) - 1
    run_len = np.bincount(run)
    midrank = position[run_start][run] + (run_len[run] + 1) / 2
    rank = n_silent[features] + midrank
    pos_features = features[positive]
    rank_sum = np.bincount(pos_features, weights=rank[positive], minlength=n_features)
    silent_pos = n_pos - np.bincount(pos_features, minlength=n_features)
    rank_sum += silent_pos * (n_silent + 1) / 2
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc_per_feature(indices: np.ndarray, values: np.ndarray, labels: np.ndarray, n_features: int) -> np.ndarray:
    """AUROC of each feature's activation (0 when not firing) as a score for `labels` (bool [N]).

    Exact Mann-Whitney statistic with ties counted one half, equal to sklearn's roc_auc_score per
    feature; a feature that never fires scores 0.5. Raises UndefinedAUROCError (a ValueError) when
    all labels are one class.
    """
    rows, features, activations = firing_entries(indices, values, n_features)
    labels = _as_labels(labels, len(np.asarray(indices)))
    n_pos = int(labels.sum())
    return _auroc_from_entries(features, activations, labels[rows], n_pos=n_pos, n_neg=len(labels) - n_pos,
                               n_features=n_features)


def auroc_direction(auroc: np.ndarray) -> list[str]:
    """"correct↑" where a feature is higher on correct rollouts (AUROC > 0.5), "wrong↑" below, "none" at 0.5."""
    return ["correct↑" if a > CHANCE_AUROC else "wrong↑" if a < CHANCE_AUROC else "none" for a in np.asarray(auroc)]


DENSITY_THRESHOLDS = (0.01, 0.10)  # shares of features firing on more than 1% and 10% of tokens
LOG_DENSITY_BINS = np.arange(-6.0, 0.01, 0.25)  # log10 fire rate, 1e-6 .. 1


def density_summary(fire_rate: np.ndarray) -> dict:
    """Shares of features above 1% and 10% density, and the histogram of log10 fire rate of the live
    features (dead ones have no logarithm: they are counted by feature_health)."""
    fire_rate = np.asarray(fire_rate, dtype=np.float64)
    live = fire_rate[fire_rate > 0]
    counts, _ = np.histogram(np.log10(np.clip(live, 10 ** LOG_DENSITY_BINS[0], 1)), bins=LOG_DENSITY_BINS)
    return {
        "share_above_1pct": float((fire_rate > DENSITY_THRESHOLDS[0]).mean()),
        "share_above_10pct": float((fire_rate > DENSITY_THRESHOLDS[1]).mean()),
        "log10_density_histogram": {"edges": LOG_DENSITY_BINS.tolist(), "counts": counts.tolist()},
    }


def max_decoder_cosine(W_dec: torch.Tensor, block: int = 1024) -> tuple[float, list[int]]:
    """The largest cosine similarity between two different features' decoder rows, and the pair:
    near 1 means two features write (almost) the same direction."""
    if len(W_dec) < 2:
        raise ValueError("a decoder cosine needs at least two features")
    ids, cosines = nearest_decoder_directions(W_dec, count=1, block=block)
    first = int(np.argmax(cosines[:, 0]))
    return float(cosines[first, 0]), [first, int(ids[first, 0])]


@torch.no_grad()
def nearest_decoder_directions(W_dec: torch.Tensor, count: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the `count` other features whose decoder rows have the largest cosine with its
    own: (ids [n, count], cosines [n, count]), most similar first. Memory: block x n."""
    directions = torch.nn.functional.normalize(W_dec.float(), dim=1)
    count = min(count, len(directions) - 1)
    ids, cosines = [], []
    for first in range(0, len(directions), block):
        sims = directions[first:first + block] @ directions.T
        rows = torch.arange(len(sims))
        sims[rows, rows + first] = -2.0  # a feature with itself
        best = sims.topk(count, dim=-1)
        ids.append(best.indices)
        cosines.append(best.values)
    return torch.cat(ids).numpy(), torch.cat(cosines).numpy()
