"""Rollout-level statistics: pooling, AUROC, permutation tests, BH, the length bootstrap, the probe."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qsae.analysis import rollout_stats
from qsae.analysis.baselines import PROBE_C, probe_auroc
from qsae.analysis.features import UndefinedAUROCError
from qsae.analysis.permutations import permuted_labels
from qsae.analysis.rollout_stats import (
    auroc_dense,
    bh_qvalues,
    permutation_test,
    pool_by_rollout,
    rollout_statistics,
    rollout_summary,
)


def random_codes(rng, n_rows: int, n_features: int, k: int):
    """Top-k codes with distinct ids per row, values on a coarse grid (ties) and some zeros (not firing)."""
    indices = np.argsort(rng.random((n_rows, n_features)), axis=1)[:, :k].astype(np.int64)
    values = (rng.integers(0, 5, (n_rows, k)) * 0.5).astype(np.float32)
    return indices, values


def sklearn_aurocs(scores, labels):
    return np.array([roc_auc_score(labels, scores[:, f]) for f in range(scores.shape[1])])


def planted_scores(seed: int, n_rollouts: int = 200, n_features: int = 50, effects: dict[int, float] | None = None):
    """Pooled-max-like scores: mostly zero, exponential where firing; each planted feature is shifted
    by its effect on correct rollouts. Labels random, 4 rollouts per question."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n_rollouts) < 0.5
    scores = rng.exponential(1.0, (n_rollouts, n_features)) * (rng.random((n_rollouts, n_features)) < 0.6)
    for feature, effect in (effects or {}).items():
        scores[:, feature] = rng.exponential(1.0, n_rollouts) + effect * labels
    return scores, labels, np.arange(n_rollouts) // 4


# pooling


