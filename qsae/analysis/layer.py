"""One layer's statistics from its sample: reconstruction, feature health, token- and rollout-level
correctness.

The sample (the rows the SAE was trained and held out on, qsae.sample) is streamed from the store
chunk by chunk and kept only as top-k codes, the held-out rows' residuals, the training rows' sum and
each rollout's residual sum, so the analysis needs memory for N x k codes, not for N residual rows.

Labels come from rollouts.parquet through the rollout ids: 1 correct, 0 wrong, -1 neither (truncated
or no answer; counted as 0 instead when release.unscored_rollouts = "wrong").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qsae.analysis import rollout_stats
from qsae.analysis.results import LayerAnalysis
from qsae.analysis.ecosystem import reconstruction_metrics
from qsae.analysis.features import (
    auroc_direction,
    auroc_per_feature,
    density_summary,
    feature_health,
    fire_rates,
    max_decoder_cosine,
)
from qsae.analysis.fidelity import mean_l0, variance_explained, variance_explained_ci
from qsae.rollout import Rollout
from qsae.sae import BatchTopKSAE, TopKSAE
from qsae.sample import RowSelection
from qsae.streaming import CHUNK_ROWS, StoreSource

LABEL_VALUES = {"correct": 1, "wrong": 0}  # any other outcome: UNLABELLED, or 0 when counted as wrong
UNLABELLED = -1


def rollout_labels(rollouts: dict[int, Rollout], unscored: str) -> dict[int, int]:
    """rollout id -> 1 (correct), 0 (wrong), or -1 for truncated / unanswered rollouts (0 if unscored
    rollouts count as wrong)."""
    other = 0 if unscored == "wrong" else UNLABELLED
    return {rid: LABEL_VALUES.get(r.outcome, other) for rid, r in rollouts.items()}


@dataclass
class SampleRows:
    """The sampled tokens (a RowSelection: the same tokens at every layer, in store order) with what
    the analysis needs beside them."""

    selection: RowSelection
    label: np.ndarray  # int8 [N]: 1 correct, 0 wrong, -1 unlabelled
    question: np.ndarray  # int64 [N]: the row's question, numbered (the bootstrap's resampling unit)


def sample_rows_of(selection: RowSelection, rollouts: dict[int, Rollout], labels: dict[int, int]) -> SampleRows:
    questions = {q: i for i, q in enumerate(sorted({r.question_id for r in rollouts.values()}))}
    ids = selection.rollout_id.tolist()
    return SampleRows(
        selection=selection,
        label=np.array([labels[r] for r in ids], dtype=np.int8),
        question=np.array([questions[rollouts[r].question_id] for r in ids], dtype=np.int64),
    )


@dataclass
class EncodedSample:
    """One layer's sample as the analysis keeps it. Residuals stay in the store dtype."""

    values: np.ndarray  # [N, k] float32, top-k activations
    indices: np.ndarray  # [N, k] int32, their feature ids
    position: np.ndarray  # [N] token positions
    heldout_residuals: np.ndarray  # [held-out rows, d_model]
    train_sum: np.ndarray  # [d_model] float64, sum of the training rows (their mean: mean ablation)
    rollout_sum: np.ndarray  # [rollouts in the sample, d_model] float32, by sorted rollout id (the probe's input)


@torch.no_grad()
def encode_sample(sae: TopKSAE, source: StoreSource, selection: RowSelection) -> EncodedSample:
    """One pass over the sampled rows in `source` (its chunks follow the sample's order), one chunk in
    memory at a time."""
    heldout_rows = selection.heldout_rows
    rollout_ids, rollout_index = np.unique(selection.rollout_id, return_inverse=True)
    train_sum = np.zeros(source.d_in, dtype=np.float64)
    rollout_sum = torch.zeros(len(rollout_ids), source.d_in)  # float32: a probe's input, sums of <= a response
    values, indices, positions, heldout = [], [], [], []
    offset = 0
    for chunk, size in enumerate(source.chunk_sizes):
        x = source.read_chunk(chunk)
        x32 = torch.from_numpy(x.astype(np.float32))  # a copy: store chunks may be read-only memory maps
        v, i = sae.encode_topk(x32)
        values.append(v.numpy())
        indices.append(i.numpy().astype(np.int32))  # feature ids fit: half the memory of int64
        positions.append(source.read_columns(chunk, ["position"]).column("position").to_numpy())
        part = slice(offset, offset + size)
        train_sum += x[~selection.heldout[part]].sum(axis=0, dtype=np.float64)
        rollout_sum.index_add_(0, torch.from_numpy(rollout_index[part]), x32)
        lo, hi = np.searchsorted(heldout_rows, [offset, offset + size])
        heldout.append(x[heldout_rows[lo:hi] - offset])
        offset += size
    return EncodedSample(np.concatenate(values), np.concatenate(indices), np.concatenate(positions),
                         np.concatenate(heldout), train_sum, rollout_sum.numpy())


