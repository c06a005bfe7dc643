"""Rollout-level feature statistics at full SuperGPQA size: qsae against the naive way, in one run.

    python benchmarks/bench_rollout_stats.py [--rollouts 26529] [--n-features 4096] [--permutations 1000]
                                             [--pool-rows 2000000] [--k 32] [--small]

Data, synthetic and seeded:
- pooled max activations [rollouts, n_features] float32, as max-pooled top-k codes look: feature f
  fires on a token at a rate drawn log-uniform in [1e-5, 5e-2] (mean ~ k / n for k = 32, n = 4096),
  a rollout has T tokens drawn log-uniform in [100, 2000], so the feature is nonzero in the rollout
  with probability 1 - (1 - rate)^T, and its max then is Gamma(2, 1). Labels: 40% correct,
  --rollouts-per-question rollouts per question (SuperGPQA: one each, so permutations run across
  all rollouts).
- top-k codes for pooling: --pool-rows token rows, k ids drawn from the same feature rates (a
  repeated id is silent), values Gamma(2, 1), rows assigned to rollouts at random in proportion
  to T (rows of one rollout interleaved).

Methods:
- "qsae": permutation_test (AUROC, permutation and Westfall-Young p-values, chance band) +
  bh_qvalues + rollout_summary over all features and permutations, timed whole; pool_by_rollout
  (max, mean, fire fraction) on the codes.
- "naive": sklearn's roc_auc_score per feature per permutation (the observed labels count as one
  more), timed on --naive-features x --naive-permutations and extrapolated linearly to the full
  size; for pooling, np.maximum.at and np.add.at on the same flattened (rollout, feature) keys.

Reported: seconds, peak RSS of the process (resource.getrusage) and RSS before each step, and the
naive seconds over qsae's (the speed-up).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from qsae.analysis.rollout_stats import (
    bh_qvalues,
    permutation_test,
    pool_by_rollout,
    rollout_summary,
)

RATE_RANGE = (1e-5, 5e-2)  # per-token fire rate of a feature, log-uniform
TOKENS_RANGE = (100, 2000)  # response tokens of a rollout, log-uniform
CORRECT_SHARE = 0.4
_CHUNK = 2048  # rows generated at once


def log_uniform(rng: np.random.Generator, bounds: tuple[float, float], size) -> np.ndarray:
    return np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]), size))


def pooled_max_matrix(rng: np.random.Generator, rates: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[R, n] float32 max-pooled activations, generated in row chunks so the matrix is the only big array."""
    out = np.empty((len(tokens), len(rates)), dtype=np.float32)
    log_silent = np.log1p(-rates)
    for start in range(0, len(tokens), _CHUNK):
        stop = min(start + _CHUNK, len(tokens))
        fires = -np.expm1(np.outer(tokens[start:stop], log_silent))
        nonzero = rng.random(fires.shape, dtype=np.float32) < fires
        out[start:stop] = np.where(nonzero, rng.gamma(2.0, 1.0, fires.shape).astype(np.float32), 0)
    return out


def topk_codes(rng: np.random.Generator, rates: np.ndarray, tokens: np.ndarray, n_rows: int, k: int):
    """(values [N, k] float32, indices [N, k] int64, row_rollout [N] int64) with interleaved rollouts."""
    indices = rng.choice(len(rates), size=(n_rows, k), p=rates / rates.sum())
    indices.sort(axis=1)
    values = rng.gamma(2.0, 1.0, (n_rows, k)).astype(np.float32)
    values[:, 1:][indices[:, 1:] == indices[:, :-1]] = 0  # a repeated id is not a second firing
    row_rollout = rng.choice(len(tokens), size=n_rows, p=tokens / tokens.sum()).astype(np.int64)
    return values, indices.astype(np.int64), row_rollout


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def qsae_permutation_step(scores, labels, groups, n_permutations: int, seed: int) -> tuple[float, dict]:
    start = time.perf_counter()
    test = permutation_test(scores, labels, groups, n_permutations, seed=seed)
    q = bh_qvalues(test.p)
    summary = rollout_summary(test, q, length_auroc=None, probe_auroc=None, n_labelled=len(labels))
    return time.perf_counter() - start, summary