def test_pool_by_rollout_matches_a_dense_loop():
    rng = np.random.default_rng(0)
    n_rows, n_features, k = 90, 12, 4
    indices, values = random_codes(rng, n_rows, n_features, k)
    row_rollout = rng.choice(np.array([20, 3, 11, 7]), n_rows)  # interleaved, unsorted ids
    row_rollout[-1] = 42  # a rollout with a single row
    pooled = pool_by_rollout(values, indices, row_rollout, n_features)

    dense = np.zeros((n_rows, n_features))
    np.put_along_axis(dense, indices, values.astype(np.float64), axis=1)
    ids = sorted(set(row_rollout.tolist()))
    assert pooled.rollout_ids.dtype == np.int64 and pooled.rollout_ids.tolist() == ids
    for i, rollout in enumerate(ids):
        rows = dense[row_rollout == rollout]
        assert pooled.n_tokens[i] == len(rows)
        np.testing.assert_allclose(pooled.max[i], rows.max(axis=0), rtol=1e-6)
        np.testing.assert_allclose(pooled.mean[i], rows.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(pooled.fire_fraction[i], (rows > 0).mean(axis=0), rtol=1e-6)
    assert pooled.max.dtype == pooled.mean.dtype == pooled.fire_fraction.dtype == np.float32
    assert pooled.max.shape == (len(ids), n_features)


def test_pool_by_rollout_gives_the_same_in_small_chunks(monkeypatch):
    rng = np.random.default_rng(20)
    indices, values = random_codes(rng, 50, 9, 3)
    row_rollout = rng.integers(0, 6, 50)
    whole = pool_by_rollout(values, indices, row_rollout, 9)
    monkeypatch.setattr(rollout_stats, "POOL_CHUNK_ROWS", 7)  # rollouts straddle chunk boundaries
    chunked = pool_by_rollout(values, indices, row_rollout, 9)
    for field in ("rollout_ids", "max", "mean", "fire_fraction", "n_tokens"):
        np.testing.assert_allclose(getattr(chunked, field), getattr(whole, field), rtol=1e-6)
    empty = pool_by_rollout(values[:0], indices[:0], row_rollout[:0], 9)
    assert empty.max.shape == empty.mean.shape == (0, 9) and len(empty.rollout_ids) == len(empty.n_tokens) == 0


def test_pool_by_rollout_rejects_bad_input():
    indices, values = random_codes(np.random.default_rng(1), 10, 8, 3)
    with pytest.raises(ValueError, match="row_rollout must have shape"):
        pool_by_rollout(values, indices, np.zeros(9, dtype=np.int64), 8)
    with pytest.raises(ValueError, match="integer rollout ids"):
        pool_by_rollout(values, indices, np.zeros(10), 8)
    with pytest.raises(ValueError, match="feature ids must lie in"):
        pool_by_rollout(values, indices, np.zeros(10, dtype=np.int64), 5)
    with pytest.raises(ValueError, match="share one"):
        pool_by_rollout(values[:, :2], indices, np.zeros(10, dtype=np.int64), 8)


# AUROC


def test_auroc_dense_matches_sklearn_with_ties_and_zeros():
    rng = np.random.default_rng(2)
    n_rollouts = 61
    labels = rng.random(n_rollouts) < 0.3
    scores = rng.integers(0, 4, (n_rollouts, 9)) * (rng.random((n_rollouts, 9)) < 0.5)  # ties, mostly zeros
    scores[:, 0] = 0  # a feature that never fires: exactly chance
    scores[:, 1] = rng.standard_normal(n_rollouts)  # no ties, negative values
    expected = sklearn_aurocs(scores, labels)
    np.testing.assert_allclose(auroc_dense(scores, labels), expected, atol=1e-12)
    np.testing.assert_allclose(auroc_dense(scores.astype(np.float32), labels.astype(int), feature_block=2), expected,
                               atol=1e-12)
    assert auroc_dense(scores, labels)[0] == 0.5


def test_one_class_or_no_labels_raise_clear_errors():
    scores = np.ones((5, 3))
    for labels in (np.ones(5, bool), np.zeros(5, bool)):
        with pytest.raises(UndefinedAUROCError, match="all 5 labelled rollouts"):
            auroc_dense(scores, labels)
        with pytest.raises(UndefinedAUROCError):
            permutation_test(scores, labels, np.arange(5), 10)
        with pytest.raises(UndefinedAUROCError):
            rollout_stats.auroc_jackknife_ci(scores[:, 0], labels, np.arange(5))
    with pytest.raises(UndefinedAUROCError, match="no labelled rollouts"):
        auroc_dense(np.ones((0, 3)), np.zeros(0, bool))
    with pytest.raises(ValueError, match="labels must have shape"):
        auroc_dense(scores, np.ones(4, bool))
    with pytest.raises(ValueError, match="finite"):
        auroc_dense(np.full((5, 1), np.nan), np.arange(5) % 2)


# permutations


def test_permuted_labels_keep_each_questions_labels():
    rng = np.random.default_rng(3)
    groups = rng.permutation(np.repeat(np.arange(8), 3))  # questions interleaved
    labels = np.zeros(24, dtype=bool)
    for question in range(8):
        labels[np.flatnonzero(groups == question)[0]] = True  # one correct rollout per question
    permuted = permuted_labels(labels, groups, 3000, np.random.default_rng(4))
    assert permuted.shape == (3000, 24) and permuted.dtype == bool
    for question in range(8):
        members = groups == question
        assert (permuted[:, members].sum(axis=1) == 1).all()
        # The correct label lands on each of the question's three rollouts about a third of the time.
        share = permuted[:, members].mean(axis=0)
        assert np.all(np.abs(share - 1 / 3) < 0.05)
    assert (permuted != labels).any(axis=1).mean() > 0.9


def test_permuted_labels_across_all_when_questions_have_one_rollout():
    labels = np.arange(20) < 5
    permuted = permuted_labels(labels, np.arange(20)[::-1], 2000, np.random.default_rng(5))
    assert (permuted.sum(axis=1) == 5).all()
    # Each rollout is correct in about 5/20 of the permutations: labels move across questions.
    assert np.all(np.abs(permuted.mean(axis=0) - 0.25) < 0.05)


def expected_auroc_under_within_question_shuffles(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray):
    """E[AUROC] of each column when labels are shuffled within questions, pair by pair: rollouts i and j
    of one question are (correct, wrong) with probability c (n - c) / (n (n - 1)); of two questions,
    c_i / n_i x (n_j - c_j) / n_j. Independent of the rank-sum moments rollout_stats uses."""
    n = np.array([np.sum(groups == g) for g in groups], dtype=float)
    c = np.array([np.sum(labels[groups == g]) for g in groups], dtype=float)
    same = groups[:, None] == groups[None, :]
    pair = np.where(same, c[:, None] * (n[:, None] - c[:, None]) / (n[:, None] * np.maximum(n[:, None] - 1, 1)),
                    (c / n)[:, None] * ((n - c) / n)[None, :])
    np.fill_diagonal(pair, 0.0)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    out = []
    for column in scores.T:
        wins = (column[:, None] > column[None, :]) + 0.5 * (column[:, None] == column[None, :])
        out.append((pair * wins).sum() / (n_pos * n_neg))
    return np.array(out)


def test_permutation_test_matches_brute_force_sklearn():
    rng = np.random.default_rng(6)
    n_rollouts, n_features, n_permutations, seed = 36, 5, 50, 11
    labels = rng.random(n_rollouts) < 0.5
    groups = np.arange(n_rollouts) % 9  # 4 rollouts per question
    scores = (rng.integers(0, 3, (n_rollouts, n_features)) * (rng.random((n_rollouts, n_features)) < 0.6))
    scores[:, 0] = 0  # never fires: every permutation ties it
    scores[:, 1] = groups % 3 + labels * (groups < 3)  # follows the questions: its null centre is far from 0.5
    result = permutation_test(scores, labels, groups, n_permutations, seed=seed, feature_block=3, permutation_batch=7)

    observed = sklearn_aurocs(scores, labels)
    centre = expected_auroc_under_within_question_shuffles(scores, labels, groups)
    permuted = permuted_labels(labels, groups, n_permutations, np.random.default_rng(seed))
    null = np.stack([sklearn_aurocs(scores, row) for row in permuted])  # [P, n]
    tolerance = 1e-9
    distance, null_distance = np.abs(observed - centre), np.abs(null - centre)
    p = (1 + (null_distance >= distance - tolerance).sum(axis=0)) / (n_permutations + 1)
    max_null = null_distance.max(axis=1)
    westfall_young = (1 + (max_null[:, None] >= distance - tolerance).sum(axis=0)) / (n_permutations + 1)

    assert result.stratified
    np.testing.assert_allclose(result.auroc, observed, atol=1e-12)
    np.testing.assert_allclose(result.null_centre, centre, atol=1e-12)
    assert abs(centre[1] - 0.5) > 0.05
    np.testing.assert_allclose(result.max_abs_null, max_null, atol=1e-12)
    np.testing.assert_array_equal(result.p_permutation, p)
    np.testing.assert_array_equal(result.westfall_young_p, westfall_young)
    assert result.p_permutation[0] == result.westfall_young_p[0] == result.p[0] == 1.0
    assert result.chance_band_95 == pytest.approx(np.quantile(max_null, 0.95))
    # Integer scores tie often: some permuted AUROCs are exactly as far from the centre as the observed one.
    assert (np.abs(null_distance - distance) < tolerance).any()


def test_the_normal_p_uses_the_exact_null_variance():
    """rank_test's p-value: the centred statistic over the null's standard deviation, which equals the
    spread of AUROCs over many within-question shuffles (an independent estimate)."""
    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(40), [1, 2, 3, 4, 5] * 8)  # questions of several sizes, one rollout in some
    labels = rng.random(len(groups)) < 0.45
    scores = rng.integers(0, 4, (len(groups), 6)) * (rng.random((len(groups), 6)) < 0.5) + groups[:, None] % 5
    test = rollout_stats.rank_test(scores, labels, groups, feature_block=4)
    shuffled = permuted_labels(labels, groups, 20_000, np.random.default_rng(8))
    n_pos, n_neg = labels.sum(), (~labels).sum()
    null = (shuffled @ stats.rankdata(scores, axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)  # [P, n]
    np.testing.assert_allclose(test.null_centre, null.mean(axis=0), atol=4 * null.std(axis=0).max() / np.sqrt(20_000))
    z = (test.auroc - test.null_centre) / null.std(axis=0)
    np.testing.assert_allclose(test.p, 2 * stats.norm.sf(np.abs(z)), rtol=0.03, atol=1e-4)
    np.testing.assert_allclose(test.auroc, sklearn_aurocs(scores, labels), atol=1e-12)


def difficulty_only(seed: int, n_questions: int = 60, per_question: int = 4, n_features: int = 200):
    """Features that track each question's difficulty (which decides how often it is answered right),
    and nothing of whether a rollout of it was right: (scores, labels, groups)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_questions), per_question)
    difficulty = rng.standard_normal(n_questions)[groups]
    labels = rng.random(len(groups)) < 1 / (1 + np.exp(-3 * difficulty))
    return difficulty[:, None] + 0.3 * rng.standard_normal((len(groups), n_features)), labels, groups


def test_within_question_permutation_discounts_question_difficulty():
    # Difficulty-only features separate correct from wrong rollouts across questions, not within them:
    # within questions their p-values are uniform and the chance band that of features of pure noise.
    scores, labels, groups = difficulty_only(21)
    within = permutation_test(scores, labels, groups, 999, seed=1)
    across = permutation_test(scores, labels, np.arange(len(groups)), 999, seed=1)
    assert within.stratified and not across.stratified
    assert (within.auroc > 0.75).all() and (np.abs(within.null_centre - within.auroc) < 0.05).all()
    assert (across.p_permutation == 1 / 1000).all()
    for p in (within.p, within.p_permutation):  # 200 features: 10 +- 3 below 0.05
        assert (p <= 0.05).sum() <= 22 and stats.kstest(p, "uniform").pvalue > 0.001
    noise = permutation_test(np.random.default_rng(3).standard_normal(scores.shape), labels, groups, 999, seed=1)
    assert within.chance_band_95 < 1.5 * noise.chance_band_95


def test_a_feature_on_the_far_side_of_its_null_centre_is_significant():
    """A feature that rises with difficulty but, within each question, is lower on the correct
    rollouts: its AUROC is far below the centre its questions put it at, and closer to 0.5 than the
    null's own AUROCs are (measured from 0.5, it would look less extreme than chance)."""
    scores, labels, groups = difficulty_only(22, n_features=1)
    feature = scores[:, 0] - 1.2 * labels
    test = permutation_test(feature[:, None], labels, groups, 999, seed=1)
    assert abs(test.auroc[0] - 0.5) < abs(test.null_centre[0] - 0.5) - test.chance_band_95
    assert test.chance_band_95 < abs(test.auroc[0] - test.null_centre[0])
    assert test.p_permutation[0] == test.westfall_young_p[0] == 1 / 1000 and test.p[0] < 1e-4


def test_the_length_adjusted_test_discounts_features_that_only_track_length():
    """Longer responses are more often wrong; features that grow with length (pooled max does) separate
    correct from wrong across all rollouts but not within length deciles, while a feature that carries
    the label beside length stays significant there."""
    rng = np.random.default_rng(31)
    n = 600
    lengths = rng.integers(20, 2000, n)
    labels = rng.random(n) < 1 / (1 + np.exp((lengths - 1000) / 250))
    scores = np.log(lengths)[:, None] + 0.2 * rng.standard_normal((n, 100))
    scores[:, 0] += 0.8 * labels
    groups = np.arange(n)
    plain = rollout_stats.rank_test(scores, labels, groups)
    adjusted = rollout_stats.rank_test(scores, labels, rollout_stats.length_strata(lengths))
    assert (plain.p[1:] < 1e-6).all()
    assert (adjusted.p[1:] <= 0.05).sum() <= 14 and stats.kstest(adjusted.p[1:], "uniform").pvalue > 0.001
    assert adjusted.p[0] < 1e-6
    codes = rollout_stats.length_strata(lengths)
    assert len(np.unique(codes)) == 10 and np.bincount(codes).min() >= 55  # deciles of about equal counts
    assert all(lengths[codes == b].max() <= lengths[codes == b + 1].min() for b in range(9))


def test_q_values_are_not_floored_by_the_permutation_count():
    """2,000 features, 10 with a strong effect, 200 permutations: a permutation p-value cannot go below
    1/201, so BH over them finds nothing (2000 / 201 / 10 > 1); over the normal p-values it finds them."""
    scores, labels, groups = planted_scores(5, n_rollouts=240, n_features=2000,
                                            effects={f: 2.0 for f in range(10)})
    test = permutation_test(scores, labels, groups, 200, seed=2)
    assert (test.p_permutation[:10] == 1 / 201).all() and (bh_qvalues(test.p_permutation) >= 0.05).all()
    q = bh_qvalues(test.p)
    assert (q[:10] < 0.05).all() and (q[10:] < 0.05).sum() <= 2


def test_planted_feature_is_discovered_and_false_discoveries_stay_rare():
    false_discovery_proportions = []
    for seed in range(20):
        scores, labels, groups = planted_scores(seed, effects={7: 1.5})
        q = bh_qvalues(permutation_test(scores, labels, groups, 2000, seed=seed).p)
        assert q[7] < 0.05
        discoveries = np.flatnonzero(q < 0.05)
        false_discovery_proportions.append(np.mean(discoveries != 7))
    # BH at 5% with 49 of 50 features null keeps the expected proportion <= 0.05 * 49 / 50; over 20
    # seeds the mean exceeds 0.15 only if calibration is broken (about 1 seed in 10 has a false
    # discovery, each adding at most 0.5 / 20).
    assert np.mean(false_discovery_proportions) <= 0.15


def test_summary_headlines_the_most_extreme_feature_in_either_direction():
    scores, labels, groups = planted_scores(0, effects={7: 1.5})
    test = permutation_test(scores, labels, groups, 2000)
    summary = rollout_summary(test, bh_qvalues(test.p), length_auroc=0.61, probe_auroc=None, n_labelled=len(labels))
    assert summary["feature"] == 7 and summary["direction"] == "correct↑"
    assert summary["auroc"] > 0.8 and summary["max_abs_auroc"] == pytest.approx(summary["auroc"] - summary["null_centre"])
    assert summary["null_centre"] == test.null_centre[7] and "within questions" in summary["statistic"]
    assert summary["max_abs_auroc"] > summary["chance_band_95"] and summary["westfall_young_p"] < 0.01
    assert summary["n_q_below_0_05"] >= 1 and summary["n_rollouts_labelled"] == 200
    assert summary["length_auroc"] == 0.61 and summary["probe_auroc"] is None
    assert summary["permuted_within_questions"]  # four rollouts per question
    one_each = permutation_test(scores, labels, np.arange(len(labels)), 50)
    assert not rollout_summary(one_each, bh_qvalues(one_each.p), length_auroc=None, probe_auroc=None,
                               n_labelled=len(labels))["permuted_within_questions"]

    # Feature 3 higher on correct rollouts (AUROC ~0.7) and feature 12 much higher on wrong ones
    # (AUROC ~0.1): the headline is feature 12, although feature 3 has the largest AUROC.
    scores, labels, groups = planted_scores(1, effects={3: 0.7, 12: -3.0})
    test = permutation_test(scores, labels, groups, 500)
    summary = rollout_summary(test, bh_qvalues(test.p), length_auroc=None, probe_auroc=0.7, n_labelled=200)
    assert int(np.argmax(test.auroc)) == 3
    assert summary["feature"] == 12 and summary["direction"] == "wrong↑" and summary["auroc"] < 0.2
    assert summary["max_abs_auroc"] == pytest.approx(summary["null_centre"] - summary["auroc"])
    assert set(summary) == {"max_abs_auroc", "statistic", "feature", "auroc", "null_centre", "direction",
                            "chance_band_95", "westfall_young_p",
                            "n_q_below_0_05", "length_auroc", "probe_auroc", "n_rollouts_labelled",
                            "permuted_within_questions"}
    assert all(type(v) in (bool, int, float, str, type(None)) for v in summary.values())


def test_p_values_are_uniform_without_an_effect():
    rng = np.random.default_rng(8)
    n_rollouts, n_features = 240, 400
    scores = rng.exponential(1.0, (n_rollouts, n_features)) * (rng.random((n_rollouts, n_features)) < 0.5)
    labels = rng.random(n_rollouts) < 0.4
    groups = np.arange(n_rollouts) // 3
    p = permutation_test(scores, labels, groups, 999, seed=9).p
    # Each p-value is (super-)uniform on {1/1000, ..., 1}; with 400 features the counts below 0.05
    # and 0.5 stay within about 3.5 binomial standard deviations (20 +- 15, 200 +- 35).
    assert 5 <= (p <= 0.05).sum() <= 35
    assert 165 <= (p <= 0.5).sum() <= 235
    assert stats.kstest(p, "uniform").pvalue > 0.001


# multiplicity


def test_bh_qvalues_match_the_definition():
    rng = np.random.default_rng(10)
    p = np.concatenate([rng.random(40) ** 3, [0.01, 0.01, 1.0, 0.0]])  # ties, both ends
    m = len(p)
    ranks = stats.rankdata(p, method="max")  # tied p share the largest rank: their BH threshold
    # q_i = min over p_j >= p_i of min(1, m p_j / rank_j)
    expected = np.array([min(1.0, min(m * p[j] / ranks[j] for j in range(m) if p[j] >= p[i])) for i in range(m)])
    q = bh_qvalues(p)
    np.testing.assert_allclose(q, expected, rtol=1e-12)
    order = np.argsort(p)
    assert (np.diff(q[order]) >= 0).all() and (q >= p).all() and (q <= 1).all()
    with pytest.raises(ValueError):
        bh_qvalues(np.array([0.5, 1.5]))


# response length: question jackknife


def test_auroc_jackknife_ci_leaves_out_one_question_at_a_time():
    """The interval, written here: AUROC (sklearn) recomputed without each question in turn, the
    jackknife standard error of those, and Student's t with G - 1 degrees of freedom."""
    rng = np.random.default_rng(12)
    groups = rng.permutation(np.repeat(np.arange(9), [1, 2, 3, 4, 3, 2, 5, 1, 2]))
    lengths = rng.integers(100, 108, len(groups))  # ties, within and across questions
    labels = rng.random(len(groups)) < 0.5
    labels[:2] = [True, False]
    got = rollout_stats.auroc_jackknife_ci(lengths, labels, groups)
    left_out = np.array([roc_auc_score(labels[groups != q], lengths[groups != q]) for q in range(9)])
    se = np.sqrt(8 / 9 * ((left_out - left_out.mean()) ** 2).sum())
    estimate = roc_auc_score(labels, lengths)
    half = stats.t.ppf(0.975, 8) * se
    np.testing.assert_allclose(got, [max(estimate - half, 0), min(estimate + half, 1)], atol=1e-12)
    # Too few questions, or a question whose removal leaves one class: no interval.
    assert rollout_stats.auroc_jackknife_ci(lengths[:3], np.array([True, False, True]), np.array([0, 1, 1])) is None
    only = np.array([True, False, False, False])
    assert rollout_stats.auroc_jackknife_ci(np.arange(4.0), only, np.arange(4)) is None


# probe


def probe_data(seed: int, n_questions: int = 60, per_question: int = 4, d: int = 16):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_questions), per_question)
    residuals = rng.standard_normal((len(groups), d))
    return rng, residuals, groups


