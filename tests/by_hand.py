"""Statistics written out by hand from their definitions, slowly and plainly: the independent
references the tests compare qsae's vectorised versions with."""
from __future__ import annotations

import numpy as np


def question_bootstrap_ve(x, x_hat, questions, n_boot, seed) -> tuple[float, float]:
    """The card's interval, written here from the rows: a bootstrap-t over held-out questions, each
    replicate's standard error the jackknife leaving out one drawn question at a time."""
    ids = np.unique(questions)
    rows_of = [np.flatnonzero(questions == q) for q in ids]

    def ve(drawn) -> float:
        rows = np.concatenate([rows_of[i] for i in drawn])
        x64, x_hat64 = x[rows].astype(np.float64), x_hat[rows].astype(np.float64)
        return 1 - ((x64 - x_hat64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()

    def jackknife_se(drawn) -> float:
        left_out = np.array([ve(np.delete(drawn, j)) for j in range(len(drawn))])
        return np.sqrt((len(drawn) - 1) / len(drawn) * ((left_out - left_out.mean()) ** 2).sum())

    everything = np.arange(len(ids))
    estimate, se = ve(everything), jackknife_se(everything)
    draw, t = np.random.default_rng(seed), []
    for _ in range(n_boot):
        drawn = draw.integers(0, len(ids), len(ids))
        replicate_se = jackknife_se(drawn)
        if replicate_se > 0:
            t.append((ve(drawn) - estimate) / replicate_se)
    low_t, high_t = np.quantile(t, [0.025, 0.975])
    return estimate - high_t * se, min(estimate - low_t * se, 1.0)
