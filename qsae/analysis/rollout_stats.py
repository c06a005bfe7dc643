"""Rollout-level correctness statistics of SAE features: pooling, AUROC, permutation tests.

A rollout (one response to a question) is correct or wrong; its token rows are correlated, so the
unit of inference here is the rollout, not the token. Token codes are pooled per rollout
(`pool_by_rollout`), each feature's pooled activation is scored against correctness by AUROC
(`auroc_dense`), and chance is measured by permuting the labels within questions
(`permutation_test`), which keeps each question's difficulty out of the null; each AUROC is then
measured from the centre of its own null (0.5 only across all rollouts). Each p-value is the
normal approximation with the null's exact mean and variance (a stratified Mann-Whitney test,
`rank_test`), checked against the permutation p. Multiplicity over features is handled twice:
Benjamini-Hochberg q-values (`bh_qvalues`, from those continuous p-values, so not floored by the
permutation count) and the Westfall-Young max-statistic p-value with its 95% chance band. Response
length and a linear probe on the mean residual are the baselines a feature has to beat (baselines);
`rollout_statistics` puts all of it together for one layer.

Every AUROC here is the Mann-Whitney statistic with ties counted one half. Under a permutation of
the labels each feature's midranks stay fixed, so a permuted AUROC needs only the rank sum of the
positives: (permuted labels [P, R]) @ (midranks [R, n]), one matrix product per feature block.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from qsae.analysis.baselines import ProbeResult, auroc_jackknife_ci, probe_auroc, probe_null
from qsae.analysis.features import CHANCE_AUROC, auroc_direction, firing_entries
from qsae.analysis.permutations import (
    PERMUTATION_BATCH,
    checked_labels,
    is_stratified,
    permuted_labels,
    question_codes,
)

FEATURE_BLOCK = 128  # features ranked at once: a float64 [128, R] midrank block is 27 MB at R = 26,529
POOL_CHUNK_ROWS = 65_536  # token rows pooled at once: ~2M firing entries at k = 32
Q_THRESHOLD = 0.05  # BH q below which a feature counts as a discovery in the summary
LENGTH_BINS = 10  # response-length strata of the length-adjusted test (deciles)


@dataclass(frozen=True)
class RolloutPool:
    """Per-rollout pooled codes; row i of every [R, n] matrix belongs to rollout_ids[i]."""

    rollout_ids: np.ndarray  # [R] int64, sorted unique
    max: np.ndarray  # [R, n] float32, max activation over the rollout's rows (0 = never fires)
    mean: np.ndarray  # [R, n] float32, mean activation over the rollout's rows (silent rows count 0)
    fire_fraction: np.ndarray  # [R, n] float32, share of the rollout's rows on which the feature fires
    n_tokens: np.ndarray  # [R] int64, rows of each rollout


@dataclass(frozen=True)
class PermutationTest:
    """Observed AUROCs and their label-permutation null, per feature."""

    auroc: np.ndarray  # [n] float64, observed AUROC of each feature
    null_centre: np.ndarray  # [n] float64, the AUROC the permutation null centres on (0.5 across all rollouts)
    p: np.ndarray  # [n] float64, two-sided p of |AUROC - null_centre|, normal approximation (exact moments)
    p_permutation: np.ndarray  # [n] float64, the same test's permutation p-value
    max_abs_null: np.ndarray  # [P] float64, per permutation the largest |AUROC - null_centre| over features
    westfall_young_p: np.ndarray  # [n] float64, familywise p-value from the max statistic
    chance_band_95: float  # 95th percentile of max_abs_null: |AUROC - null_centre| reached by chance alone
    n_permutations: int
    stratified: bool  # True when labels were permuted within questions


@dataclass(frozen=True)
class RolloutStatistics:
    """Everything `rollout_statistics` computes for one layer."""

    test: PermutationTest
    q: np.ndarray  # [n] BH q-values of test.p (the normal approximation: not floored by the permutation count)
    length_adjusted: RankTest | None  # the same scores within response-length deciles (rank_test)
    length_adjusted_q: np.ndarray | None
    length_auroc: float | None
    length_ci: tuple[float, float] | None
    probe: ProbeResult | None
    probe_ci: tuple[float, float] | None  # question bootstrap of the out-of-fold predictions' AUROC
    summary: dict


# pooling


def pool_by_rollout(values: np.ndarray, indices: np.ndarray, row_rollout: np.ndarray, n_features: int) -> RolloutPool:
    """Max, mean and fire fraction of every feature over each rollout's token rows.

    Rows of one rollout need not be contiguous. Works on the firing entries only: one flat key
    rollout * n + feature per entry, reduced by torch's scatter_reduce_ (max) and index_add_ (sum,
    count) into [R * n] float32 buffers. Rows are taken in rollout order, POOL_CHUNK_ROWS at a time:
    each reduction then writes within a few rollouts' n floats (cache resident) instead of all over
    R * n, an order of magnitude faster, and memory is O(R n) plus one chunk, never O(N n). Sums
    accumulate in float32 (relative error ~1e-7 x sqrt(rows of the rollout)); counts are exact
    below 2**24.
    """
    indices, values, row_rollout = np.asarray(indices), np.asarray(values), np.asarray(row_rollout)
    if indices.ndim != 2 or indices.shape != values.shape:
        raise ValueError(f"indices and values must share one [N, k] shape, got {indices.shape} and {values.shape}")
    n_rows = len(indices)
    if row_rollout.shape != (n_rows,):
        raise ValueError(f"row_rollout must have shape ({n_rows},), one rollout id per row, got {row_rollout.shape}")
    if not np.issubdtype(row_rollout.dtype, np.integer):
        raise ValueError(f"row_rollout must hold integer rollout ids, got dtype {row_rollout.dtype}")
    rollout_ids, rollout_of_row = np.unique(row_rollout.astype(np.int64), return_inverse=True)
    rollout_of_row = rollout_of_row.reshape(n_rows)
    n_tokens = np.bincount(rollout_of_row, minlength=len(rollout_ids)).astype(np.int64)
    shape = (len(rollout_ids), n_features)
    pooled_max, total, fired = (torch.zeros(shape[0] * shape[1]) for _ in range(3))
    by_rollout = np.argsort(rollout_of_row, kind="stable")
    for start in range(0, n_rows, POOL_CHUNK_ROWS):
        chunk = by_rollout[start:start + POOL_CHUNK_ROWS]
        rows, features, activations = firing_entries(indices[chunk], values[chunk], n_features)
        key = torch.from_numpy(rollout_of_row[chunk][rows] * n_features + features)
        activations = torch.from_numpy(activations.astype(np.float32))
        pooled_max.scatter_reduce_(0, key, activations, reduce="amax", include_self=True)
        total.index_add_(0, key, activations)
        fired.index_add_(0, key, torch.ones(1).expand(len(key)))
    per_rollout = torch.from_numpy(n_tokens.astype(np.float32))[:, None]  # every rollout has >= 1 row
    return RolloutPool(
        rollout_ids=rollout_ids,
        max=pooled_max.view(shape).numpy(),
        mean=total.view(shape).div_(per_rollout).numpy(),
        fire_fraction=fired.view(shape).div_(per_rollout).numpy(),
        n_tokens=n_tokens,
    )


# AUROC from midranks


def _scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a [R, n] matrix with one row per rollout, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or not np.isfinite(scores).all():
        raise ValueError("scores must be finite numbers")
    return scores


def _midranks(block: np.ndarray) -> torch.Tensor:
    """Midranks (1-based, tied values share their mean rank) of each column of block [R, B], as a
    float64 tensor [B, R] (one row per column of block).

    Every column is sorted by torch (faster than numpy's argsort on CPU); flattened column after
    column, each column opens a new run of equal values, so runs never cross columns.
    """
    n_rows, width = block.shape
    if block.dtype not in (np.float32, np.float64, np.int32, np.int64):
        block = block.astype(np.float64)  # dtypes torch cannot sort on CPU (unsigned, float16)
    sorted_values, order = torch.sort(torch.from_numpy(np.ascontiguousarray(block.T)), dim=1)
    sorted_values = sorted_values.numpy()
    run_start = np.ones((width, n_rows), dtype=bool)
    np.not_equal(sorted_values[:, 1:], sorted_values[:, :-1], out=run_start[:, 1:])
    del sorted_values
    starts = np.flatnonzero(run_start)
    lengths = torch.from_numpy(np.diff(starts, append=run_start.size))
    # A run at 0-based positions s .. s + len - 1 holds ranks s + 1 .. s + len: midrank s + (len + 1) / 2.
    midrank = torch.from_numpy(starts % n_rows).double() + (lengths + 1).double() / 2
    in_order = midrank.repeat_interleave(lengths).view(width, n_rows)
    return torch.empty(width, n_rows, dtype=torch.float64).scatter_(1, order, in_order)


def _rank_sums(label_rows: np.ndarray, ranks: torch.Tensor) -> np.ndarray:
    """Rank sums of the positives [b, B] for label_rows (bool [b, R]) and midranks [B, R].

    A float64 product: rank sums exceed float32's exact integers (2**24) beyond a few thousand
    rollouts. torch's BLAS holds up better than numpy's when other processes share the cores.
    """
    return (torch.from_numpy(np.ascontiguousarray(label_rows)).double() @ ranks.T).numpy()


def _deviation(rank_sums: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """2U - n_pos n_neg from the positives' rank sums: the Mann-Whitney U's signed distance from chance.

    Midranks are multiples of 1/2, so 2 x rank sum is an integer that float64 holds exactly (below
    2**53); rounding removes nothing but BLAS noise. AUROC - 0.5 = deviation / (2 n_pos n_neg), so
    comparing deviations compares AUROCs exactly, with no tolerance to choose.
    """
    return np.rint(2 * rank_sums) - n_pos * (n_pos + 1) - n_pos * n_neg


def _auroc(deviation: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    return CHANCE_AUROC + deviation / (2 * n_pos * n_neg)


def auroc_dense(scores: np.ndarray, labels: np.ndarray, *, feature_block: int = FEATURE_BLOCK) -> np.ndarray:
    """AUROC [n] of each column of scores [R, n] as a predictor of labels (bool [R], True = correct).

    Exact Mann-Whitney statistic with ties counted one half (midranks), equal to sklearn's
    roc_auc_score per column. Raises UndefinedAUROCError (a ValueError) when labels are one class.
    """
    scores = _scores(scores)
    labels = checked_labels(labels, len(scores))
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    out = np.empty(scores.shape[1])
    for start in range(0, scores.shape[1], feature_block):
        block = slice(start, start + feature_block)
        rank_sums = _rank_sums(labels[None], _midranks(scores[:, block]))[0]
        out[block] = _auroc(_deviation(rank_sums, n_pos, n_neg), n_pos, n_neg)
    return out


# permutation null


@dataclass(frozen=True)
class Strata:
    """Questions as permutation strata, with what the within-question null of a rank sum needs.

    Under a permutation of the labels within each question, the positives' rank sum has mean
    sum_q c_q S_q / n_q and variance sum_q c_q (n_q - c_q) / (n_q (n_q - 1)) x sum over q of
    (r - mean_q)^2 (c_q of the question's n_q rollouts correct, S_q the sum of their midranks): a
    sum of draws without replacement, question by question. With one rollout per question the labels
    move across all rollouts instead (one stratum), and these are the Mann-Whitney moments with ties.
    `scale` = L makes 2 x L x mean an integer for every feature, so permuted statistics compare exactly.
    """

    codes: np.ndarray  # [R] int64 stratum of each rollout
    size: np.ndarray  # [Q] rollouts of each stratum
    correct: np.ndarray  # [Q] correct rollouts of each stratum
    scale: int
    within_questions: bool

    @classmethod
    def of(cls, labels: np.ndarray, groups: np.ndarray) -> Strata:
        codes = question_codes(groups, len(labels))
        within = is_stratified(codes)
        if not within:
            codes = np.zeros_like(codes)
        size = np.bincount(codes).astype(np.int64)
        correct = np.bincount(codes, weights=labels).astype(np.int64)
        # L = lcm over strata of n_q / gcd(n_q, c_q): L c_q / n_q is then an integer weight.
        scale = int(np.lcm.reduce(size // np.gcd(size, correct)))
        if 2.0 * scale * len(labels) * (len(labels) + 1) >= 2.0 ** 53:
            raise ValueError(f"{len(labels):,} rollouts in questions of {len(np.unique(size))} different sizes: "
                             "the within-question null cannot be centred exactly in float64")
        return cls(codes.astype(np.int64), size, correct, scale, within)

    def weights(self) -> torch.Tensor:
        """[R] float64: L c_q / n_q of each rollout's question, an integer."""
        return torch.from_numpy((self.scale * self.correct // self.size)[self.codes].astype(np.float64))

    def centred(self, rank_sums: np.ndarray, twice_centre: np.ndarray) -> np.ndarray:
        """L x (2 x rank sum - 2 x its null mean), an exact integer in float64 (rank sums are multiples of 1/2)."""
        return self.scale * np.rint(2 * rank_sums) - twice_centre

    def twice_centre(self, ranks: torch.Tensor) -> np.ndarray:
        """[B] L x 2 x the null mean of the positives' rank sum, per feature of midranks [B, R]; exact."""
        return np.rint((2 * ranks @ self.weights()).numpy())

    def null_sd(self, ranks: torch.Tensor) -> np.ndarray:
        """[B] standard deviation of the positives' rank sum under the permutations, per feature."""
        codes = torch.from_numpy(self.codes)
        n_q = len(self.size)
        sums = torch.zeros(n_q, ranks.shape[0], dtype=torch.float64).index_add_(0, codes, ranks.T)
        squares = torch.zeros(n_q, ranks.shape[0], dtype=torch.float64).index_add_(0, codes, (ranks ** 2).T)
        size = torch.from_numpy(self.size.astype(np.float64))[:, None]
        correct = torch.from_numpy(self.correct.astype(np.float64))[:, None]
        spread = (squares - sums ** 2 / size).clamp_(min=0)  # sum over the question of (r - mean_q)^2
        factor = torch.where(size > 1, correct * (size - correct) / (size * (size - 1)).clamp(min=1), 0.0)
        return (factor * spread).sum(dim=0).sqrt().numpy()


@dataclass(frozen=True)
class RankTest:
    """Each feature's AUROC against the centre of its permutation null, by the normal approximation."""

    auroc: np.ndarray  # [n] float64
    null_centre: np.ndarray  # [n] float64, the AUROC the permutation null centres on (0.5 across all rollouts)
    p: np.ndarray  # [n] float64, two-sided p of |AUROC - null_centre| from the null's exact mean and variance


@dataclass(frozen=True)
class _Centred:
    """Per feature, under one set of strata: the positives' observed rank sum, L x 2 x its null mean,
    the centred statistic L x (2 x rank sum - 2 x null mean) (Strata.centred) and the null's sd."""

    rank_sums: np.ndarray
    twice_centre: np.ndarray
    centred: np.ndarray
    sd: np.ndarray

    @classmethod
    def of(cls, ranks: torch.Tensor, labels: np.ndarray, strata: Strata) -> _Centred:
        """From one block of midranks [B, R]."""
        rank_sums = _rank_sums(labels[None], ranks)[0]
        twice_centre = strata.twice_centre(ranks)
        return cls(rank_sums, twice_centre, strata.centred(rank_sums, twice_centre), strata.null_sd(ranks))

    @classmethod
    def joined(cls, blocks: list[_Centred]) -> _Centred:
        """The blocks' features, one after the other."""
        return cls(*(np.concatenate([getattr(block, name) for block in blocks])
                     for name in ("rank_sums", "twice_centre", "centred", "sd")))


def _rank_test(observed: _Centred, strata: Strata, n_pos: int, n_neg: int) -> RankTest:
    auroc = _auroc(_deviation(observed.rank_sums, n_pos, n_neg), n_pos, n_neg)
    centred, sd = observed.centred, observed.sd
    z = np.divide(centred, 2 * strata.scale * sd, out=np.zeros_like(centred), where=sd > 0)
    p = torch.special.erfc(torch.from_numpy(np.abs(z) / np.sqrt(2))).clamp_(max=1.0).numpy()  # 2 P(Z > |z|)
    return RankTest(auroc, auroc - centred / (2 * n_pos * n_neg * strata.scale), p)


def _rank_blocks(scores: np.ndarray, feature_block: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(columns, their midranks [B, R]) for each block of feature_block columns of scores [R, n]."""
    for start in range(0, scores.shape[1], feature_block):
        block = slice(start, start + feature_block)
        yield block, _midranks(scores[:, block])


def rank_test(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, *,
              feature_block: int = FEATURE_BLOCK) -> RankTest:
    """Every column of scores [R, n] against labels (bool [R]) with no permutations drawn: the
    stratified Mann-Whitney test with ties (strata: questions with several rollouts; see Strata),
    its p-value from the normal approximation with the permutation null's exact mean and variance."""
    scores = _scores(scores)
    labels = checked_labels(labels, len(scores))
    strata = Strata.of(labels, groups)
    observed = _Centred.joined([_Centred.of(ranks, labels, strata) for _, ranks in _rank_blocks(scores, feature_block)])
    return _rank_test(observed, strata, int(labels.sum()), int((~labels).sum()))


def length_strata(lengths: np.ndarray, n_bins: int = LENGTH_BINS) -> np.ndarray:
    """[R] int: each rollout's response-length bin (n_bins bins of about equal counts, ties together),
    the strata of the length-adjusted test: a feature that only tracks length sits at its centre there."""
    lengths = np.asarray(lengths, dtype=np.float64)
    edges = np.quantile(lengths, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(np.unique(edges), lengths, side="right")


def _null_of_block(ranks: torch.Tensor, observed: _Centred, permuted: np.ndarray, strata: Strata, *,
                   permutation_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """One feature block's permutation null: (permutations at least as extreme as each feature's observed
    |statistic| [B], the block's largest null |statistic| in each permutation [P]).

    Each feature's midranks stay fixed under a permutation, so its permuted rank sums are one product
    (permuted labels) @ (midranks), permutation_batch label rows at a time.
    """
    threshold = np.abs(observed.centred)
    as_extreme = np.zeros(len(threshold), dtype=np.int64)
    largest = np.empty(len(permuted))
    for first in range(0, len(permuted), permutation_batch):
        batch = slice(first, first + permutation_batch)
        null = np.abs(strata.centred(_rank_sums(permuted[batch], ranks), observed.twice_centre))
        as_extreme += (null >= threshold).sum(axis=0)
        largest[batch] = null.max(axis=1)
    return as_extreme, largest


def _permutation_p(n_as_extreme: np.ndarray, n_permutations: int) -> np.ndarray:
    """(1 + #{as extreme}) / (P + 1): the observed labelling counts as one of the permutations."""
    return (1 + n_as_extreme) / (n_permutations + 1)


def _westfall_young_p(largest_null: np.ndarray, statistic: np.ndarray) -> np.ndarray:
    """Each feature's statistic against every permutation's largest statistic over all features."""
    n_permutations = len(largest_null)
    # Sorted null maxima: count those >= each observed statistic by binary search.
    n_as_extreme = n_permutations - np.searchsorted(np.sort(largest_null), statistic, side="left")
    return _permutation_p(n_as_extreme, n_permutations)


@dataclass(frozen=True)
class _Scan:
    """What one pass over the feature blocks gathers: the observed statistics under each strata, and
    under the first the permutation counts as extreme [n] and the largest null statistic of each permutation [P]."""

    observed: list[_Centred]
    as_extreme: np.ndarray
    largest_null: np.ndarray


def _scan(scores: np.ndarray, labels: np.ndarray, strata: list[Strata], permuted: np.ndarray, *,
          feature_block: int, permutation_batch: int) -> _Scan:
    """Ranks each feature block once and tests it under every strata, the first with its permutation null."""
    observed: list[list[_Centred]] = [[] for _ in strata]
    as_extreme = np.empty(scores.shape[1], dtype=np.int64)
    largest_null = np.zeros(len(permuted))
    for block, ranks in _rank_blocks(scores, feature_block):
        for blocks, within in zip(observed, strata):
            blocks.append(_Centred.of(ranks, labels, within))
        as_extreme[block], largest = _null_of_block(ranks, observed[0][-1], permuted, strata[0],
                                                    permutation_batch=permutation_batch)
        np.maximum(largest_null, largest, out=largest_null)
    return _Scan([_Centred.joined(blocks) for blocks in observed], as_extreme, largest_null)


def _permutation_result(scan: _Scan, strata: Strata, n_pos: int, n_neg: int) -> PermutationTest:
    test = _rank_test(scan.observed[0], strata, n_pos, n_neg)
    n_permutations = len(scan.largest_null)
    max_abs_null = scan.largest_null / (2 * n_pos * n_neg * strata.scale)  # in AUROC units
    return PermutationTest(
        auroc=test.auroc,
        null_centre=test.null_centre,
        p=test.p,
        p_permutation=_permutation_p(scan.as_extreme, n_permutations),
        max_abs_null=max_abs_null,
        westfall_young_p=_westfall_young_p(scan.largest_null, np.abs(scan.observed[0].centred)),
        chance_band_95=float(np.quantile(max_abs_null, 0.95)),
        n_permutations=n_permutations,
        stratified=strata.within_questions,
    )


def permutation_test(
    scores: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    n_permutations: int = 1000,
    *,
    seed: int = 0,
    feature_block: int = FEATURE_BLOCK,
    permutation_batch: int = PERMUTATION_BATCH,
) -> PermutationTest:
    """Observed AUROC of every column of scores [R, n] against its label-permutation null.

    The permutations come once from permuted_labels(labels, groups, n_permutations,
    np.random.default_rng(seed)) and serve every feature block. Each feature's midranks are
    fixed, so its permuted rank sums are (permuted labels) @ (midranks) in float64 (float32 would
    round rank sums beyond 2**24). Memory: the [P, R] bool labels plus one [R, feature_block] rank
    block and one [permutation_batch, R] float64 label batch.

    The statistic is |AUROC - null_centre|: the distance from the AUROC the permutations centre on
    (Strata). Across all rollouts that centre is 0.5; within questions it is wherever the questions'
    difficulty puts it (a feature that only tracks difficulty sits at it), so measuring from 0.5
    would miss features on the far side of the centre and widen the chance band.
    p_permutation = (1 + #{perm: stat_perm >= stat_obs}) / (P + 1), compared exactly (integers,
    see Strata). p is rank_test's (normal approximation, exact moments): continuous, so BH q-values
    are not floored at 1 / (P + 1). westfall_young_p uses the largest statistic over all features in
    each permutation instead, so it controls the familywise error rate over features under any
    dependence between them.
    """
    test, _ = _permutation_and_rank_tests(scores, labels, groups, n_permutations, seed=seed,
                                          feature_block=feature_block, permutation_batch=permutation_batch)
    return test


def _permutation_and_rank_tests(
    scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_permutations: int, *, seed: int,
    feature_block: int = FEATURE_BLOCK, permutation_batch: int = PERMUTATION_BATCH,
    rank_groups: np.ndarray | None = None,
) -> tuple[PermutationTest, RankTest | None]:
    """permutation_test, and rank_test with rank_groups as its strata when given: the two share one
    ranking of scores (a sort of every column), since midranks do not depend on the strata."""
    scores = _scores(scores)
    labels = checked_labels(labels, len(scores))
    if feature_block < 1 or permutation_batch < 1:
        raise ValueError("feature_block and permutation_batch must be >= 1")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    strata = [Strata.of(labels, groups)]
    permuted = permuted_labels(labels, groups, n_permutations, np.random.default_rng(seed))
    if rank_groups is not None:
        strata.append(Strata.of(labels, rank_groups))
    scan = _scan(scores, labels, strata, permuted, feature_block=feature_block, permutation_batch=permutation_batch)
    ranked = None if rank_groups is None else _rank_test(scan.observed[1], strata[1], n_pos, n_neg)
    return _permutation_result(scan, strata[0], n_pos, n_neg), ranked


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values, ordered like p.

    q_(i) = min over j >= i of min(1, m p_(j) / j) for the sorted p_(1) <= ... <= p_(m): the step-up
    procedure, so q is monotone in p and a feature is a discovery at FDR level a when q <= a.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p must be a 1-D array of p-values in [0, 1]")
    order = np.argsort(p, kind="stable")
    scaled = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.empty_like(p)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


# per-layer summary


def rollout_summary(
    test: PermutationTest,
    q: np.ndarray,
    *,
    length_auroc: float | None,
    probe_auroc: float | None,
    n_labelled: int,
) -> dict:
    """JSON-ready headline of one layer: the feature farthest from its null's centre in either direction.

    max_abs_auroc is |AUROC - null_centre| of that feature (comparable with chance_band_95); across
    all rollouts the centre is 0.5, within questions it is where question difficulty alone puts the
    feature. direction is "correct↑" when its AUROC is above the centre, "wrong↑" below (and "none"
    only when every feature sits exactly at its centre).
    """
    distance = np.abs(test.auroc - test.null_centre)
    best = int(np.argmax(distance))
    above = CHANCE_AUROC + test.auroc[best] - test.null_centre[best]
    return {
        "max_abs_auroc": float(distance[best]),
        "statistic": "|AUROC - null centre|, " + ("labels permuted within questions" if test.stratified
                                                   else "labels permuted across rollouts (centre 0.5)"),
        "feature": best,
        "auroc": float(test.auroc[best]),
        "null_centre": float(test.null_centre[best]),
        "direction": auroc_direction(np.array([above]))[0],
        "chance_band_95": float(test.chance_band_95),
        "westfall_young_p": float(test.westfall_young_p[best]),
        "n_q_below_0_05": int((np.asarray(q) < Q_THRESHOLD).sum()),
        "permuted_within_questions": bool(test.stratified),
        "length_auroc": None if length_auroc is None else float(length_auroc),
        "probe_auroc": None if probe_auroc is None else float(probe_auroc),
        "n_rollouts_labelled": int(n_labelled),
    }


def rollout_statistics(
    pooled_max: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    lengths: np.ndarray | None = None,
    mean_residuals: np.ndarray | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
    probe_permutations: int = 0,
) -> RolloutStatistics:
    """One layer's rollout statistics over its labelled rollouts: the permutation test of every
    feature's pooled max activation [R, n], BH q-values, the response-length AUROC with its
    question-jackknife interval (and the length-adjusted test), the mean-residual probe with its
    interval and refitted null, and the summary. Raises
    UndefinedAUROCError when the labels are empty or one class."""
    if lengths is not None:
        lengths = np.asarray(lengths, dtype=np.float64)
    test, adjusted = _permutation_and_rank_tests(pooled_max, labels, groups, n_permutations, seed=seed,
                                                 rank_groups=None if lengths is None else length_strata(lengths))
    q = bh_qvalues(test.p)
    length_auroc = length_ci = probe = probe_ci = adjusted_q = None
    if lengths is not None:
        length_auroc = float(auroc_dense(lengths[:, None], labels)[0])
        length_ci = auroc_jackknife_ci(lengths, labels, groups)
        adjusted_q = bh_qvalues(adjusted.p)
    probe_p = probe_null_mean = None
    if mean_residuals is not None:
        probe = probe_auroc(mean_residuals, labels, groups, seed=seed)
        if probe.predicted is not None:  # the folds stay fixed: this interval is over the rollouts scored
            probe_ci = auroc_jackknife_ci(probe.predicted, labels, groups)
            if probe_permutations:
                probe_p, probe_null_mean = probe_null(mean_residuals, labels, groups, probe.auroc,
                                                      n_permutations=probe_permutations, seed=seed)
    summary = rollout_summary(test, q, length_auroc=length_auroc, probe_auroc=None if probe is None else probe.auroc,
                              n_labelled=len(labels))
    best = summary["feature"]
    summary.update({
        "probe_p": probe_p, "probe_null_mean": probe_null_mean,
        "length_adjusted_null_centre": None if adjusted is None else float(adjusted.null_centre[best]),
        "length_adjusted_p": None if adjusted is None else float(adjusted.p[best]),
        "n_q_below_0_05_length_adjusted": None if adjusted is None else int((adjusted_q < Q_THRESHOLD).sum()),
    })
    return RolloutStatistics(test, q, adjusted, adjusted_q, length_auroc, length_ci, probe, probe_ci, summary)