def test_probe_auroc_is_high_when_the_label_is_linear_in_the_residual():
    rng, residuals, groups = probe_data(14)
    labels = residuals @ rng.standard_normal(residuals.shape[1]) + 0.5 * rng.standard_normal(len(groups)) > 0
    result = probe_auroc(residuals, labels, groups)
    assert result.auroc > 0.8 and result.reason is None and result.n_splits == 5
    assert probe_auroc(residuals, labels, groups) == result  # deterministic


def test_probe_auroc_is_near_chance_for_independent_labels():
    rng, residuals, groups = probe_data(15)
    result = probe_auroc(residuals, rng.random(len(groups)) < 0.5, groups)
    assert abs(result.auroc - 0.5) < 0.2


def test_the_probe_null_refits_on_permuted_labels():
    """The p-value counts the probe refitted on labels permuted within questions (as permuted_labels
    draws them) reaching the observed AUROC; its null sits below 0.5 on average (out-of-fold bias)."""
    rng, residuals, groups = probe_data(16)
    labels = rng.random(len(groups)) < 0.5
    observed = probe_auroc(residuals, labels, groups).auroc
    p, null_mean = rollout_stats.probe_null(residuals, labels, groups, observed, n_permutations=30, seed=4)
    null = [probe_auroc(residuals, row, groups, seed=4).auroc
            for row in permuted_labels(labels, groups, 30, np.random.default_rng(5))]
    assert p == (1 + sum(a >= observed for a in null)) / 31 and null_mean == pytest.approx(np.mean(null))
    # A real signal is beyond every refit.
    signal = residuals @ rng.standard_normal(residuals.shape[1]) > 0
    assert rollout_stats.probe_null(residuals, signal, groups, probe_auroc(residuals, signal, groups).auroc,
                                    n_permutations=30, seed=4)[0] == 1 / 31