@torch.no_grad()
def reconstruct(sae: TopKSAE, values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """decode_topk in batches into one float32 array (no second full-size temporary)."""
    x_hat = np.empty((len(values), sae.d_in), dtype=np.float32)
    for first in range(0, len(values), CHUNK_ROWS):
        batch = slice(first, first + CHUNK_ROWS)
        x_hat[batch] = sae.decode_topk(torch.from_numpy(values[batch]),
                                       torch.from_numpy(indices[batch].astype(np.int64))).numpy()
    return x_hat


@dataclass(frozen=True)
class StatisticsSettings:
    """How the statistics resample: bootstrap replicates, label permutations, and their seed."""

    bootstrap: int
    permutations: int
    seed: int
    probe_permutations: int = 0


@dataclass
class LayerInputs:
    """What every layer's analysis shares: the sampled rows, the rollouts, the settings."""

    rows: SampleRows
    rollouts: dict[int, Rollout]
    labels: dict[int, int]  # rollout id -> 1 correct, 0 wrong, -1 unlabelled (rollout_labels)
    settings: StatisticsSettings


def reconstruction_stats(sae: TopKSAE, sample: EncodedSample, inputs: LayerInputs) -> tuple[dict, dict]:
    """Variance explained on the held-out rows, its interval from resampling held-out questions, and
    L0; and SAEBench's per-token reconstruction metrics on the same rows (ecosystem)."""
    rows, settings = inputs.rows, inputs.settings
    held = rows.selection.heldout_rows
    x_hat = reconstruct(sae, sample.values[held], sample.indices[held])
    groups = rows.question[held]
    ve_ci = None
    if len(np.unique(groups)) >= 2:  # one question resampled is no interval
        interval = variance_explained_ci(sample.heldout_residuals, x_hat, n_boot=settings.bootstrap,
                                         seed=settings.seed, groups=groups)
        ve_ci = None if interval is None else list(interval)
    return {
        "variance_explained": variance_explained(sample.heldout_residuals, x_hat),
        "ve_ci": ve_ci,
        "l0": mean_l0(sample.values[held]),
        "heldout_questions": int(len(np.unique(groups))),
    }, reconstruction_metrics(sample.heldout_residuals, x_hat, sample.values[held])


def token_level_auroc(sample: EncodedSample, rows: SampleRows, n_features: int) -> np.ndarray | None:
    """AUROC of each feature's per-token activation against its rollout's label, over the labelled
    tokens; None when they are not of both classes."""
    labelled = rows.label >= 0
    labels = rows.label[labelled] == 1
    if not 0 < labels.sum() < len(labels):
        return None
    return auroc_per_feature(sample.indices[labelled], sample.values[labelled], labels, n_features)


ROLLOUT_SUMMARY_KEYS = ("max_abs_auroc", "statistic", "feature", "auroc", "null_centre", "direction", "chance_band_95",
                        "westfall_young_p", "n_q_below_0_05", "length_auroc", "length_auroc_ci", "probe_auroc",
                        "probe_auroc_ci", "probe_p", "probe_null_mean", "permuted_within_questions",
                        "length_adjusted_null_centre",
                        "length_adjusted_p", "n_q_below_0_05_length_adjusted", "n_q_below_0_05_mean",
                        "n_q_below_0_05_fire_fraction")
# Per feature, for each pooling (max: the headline; mean; fire fraction): AUROC, its null centre, p and BH q;
# for the max also the permutation p and the length-adjusted centre, p and q (within response-length deciles).
ROLLOUT_LISTS = ("rollout_auroc", "rollout_null_centre", "rollout_p", "rollout_q", "rollout_p_permutation",
                 "rollout_null_centre_length", "rollout_p_length", "rollout_q_length",
                 "rollout_auroc_mean", "rollout_null_centre_mean", "rollout_p_mean", "rollout_q_mean",
                 "rollout_auroc_fire_fraction", "rollout_null_centre_fire_fraction", "rollout_p_fire_fraction",
                 "rollout_q_fire_fraction")


@dataclass
class RolloutResult:
    """A layer's rollout-level pooling and its correctness statistics over the labelled rollouts."""

    pooled: rollout_stats.RolloutPool  # every sampled rollout
    labelled: np.ndarray  # bool [rollouts of pooled]: labelled ones
    correct: np.ndarray  # bool [labelled rollouts]
    summary: dict  # JSON; "reason" says why the statistics could not be computed
    lists: dict  # ROLLOUT_LISTS: per-feature lists, None when not computable


def rollout_level(sample: EncodedSample, inputs: LayerInputs, n_features: int,
                  pool: rollout_stats.RolloutPool | None = None) -> RolloutResult:
    """Per-rollout pooled activations (`pool`: the encode pass's, over every response token; else
    pooled here over the sampled tokens) and their correctness statistics (rollout_stats), over the
    labelled rollouts that have rows in the sample (the probe reads their sampled residuals)."""
    rows, rollouts, settings = inputs.rows, inputs.rollouts, inputs.settings
    pooled = pool or rollout_stats.pool_by_rollout(sample.values, sample.indices, rows.selection.rollout_id,
                                                   n_features)
    sample_ids, sample_rows = np.unique(rows.selection.rollout_id, return_counts=True)  # sample.rollout_sum's order
    keep = np.isin(pooled.rollout_ids, sample_ids) & np.array(
        [inputs.labels[r] >= 0 for r in pooled.rollout_ids.tolist()], dtype=bool)
    ids = pooled.rollout_ids[keep]
    correct = np.array([inputs.labels[r] == 1 for r in ids.tolist()], dtype=bool)
    if not 0 < correct.sum() < len(correct):
        reason = ("no labelled rollouts" if len(correct) == 0 else
                  f"all {len(correct)} labelled rollouts are {'correct' if correct.all() else 'wrong'}")
        summary = {**dict.fromkeys(ROLLOUT_SUMMARY_KEYS), "n_rollouts_labelled": len(correct), "reason": reason}
        return RolloutResult(pooled, keep, correct, summary, dict.fromkeys(ROLLOUT_LISTS))
    in_sample = np.searchsorted(sample_ids, ids)
    questions = np.array([rollouts[r].question_id for r in ids.tolist()])
    stats = rollout_stats.rollout_statistics(
        pooled.max[keep], correct, questions,
        lengths=np.array([rollouts[r].n_response_tokens for r in ids.tolist()]),
        mean_residuals=sample.rollout_sum[in_sample] / sample_rows[in_sample][:, None],
        n_permutations=settings.permutations, seed=settings.seed,
        probe_permutations=settings.probe_permutations)
    summary = {**stats.summary, "length_auroc_ci": None if stats.length_ci is None else list(stats.length_ci),
               "probe_auroc_ci": None if stats.probe_ci is None else list(stats.probe_ci),
               "probe_reason": stats.probe.reason, "reason": None}
    adjusted = stats.length_adjusted
    arrays = [stats.test.auroc, stats.test.null_centre, stats.test.p, stats.q, stats.test.p_permutation,
              adjusted.null_centre, adjusted.p, stats.length_adjusted_q]
    for pooling, scores in (("mean", pooled.mean[keep]), ("fire_fraction", pooled.fire_fraction[keep])):
        test = rollout_stats.rank_test(scores, correct, questions)
        q = rollout_stats.bh_qvalues(test.p)
        arrays += [test.auroc, test.null_centre, test.p, q]
        summary[f"n_q_below_0_05_{pooling}"] = int((q < rollout_stats.Q_THRESHOLD).sum())
    lists = {name: np.asarray(a, dtype=np.float64).tolist() for name, a in zip(ROLLOUT_LISTS, arrays, strict=True)}
    return RolloutResult(pooled, keep, correct, summary, lists)


def difference_of_means(mean_residuals: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Mean over correct rollouts minus mean over wrong ones of their mean residuals [R, d]."""
    return (mean_residuals[correct].astype(np.float64).mean(axis=0)
            - mean_residuals[~correct].astype(np.float64).mean(axis=0))


def training_direction(sample: EncodedSample, inputs: LayerInputs, heldout: set[int]) -> np.ndarray | None:
    """The difference of means between correct and wrong training rollouts' mean sampled residuals (the
    causal check's control direction); None unless both outcomes are there."""
    ids, counts = np.unique(inputs.rows.selection.rollout_id, return_counts=True)  # sample.rollout_sum's order
    labels = np.array([inputs.labels[r] for r in ids.tolist()])
    train = (labels >= 0) & ~np.isin(ids, list(heldout))
    correct = labels[train] == 1
    if not 0 < correct.sum() < len(correct):
        return None
    return difference_of_means(sample.rollout_sum[train] / counts[train][:, None], correct)


def analyze_layer(layer: int, sae: TopKSAE, sample: EncodedSample, inputs: LayerInputs, *,
                  revived: int | None = 0, pool: rollout_stats.RolloutPool | None = None) -> LayerAnalysis:
    """Every statistic of one layer's SAE (what each feature looks like: feature_data, added after);
    the rollout-level ones from `pool` (the encode pass's) where given. `revived`: latents training
    revived, None where unknown (an SAE trained elsewhere)."""
    rows = inputs.rows
    values, indices = sample.values, sample.indices
    rates = fire_rates(indices, values, sae.n_features)
    token_auroc = token_level_auroc(sample, rows, sae.n_features)
    by_rollout = rollout_level(sample, inputs, sae.n_features, pool)
    cosine, pair = max_decoder_cosine(sae.W_dec.detach())
    reconstruction, core_metrics = reconstruction_stats(sae, sample, inputs)
    summary = {
        **reconstruction,
        **feature_health(rates),
        **density_summary(rates),
        "dead_over_tokens": int(len(values)),
        "max_decoder_cosine": cosine,
        "max_decoder_cosine_pair": pair,
        "revived": None if revived is None else int(revived),
        **architecture_summary(sae, values),
        "train_rows": len(rows.selection.train_rows),
        "heldout_rows": len(rows.selection.heldout_rows),
        "token_level": token_auroc_summary(token_auroc, rates),
        "rollout_level": {**by_rollout.summary,
                          "pooled_over": "the sampled tokens" if pool is None else "every response token"},
    }
    feature_stats = {
        "fire_rate": rates.tolist(),
        "token_auroc": None if token_auroc is None else token_auroc.tolist(),
        "token_direction": None if token_auroc is None else auroc_direction(token_auroc),
        **by_rollout.lists,
        "summary": by_rollout.summary,
    }
    pooled = by_rollout.pooled
    return LayerAnalysis(
        layer=layer, summary=summary, feature_stats=feature_stats, core_metrics=core_metrics,
        rollouts_fired=(pooled.max > 0).sum(axis=0),
        train_mean=sample.train_sum / max(len(rows.selection.train_rows), 1),
        rollout_ids=pooled.rollout_ids[by_rollout.labelled], rollout_labels=by_rollout.correct.astype(np.uint8),
        rollout_max=pooled.max[by_rollout.labelled],
        dom_direction=training_direction(sample, inputs, set(rows.selection.heldout_positions)))


def architecture_summary(sae: TopKSAE, values: np.ndarray) -> dict:
    """The SAE's architecture; for BatchTopK also its threshold, the width of the sparse view the
    statistics are computed from (encode_topk), and how many sampled tokens fill that view, so may
    have had active latents cut from it."""
    if not isinstance(sae, BatchTopKSAE):
        return {"architecture": sae.architecture}
    full = int((values > 0).all(axis=1).sum()) if sae.sparse_width < sae.n_features else 0
    return {"architecture": sae.architecture, "threshold": float(sae.threshold),
            "sparse_width": sae.sparse_width, "tokens_at_sparse_width": full}


def token_auroc_summary(auroc: np.ndarray | None, rates: np.ndarray) -> dict:
    """The largest token-level AUROC, as the original release reported it (no null: see rollout_level)."""
    if auroc is None:
        return {"max_auroc": None, "feature": None, "fire_rate": None, "direction": None}
    best = int(np.argmax(auroc))
    return {"max_auroc": float(auroc[best]), "feature": best, "fire_rate": float(rates[best]),
            "direction": auroc_direction(auroc[best:best + 1])[0]}