def naive_permutation_seconds(scores, labels, groups, n_features: int, n_permutations: int, seed: int) -> float:
    """sklearn roc_auc_score for each of n_features features under the observed labels and n_permutations
    permutations (within questions when questions repeat): seconds for that subset."""
    rng = np.random.default_rng(seed)
    stratified = len(np.unique(groups)) < len(groups)
    start = time.perf_counter()
    for permutation in range(n_permutations + 1):
        permuted = labels
        if permutation:
            permuted = labels.copy()
            for question in (np.unique(groups) if stratified else [None]):
                members = np.flatnonzero(groups == question) if stratified else np.arange(len(labels))
                permuted[members] = labels[rng.permutation(members)]
        for feature in range(n_features):
            roc_auc_score(permuted, scores[:, feature])
    return time.perf_counter() - start


def pool_seconds(values, indices, row_rollout, n_features: int) -> float:
    start = time.perf_counter()
    pool_by_rollout(values, indices, row_rollout, n_features)
    return time.perf_counter() - start


def naive_pool_seconds(values, indices, row_rollout, n_features: int) -> float:
    """np.maximum.at / np.add.at on the flattened keys (validation and key building included)."""
    start = time.perf_counter()
    rollout_ids, rollout_of_row = np.unique(row_rollout, return_inverse=True)
    firing = values > 0
    key = (rollout_of_row[:, None] * n_features + indices)[firing]
    size = len(rollout_ids) * n_features
    pooled_max, total, fired = np.zeros(size, np.float32), np.zeros(size, np.float32), np.zeros(size, np.float32)
    np.maximum.at(pooled_max, key, values[firing])
    np.add.at(total, key, values[firing])
    np.add.at(fired, key, 1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=26_529)
    parser.add_argument("--n-features", type=int, default=4096)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--rollouts-per-question", type=int, default=1)
    parser.add_argument("--pool-rows", type=int, default=2_000_000)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--naive-features", type=int, default=8)
    parser.add_argument("--naive-permutations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="2,000 rollouts x 512 features x 200 permutations")
    args = parser.parse_args()
    if args.small:
        args.rollouts, args.n_features, args.permutations, args.pool_rows = 2000, 512, 200, 200_000

    rng = np.random.default_rng(args.seed)
    rates = log_uniform(rng, RATE_RANGE, args.n_features)
    tokens = log_uniform(rng, TOKENS_RANGE, args.rollouts)
    scores = pooled_max_matrix(rng, rates, tokens)
    labels = rng.random(args.rollouts) < CORRECT_SHARE
    groups = np.arange(args.rollouts) // args.rollouts_per_question

    print(f"{args.rollouts} rollouts ({args.rollouts_per_question} per question), {args.n_features} features "
          f"({100 * (scores > 0).mean():.0f}% of pooled max entries nonzero), {args.permutations} permutations; "
          f"pooling {args.pool_rows} rows x k {args.k}; {torch.get_num_threads()} torch threads")
    rss_before = rss_mb()
    seconds, summary = qsae_permutation_step(scores, labels, groups, args.permutations, args.seed)
    peak = peak_rss_mb()
    naive_subset = naive_permutation_seconds(scores, labels, groups, args.naive_features, args.naive_permutations,
                                             args.seed)
    naive = naive_subset * (args.n_features / args.naive_features) * (
        (args.permutations + 1) / (args.naive_permutations + 1))
    print(f"headline: feature {summary['feature']} AUROC {summary['auroc']:.4f}, chance band "
          f"{summary['chance_band_95']:.4f}, {summary['n_q_below_0_05']} features with q < 0.05 (labels are random)")

    del scores
    values, indices, row_rollout = topk_codes(rng, rates, tokens, args.pool_rows, args.k)
    pool_rss_before = rss_mb()
    pooled = pool_seconds(values, indices, row_rollout, args.n_features)
    pool_peak = peak_rss_mb()
    naive_pool = naive_pool_seconds(values, indices, row_rollout, args.n_features)

    print(f"{'step':<44} {'seconds':>8} {'RSS before MB':>14} {'peak RSS MB':>12} {'naive s':>9} {'speed-up':>9}")
    print(f"{'permutation test + BH + summary':<44} {seconds:>8.1f} {rss_before:>14.0f} {peak:>12.0f} "
          f"{naive:>9.0f} {naive / seconds:>8.0f}x")
    print(f"{'pool_by_rollout':<44} {pooled:>8.1f} {pool_rss_before:>14.0f} {pool_peak:>12.0f} "
          f"{naive_pool:>9.1f} {naive_pool / pooled:>8.1f}x")
    print(f"naive permutation test: sklearn roc_auc_score on {args.naive_features} features x "
          f"{args.naive_permutations + 1} label vectors took {naive_subset:.2f} s, extrapolated to "
          f"{args.n_features} x {args.permutations + 1}; naive pooling: np.maximum.at / np.add.at")


if __name__ == "__main__":
    main()