def test_probe_p_values_are_calibrated_on_noise():
    """Over noise datasets the refitted null's p is about uniform (its out-of-fold AUROC averages below
    0.5, which a test against 0.5 would misread), so p <= 0.1 about one time in ten."""
    p, means = [], []
    for seed in range(24):
        rng = np.random.default_rng(100 + seed)
        groups = np.repeat(np.arange(20), 2)
        residuals, labels = rng.standard_normal((40, 6)), rng.random(40) < 0.5
        observed = probe_auroc(residuals, labels, groups, seed=seed).auroc  # the folds the refits use
        if observed is None:
            continue
        result = rollout_stats.probe_null(residuals, labels, groups, observed, n_permutations=19, seed=seed)
        p.append(result[0])
        means.append(result[1])
    assert len(p) >= 20 and np.mean(means) < 0.5
    assert np.mean(np.array(p) <= 0.1) <= 0.25 and 0.3 < np.mean(p) < 0.7


def test_probe_never_tests_on_a_question_it_trained_on():
    # Each question's rollouts are near-copies with one shared random label: a probe that saw a
    # question in training recognises its copies (AUROC near 1); held-out questions give chance.
    rng = np.random.default_rng(16)
    n_questions, copies, d = 90, 4, 100
    groups = np.repeat(np.arange(n_questions), copies)
    residuals = np.repeat(rng.standard_normal((n_questions, d)), copies, axis=0)
    residuals += 0.01 * rng.standard_normal(residuals.shape)
    labels = np.repeat(rng.random(n_questions) < 0.5, copies)
    assert abs(probe_auroc(residuals, labels, groups).auroc - 0.5) < 0.2
    # The same probe on rollout-level folds (questions split across train and test) leaks.
    leaky = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=5000)),
                              residuals, labels, cv=KFold(5, shuffle=True, random_state=0), method="predict_proba")
    assert roc_auc_score(labels, leaky[:, 1]) > 0.9


