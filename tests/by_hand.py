"""Statistics written out by hand from their definitions, slowly and plainly: the independent
references the tests compare qsae's vectorised versions with."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_t(n_units: int, statistic: Callable[[np.ndarray], float], n_boot: int, seed: int,
                alpha: float = 0.05) -> tuple[float, float]:
    """Studentized bootstrap over units (questions): statistic(drawn unit indices) recomputed from the
    data for every replicate, its standard error the jackknife leaving out one drawn unit at a time;
    replicate b draws default_rng(seed).integers(0, G, G), one replicate after another."""

    def jackknife_se(drawn) -> float:
        left_out = np.array([statistic(np.delete(drawn, j)) for j in range(len(drawn))])
        return np.sqrt((len(drawn) - 1) / len(drawn) * ((left_out - left_out.mean()) ** 2).sum())

    everything = np.arange(n_units)
    estimate, se = statistic(everything), jackknife_se(everything)
    draw, t = np.random.default_rng(seed), []
    for _ in range(n_boot):
        drawn = draw.integers(0, n_units, n_units)
        replicate_se = jackknife_se(drawn)
        if replicate_se > 0:
            t.append((statistic(drawn) - estimate) / replicate_se)
    low_t, high_t = np.quantile(t, [alpha / 2, 1 - alpha / 2])
    return estimate - high_t * se, estimate - low_t * se


def question_bootstrap_ve(x, x_hat, questions, n_boot, seed) -> tuple[float, float]:
    """The card's variance-explained interval, written here from the rows: bootstrap_t over the held-out
    questions, capped at 1."""
    ids = np.unique(questions)
    rows_of = [np.flatnonzero(questions == q) for q in ids]

    def ve(drawn) -> float:
        rows = np.concatenate([rows_of[i] for i in drawn])
        x64, x_hat64 = x[rows].astype(np.float64), x_hat[rows].astype(np.float64)
        return 1 - ((x64 - x_hat64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()

    low, high = bootstrap_t(len(ids), ve, n_boot, seed)
    return low, min(high, 1.0)
