"""Coverage of the intervals the release labels 95%: samples of questions drawn from a known population,
the interval computed on each, and the share that contains the population's value."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from qsae.analysis.baselines import auroc_jackknife_ci
from qsae.analysis.fidelity import (
    NOMINAL_BELOW_CLUSTERS,
    QuestionSums,
    question_bootstrap_t,
    ratio_bootstrap_t,
    variance_explained,
    variance_explained_ci,
)

D = 16


@pytest.fixture(scope="module")
def population():
    """3,000 questions of 20 to 200 tokens each: residuals around a per-question centre, and a
    reconstruction error whose scale varies by question (log-normal), so per-question sums are
    heterogeneous as in a release. Returns (rows, sq_err, sq_dev, dev_sum) per question about the
    population mean, and the population's variance explained."""
    rng = np.random.default_rng(2024)
    n_questions = 3000
    sizes = rng.integers(20, 201, n_questions)
    centres = 0.7 * rng.standard_normal((n_questions, D))
    scales = np.exp(rng.normal(-1.2, 0.3, n_questions))
    x = [centres[q] + rng.standard_normal((sizes[q], D)) for q in range(n_questions)]
    err = [scales[q] * rng.standard_normal((sizes[q], D)) for q in range(n_questions)]
    mean = np.concatenate(x).mean(axis=0)
    sums = (sizes.astype(float), np.array([(e ** 2).sum() for e in err]),
            np.array([((v - mean) ** 2).sum() for v in x]), np.stack([(v - mean).sum(axis=0) for v in x]))
    truth = 1 - sums[1].sum() / sums[2].sum()  # the deviation sums total 0 about the population mean
    return sums, truth


def coverage(population, n_questions: int, reps: int, seed: int) -> float:
    (rows, sq_err, sq_dev, dev_sum), truth = population
    rng = np.random.default_rng(seed)
    covered = 0
    for rep in range(reps):
        drawn = rng.choice(len(rows), n_questions, replace=False)
        low, high = question_bootstrap_t(QuestionSums(rows[drawn], sq_err[drawn], sq_dev[drawn], dev_sum[drawn]),
                                         n_boot=200, seed=rep, alpha=0.05)
        covered += low <= truth <= high
    return covered / reps


def test_the_variance_explained_interval_covers_95_percent_at_100_questions(population):
    # 2,000 samples: a coverage of 95% lands in [0.93, 0.97] but for a 1-in-10,000 chance; this method
    # covers about 93.5% here (3,000 samples), inside the band, and 95% at 200 questions.
    assert 0.93 <= coverage(population, 100, 2000, seed=1) <= 0.97


def test_below_30_questions_it_covers_less_and_the_release_calls_it_nominal(population):
    """At the embedded default's ~10 held-out questions no resampling method reaches 93% here; the
    studentized bootstrap comes closest (about 92%), and the card labels such intervals nominal."""
    assert 0.88 <= coverage(population, 10, 500, seed=2) < 0.95
    assert NOMINAL_BELOW_CLUSTERS == 30


def test_question_sums_give_the_interval_of_the_rows():
    """variance_explained_ci from rows equals question_bootstrap_t from sums computed here, per question."""
    rng = np.random.default_rng(5)
    groups = rng.permutation(np.repeat(np.arange(9), rng.integers(3, 30, 9)))
    x = rng.standard_normal((len(groups), D)).astype(np.float32) + groups[:, None] * 0.2
    x_hat = x + 0.4 * rng.standard_normal(x.shape).astype(np.float32)
    mean = x.astype(np.float64).mean(axis=0)
    members = [groups == q for q in range(9)]
    sums = QuestionSums(np.array([m.sum() for m in members], dtype=float),
                        np.array([((x[m] - x_hat[m].astype(np.float64)) ** 2).sum() for m in members]),
                        np.array([((x[m] - mean) ** 2).sum() for m in members]),
                        np.stack([(x[m] - mean).sum(axis=0) for m in members]))
    assert variance_explained_ci(x, x_hat, groups, n_boot=80, seed=4) == pytest.approx(
        question_bootstrap_t(sums, n_boot=80, seed=4, alpha=0.05), rel=1e-9)
    # The standard error is the jackknife over questions: variance explained recomputed without each.
    left_out = np.array([variance_explained(x[~m], x_hat[~m]) for m in members])
    (ve,), (se,) = sums.resampled(np.ones((1, 9)))
    assert ve == pytest.approx(variance_explained(x, x_hat), rel=1e-9)
    assert se == pytest.approx(np.sqrt(8 / 9 * ((left_out - left_out.mean()) ** 2).sum()), rel=1e-9)


@pytest.fixture(scope="module")
def loss_population():
    """3,000 questions of 20 to 200 scored tokens: the SAE's added cross-entropy per token (ΔCE) varies by
    question (log-normal mean) and by token (gamma). Returns per-question (tokens, summed ΔCE) and the
    population's pooled ΔCE per token."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(20, 201, 3000).astype(float)
    per_question = np.exp(rng.normal(np.log(0.05), 0.5, len(tokens)))
    added = np.array([rng.gamma(2.0, mean / 2.0, int(n)).sum() for n, mean in zip(tokens, per_question)])
    sums = np.stack([tokens, added], axis=1)
    return sums, added.sum() / tokens.sum()


def ratio_coverage(loss_population, n_questions: int, reps: int, seed: int) -> float:
    sums, truth = loss_population
    rng = np.random.default_rng(seed)
    covered = 0
    for rep in range(reps):
        drawn = sums[rng.choice(len(sums), n_questions, replace=False)]
        interval = ratio_bootstrap_t(drawn, lambda totals: {"delta_ce": totals[..., 1] / totals[..., 0]},
                                     n_boot=200, seed=rep)["delta_ce"]
        covered += interval[0] <= truth <= interval[1]
    return covered / reps


def test_the_fidelity_intervals_cover_95_percent_at_100_questions(loss_population):
    """ΔCE, KL and CE loss recovered are ratios of per-question sums, with the same interval."""
    assert 0.93 <= ratio_coverage(loss_population, 100, 2000, seed=3) <= 0.97
    assert 0.88 <= ratio_coverage(loss_population, 10, 500, seed=4) < 0.97


@pytest.fixture(scope="module")
def length_population():
    """20,000 questions with one rollout each: response length log-normal, and longer responses more
    often wrong; returns (length, correct) and the population's length AUROC."""
    rng = np.random.default_rng(11)
    length = np.exp(rng.normal(6, 0.6, 20_000))
    correct = rng.random(len(length)) < 1 / (1 + np.exp(-(0.5 - 0.8 * (np.log(length) - 6))))
    return length, correct, roc_auc_score(correct, length)


@pytest.mark.parametrize("n_questions", [33, 100])  # the embedded default labels about 33 rollouts
def test_the_auroc_intervals_cover_95_percent(length_population, n_questions):
    """The length and probe AUROC intervals (a jackknife over questions with G - 1 degrees of freedom)."""
    length, correct, truth = length_population
    rng = np.random.default_rng(n_questions)
    covered = n = 0
    while n < 1000:
        drawn = rng.choice(len(length), n_questions, replace=False)
        interval = auroc_jackknife_ci(length[drawn], correct[drawn], np.arange(n_questions))
        if interval is None:  # a sample with fewer than two of a class
            continue
        n += 1
        covered += interval[0] <= truth <= interval[1]
    assert 0.93 <= covered / n <= 0.97