def test_probe_auroc_explains_why_it_has_no_value():
    rng, residuals, groups = probe_data(17, n_questions=6)
    one_class = probe_auroc(residuals, np.ones(len(groups), bool), groups)
    assert one_class.auroc is None and "correct" in one_class.reason
    one_question = probe_auroc(residuals, np.arange(len(groups)) % 2 == 0, np.zeros(len(groups)))
    assert one_question.auroc is None and "2 questions" in one_question.reason
    # Only question 0 has correct rollouts: the fold that holds it out trains on one class.
    labels = groups == 0
    fold = probe_auroc(residuals, labels, groups)
    assert fold.auroc is None and "one class" in fold.reason


# the whole layer


def test_rollout_statistics_puts_the_pieces_together():
    scores, labels, groups = planted_scores(18, effects={7: 1.5})
    rng = np.random.default_rng(19)
    lengths = rng.integers(100, 2000, len(labels)) + 300 * labels
    residuals = rng.standard_normal((len(labels), 8)) + labels[:, None]
    result = rollout_statistics(scores, labels, groups, lengths=lengths, mean_residuals=residuals,
                                n_permutations=400, seed=1)
    assert result.summary["feature"] == 7
    assert result.summary["length_auroc"] == pytest.approx(roc_auc_score(labels, lengths))
    low, high = result.length_ci
    assert low < result.length_auroc < high
    assert result.summary["probe_auroc"] == result.probe.auroc > 0.8
    np.testing.assert_array_equal(result.q, bh_qvalues(result.test.p))
    bare = rollout_statistics(scores, labels, groups, n_permutations=50)
    assert bare.summary["length_auroc"] is None and bare.summary["probe_auroc"] is None
