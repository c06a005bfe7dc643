"""The baselines a feature has to beat: response length's AUROC with its question-jackknife interval
(`auroc_jackknife_ci`), and a linear probe on each rollout's mean residual, scored out of fold
(`probe_auroc`) and against its refitted permutation null (`probe_null`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qsae.analysis.features import UndefinedAUROCError
from qsae.analysis.fidelity import DEFAULT_ALPHA
from qsae.analysis.permutations import checked_labels, permuted_labels, question_codes

PROBE_C = 0.1  # inverse L2 strength of the probe on standardised inputs: many dimensions, few rollouts
PROBE_MAX_ITER = 5000  # lbfgs iterations: enough to converge on standardised residuals
PROBE_SPLITS = 5


def auroc_jackknife_ci(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, alpha: float = DEFAULT_ALPHA
) -> tuple[float, float] | None:
    """Interval of the AUROC of scores [R]: AUROC +- t_(G-1) x its jackknife standard error over the
    G questions (each left out with all its rollouts), clipped to [0, 1].

    Leaving out question g takes from the Mann-Whitney sum S = sum over (correct i, wrong j) of
    psi(x_i, x_j) the placements of g's rollouts among the other class and gives back g's own pairs:
    S - row_g + psi_gg, over (n_correct - c_g)(n_wrong - w_g). The placements come from one sort by
    score and its tie runs, so the interval costs O(R log R + sum of squared question sizes). (A
    studentized bootstrap over questions covers too much here at a few dozen questions: 99%, against
    95% for this one in tests/test_coverage.py.) None with fewer than 3 questions, or when leaving
    some question out leaves one class.
    """
    from scipy.stats import t

    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not np.isfinite(scores).all():
        raise ValueError(f"scores must be a finite 1-D array, got shape {scores.shape}")
    labels = checked_labels(labels, len(scores))
    codes = question_codes(groups, len(scores))
    n_questions = int(codes.max()) + 1
    if n_questions < 3:
        return None
    order = np.argsort(scores, kind="stable")
    x, positive, question = scores[order], labels[order], codes[order]
    run = np.cumsum(np.diff(x, prepend=-np.inf) != 0) - 1  # tie run of each sorted rollout
    pos_run = np.bincount(run, weights=positive).astype(np.float64)
    neg_run = np.bincount(run, weights=~positive).astype(np.float64)
    below = np.cumsum(neg_run) - neg_run  # wrong rollouts strictly below each run
    above = pos_run.sum() - np.cumsum(pos_run)  # correct rollouts strictly above
    # Per rollout: the wrong ones a correct rollout outscores, or the correct ones outscoring a wrong one.
    placement = np.where(positive, (below + neg_run / 2)[run], (above + pos_run / 2)[run])
    total = placement[positive].sum()
    row = np.bincount(question, weights=placement, minlength=n_questions)
    own = np.zeros(n_questions)  # psi_gg: each question's own (correct, wrong) pairs
    q_pos = np.bincount(codes, weights=labels, minlength=n_questions)
    q_neg = np.bincount(codes, weights=~labels, minlength=n_questions)
    for g in np.flatnonzero(q_pos * q_neg):
        members = codes == g
        pos, neg = scores[members & labels], scores[members & ~labels]
        own[g] = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).sum()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    remaining = (n_pos - q_pos) * (n_neg - q_neg)
    if (remaining == 0).any():
        return None
    left_out = (total - row + own) / remaining
    estimate = total / (n_pos * n_neg)
    se = float(np.sqrt((n_questions - 1) / n_questions * ((left_out - left_out.mean()) ** 2).sum()))
    half = float(t.ppf(1 - alpha / 2, n_questions - 1)) * se
    return max(estimate - half, 0.0), min(estimate + half, 1.0)


@dataclass(frozen=True)
class ProbeResult:
    """Out-of-fold AUROC of the linear probe; auroc is None when it cannot be computed, and reason says why."""

    auroc: float | None
    reason: str | None = None
    n_splits: int = 0
    predicted: np.ndarray | None = field(default=None, compare=False, repr=False)  # [R] out-of-fold P(correct)


def probe_auroc(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, n_splits: int = PROBE_SPLITS, seed: int = 0
) -> ProbeResult:
    """Cross-validated AUROC of a logistic-regression probe on features [R, d] (e.g. mean residuals).

    StandardScaler then L2 LogisticRegression at C = PROBE_C, fit on the training folds only.
    Folds are sklearn's GroupKFold over questions (n_splits = min(n_splits, number of questions)),
    so no question is in both a training and a test fold; seed relabels the questions at random
    first, which decides how GroupKFold (largest questions first) places questions of equal size.
    The AUROC is that of the pooled out-of-fold probabilities; on pure noise it scatters around 0.5
    and can fall below it (a held-out fold's class balance is opposite to its training folds').
    Deterministic: lbfgs and the folds involve no other randomness. Returns auroc None with a
    reason (one-class labels, fewer than 2 questions, a one-class training fold) instead of NaN.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features)
    if features.ndim != 2 or not np.isfinite(features).all():
        raise ValueError(f"features must be a finite [R, d] matrix, got shape {features.shape}")
    try:
        labels = checked_labels(labels, len(features))
    except UndefinedAUROCError as error:
        return ProbeResult(None, str(error))
    codes = question_codes(groups, len(features))
    n_questions = int(codes.max()) + 1
    if n_questions < 2:
        return ProbeResult(None, "the probe needs at least 2 questions to hold one out")
    codes = np.random.default_rng(seed).permutation(n_questions)[codes]
    splits = min(n_splits, n_questions)
    predicted = np.empty(len(labels))
    for fold, (train, test) in enumerate(GroupKFold(n_splits=splits).split(features, labels, codes)):
        if labels[train].all() or not labels[train].any():
            return ProbeResult(None, f"training fold {fold} of {splits} holds one class only", splits)
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER))
        probe.fit(features[train], labels[train])
        predicted[test] = probe.predict_proba(features[test])[:, 1]
    return ProbeResult(float(roc_auc_score(labels, predicted)), None, splits, predicted)


def probe_null(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, observed: float, *,
               n_permutations: int, seed: int = 0) -> tuple[float, float | None]:
    """The probe's permutation null, refitting it: (p, mean null AUROC, None without a fitted one). Each permutation (labels moved
    within questions, as permuted_labels does, from seed + 1) gets its own folds' fits and out-of-fold
    AUROC; p = (1 + #{null >= observed}) / (1 + P), one-sided (the probe learns its direction, so an
    AUROC below 0.5 is failure, not an effect). Cross-validated AUROC is biased below 0.5 on noise; the
    null carries that bias too, so the p-value does not. Permutations whose probe cannot be fitted
    (a one-class fold) are left out."""
    null = [probe_auroc(features, row, groups, seed=seed).auroc
            for row in permuted_labels(labels, groups, n_permutations, np.random.default_rng(seed + 1))]
    null = np.array([a for a in null if a is not None])
    return float((1 + (null >= observed).sum()) / (1 + len(null))), float(null.mean()) if len(null) else None
