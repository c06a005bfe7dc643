"""Analyze and release: per-layer statistics, charts, weight exports and the model card.

The rows are those the SAEs were trained and held out on (qsae.sample: masks, cap, split by question,
read back from the run's split.json). Each layer's sample is streamed from the store chunk by chunk
and kept only as top-k codes, the held-out rows' residuals, the training rows' sum and each rollout's
residual sum, so the analysis needs memory for N x k codes, not for N residual rows (unless the sample
itself is exported).

Labels come from rollouts.parquet through the rollout ids: 1 correct, 0 wrong, -1 neither (truncated
or no answer; counted as 0 instead when release.unscored_rollouts = "wrong").

The release is assembled in a staging directory and renamed into place only when complete, so a
failed run never leaves a half-written release where a good one is expected.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

import qsae
from qsae.analysis import card, charts, rollout_stats
from qsae.analysis.contexts import describe_contexts, top_activating_rows
from qsae.analysis.features import (
    HEALTHY_RANGE,
    auroc_direction,
    auroc_per_feature,
    density_summary,
    feature_health,
    fire_rates,
    max_decoder_cosine,
)
from qsae.analysis.fidelity import mean_l0, variance_explained, variance_explained_ci
from qsae.analysis.model_loss import FIDELITY_DEFINITION, RolloutTokens
from qsae.config import PipelineConfig
from qsae.rollout import Rollout, read_rollouts
from qsae.sae import TopKSAE
from qsae.sample import RowRules, RowSelection, SplitMismatchError, check_same_split, load_split, select_rows
from qsae.store import CHUNK_ROWS, StoreSource, read_manifest

VE_FORMULA = "1 - sum_rows ||x - x_hat||^2 / sum_rows ||x - mean(x)||^2 (pooled over held-out rows, float64)"
LABEL_VALUES = {"correct": 1, "wrong": 0}  # any other outcome: UNLABELLED, or 0 when counted as wrong
UNLABELLED = -1

# (held-out rollouts with their splice positions, {layer: training mean}) -> {layer: fidelity entry}
FidelityFn = Callable[[list[RolloutTokens], dict[int, np.ndarray]], dict[int, dict]]


def rollout_labels(rollouts: dict[int, Rollout], unscored: str) -> dict[int, int]:
    """rollout id -> 1 (correct), 0 (wrong), or -1 for truncated / unanswered rollouts (0 if unscored
    rollouts count as wrong)."""
    other = 0 if unscored == "wrong" else UNLABELLED
    return {rid: LABEL_VALUES.get(r.outcome, other) for rid, r in rollouts.items()}


@dataclass
class SampleRows:
    """Which tokens a layer's sample holds, in sample order (the same at every layer), and their labels."""

    rollout_id: np.ndarray  # int64 [N]
    position: np.ndarray  # int [N]
    heldout: np.ndarray  # bool [N]
    label: np.ndarray  # int8 [N]: 1 correct, 0 wrong, -1 unlabelled
    question: np.ndarray  # int64 [N]: the row's question, numbered (the bootstrap's resampling unit)

    @property
    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.heldout)

    @property
    def heldout_rows(self) -> np.ndarray:
        return np.flatnonzero(self.heldout)


def sample_rows_of(selection: RowSelection, rollouts: dict[int, Rollout], labels: dict[int, int],
                   position: np.ndarray) -> SampleRows:
    questions = {q: i for i, q in enumerate(sorted({r.question_id for r in rollouts.values()}))}
    ids = selection.rollout_id
    return SampleRows(
        rollout_id=ids,
        position=position,
        heldout=selection.heldout,
        label=np.array([labels[r] for r in ids.tolist()], dtype=np.int8),
        question=np.array([questions[rollouts[r].question_id] for r in ids.tolist()], dtype=np.int64),
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
    residuals: np.ndarray | None  # [N, d_model], only when the sample is exported


@torch.no_grad()
def encode_sample(sae: TopKSAE, source: StoreSource, selection: RowSelection,
                  keep_residuals: bool = False) -> EncodedSample:
    """One pass over the sampled rows in `source` (its chunks follow the sample's order), one chunk in
    memory at a time."""
    heldout_rows = selection.heldout_rows
    rollout_ids, rollout_index = np.unique(selection.rollout_id, return_inverse=True)
    train_sum = np.zeros(source.d_in, dtype=np.float64)
    rollout_sum = torch.zeros(len(rollout_ids), source.d_in)  # float32: a probe's input, sums of <= a response
    values, indices, positions, heldout, kept = [], [], [], [], []
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
        kept += [x] if keep_residuals else []
        offset += size
    return EncodedSample(np.concatenate(values), np.concatenate(indices), np.concatenate(positions),
                         np.concatenate(heldout), train_sum, rollout_sum.numpy(),
                         np.concatenate(kept) if keep_residuals else None)


@torch.no_grad()
def reconstruct(sae: TopKSAE, values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """decode_topk in batches into one float32 array (no second full-size temporary)."""
    x_hat = np.empty((len(values), sae.d_in), dtype=np.float32)
    for first in range(0, len(values), CHUNK_ROWS):
        batch = slice(first, first + CHUNK_ROWS)
        x_hat[batch] = sae.decode_topk(torch.from_numpy(values[batch]),
                                       torch.from_numpy(indices[batch].astype(np.int64))).numpy()
    return x_hat


def token_context(rollouts: dict[int, Rollout], tokenizer, width: int):
    """(rollout_id, position) -> (left context text, token text)."""

    def context(rollout_id: int, position: int) -> tuple[str, str]:
        r = rollouts[rollout_id]
        ids = r.prompt_token_ids + r.response_token_ids
        return tokenizer.decode(ids[max(0, position - width) : position]), tokenizer.decode([ids[position]])

    return context


def reconstruction_stats(sae: TopKSAE, sample: EncodedSample, rows: SampleRows, cfg: PipelineConfig) -> dict:
    """Variance explained on the held-out rows, its interval from resampling held-out questions, and L0."""
    held = rows.heldout_rows
    x_hat = reconstruct(sae, sample.values[held], sample.indices[held])
    groups = rows.question[held]
    ve_ci = None
    if len(np.unique(groups)) >= 2:  # one question resampled is no interval
        ve_ci = list(variance_explained_ci(sample.heldout_residuals, x_hat, n_boot=cfg.release.bootstrap,
                                           seed=cfg.train.split_seed, groups=groups))
    return {
        "variance_explained": variance_explained(sample.heldout_residuals, x_hat),
        "ve_ci": ve_ci,
        "l0": mean_l0(sample.values[held]),
        "heldout_questions": int(len(np.unique(groups))),
    }


def token_level_auroc(sample: EncodedSample, rows: SampleRows, n_features: int) -> np.ndarray | None:
    """AUROC of each feature's per-token activation against its rollout's label, over the labelled
    tokens; None when they are not of both classes."""
    labelled = rows.label >= 0
    labels = rows.label[labelled] == 1
    if not 0 < labels.sum() < len(labels):
        return None
    return auroc_per_feature(sample.indices[labelled], sample.values[labelled], labels, n_features)


ROLLOUT_SUMMARY_KEYS = ("max_abs_auroc", "feature", "auroc", "direction", "chance_band_95", "westfall_young_p",
                        "n_q_below_0_05", "length_auroc", "length_auroc_ci", "probe_auroc", "probe_auroc_ci")


def rollout_level(sample: EncodedSample, rows: SampleRows, rollouts: dict[int, Rollout], n_features: int,
                  cfg: PipelineConfig) -> dict:
    """Per-rollout pooled activations and their correctness statistics (rollout_stats), over the
    labelled rollouts that have rows in the sample; "reason" says why when they cannot be computed."""
    pooled = rollout_stats.pool_by_rollout(sample.values, sample.indices, rows.rollout_id, n_features)
    label_of = dict(zip(rows.rollout_id.tolist(), rows.label.tolist()))
    keep = np.array([label_of[r] >= 0 for r in pooled.rollout_ids.tolist()], dtype=bool)
    ids = pooled.rollout_ids[keep]
    correct = np.array([label_of[r] == 1 for r in ids.tolist()], dtype=bool)
    result = {"pooled": pooled, "keep": keep, "rollout_id": ids, "label": correct.astype(np.uint8)}
    if not 0 < correct.sum() < len(correct):
        reason = ("no labelled rollouts" if len(correct) == 0 else
                  f"all {len(correct)} labelled rollouts are {'correct' if correct.all() else 'wrong'}")
        summary = {**dict.fromkeys(ROLLOUT_SUMMARY_KEYS), "n_rollouts_labelled": len(correct), "reason": reason}
        return {**result, "reason": reason, "summary": summary}
    questions = {q: i for i, q in enumerate(sorted({rollouts[r].question_id for r in ids.tolist()}))}
    stats = rollout_stats.rollout_statistics(
        pooled.max[keep], correct, np.array([questions[rollouts[r].question_id] for r in ids.tolist()]),
        lengths=np.array([rollouts[r].n_response_tokens for r in ids.tolist()]),
        mean_residuals=sample.rollout_sum[keep] / pooled.n_tokens[keep][:, None],
        n_permutations=cfg.release.permutations, n_boot=cfg.release.bootstrap, seed=cfg.train.split_seed)
    summary = {**stats.summary, "length_auroc_ci": None if stats.length_ci is None else list(stats.length_ci),
               "probe_auroc_ci": None if stats.probe_ci is None else list(stats.probe_ci),
               "probe_reason": stats.probe.reason, "reason": None}
    return {
        **result,
        "reason": None,
        "test": stats.test,
        "q": stats.q,
        "auroc_mean": rollout_stats.auroc_dense(pooled.mean[keep], correct),
        "auroc_fire_fraction": rollout_stats.auroc_dense(pooled.fire_fraction[keep], correct),
        "summary": summary,
    }


def analyze_layer(layer: int, sae: TopKSAE, sample: EncodedSample, rows: SampleRows, history: dict,
                  rollouts: dict[int, Rollout], cfg: PipelineConfig, context_of) -> dict:
    """Every statistic of one layer's SAE."""
    values, indices = sample.values, sample.indices
    rates = fire_rates(indices, values, sae.n_features)
    token_auroc = token_level_auroc(sample, rows, sae.n_features)
    by_rollout = rollout_level(sample, rows, rollouts, sae.n_features, cfg)
    top = top_activating_rows(indices, values, sae.n_features, cfg.release.top_contexts)
    shown = {row for ranked in top.values() for row, _ in ranked}
    text = {row: context_of(int(rows.rollout_id[row]), int(sample.position[row])) for row in shown}
    contexts = describe_contexts(top, {row: t for row, (_, t) in text.items()}, lambda row: text[row])
    cosine, pair = max_decoder_cosine(sae.W_dec.detach())
    summary = {
        **reconstruction_stats(sae, sample, rows, cfg),
        **feature_health(rates),
        **density_summary(rates),
        "dead_over_tokens": int(len(values)),
        "max_decoder_cosine": cosine,
        "max_decoder_cosine_pair": pair,
        "revived": int(history["revived"]),
        "train_rows": len(rows.train_rows),
        "heldout_rows": len(rows.heldout_rows),
        "token_level": token_auroc_summary(token_auroc, rates),
        "rollout_level": by_rollout["summary"],
    }
    stats = {
        "fire_rate": rates.tolist(),
        "token_auroc": None if token_auroc is None else token_auroc.tolist(),
        "token_direction": None if token_auroc is None else auroc_direction(token_auroc),
        **rollout_feature_lists(by_rollout),
        "summary": by_rollout["summary"],
    }
    return {"summary": summary, "stats": stats, "contexts": contexts, "rates": rates, "token_auroc": token_auroc,
            "rollout": by_rollout, "train_mean": sample.train_sum / max(len(rows.train_rows), 1)}


def token_auroc_summary(auroc: np.ndarray | None, rates: np.ndarray) -> dict:
    """The largest token-level AUROC, as the original release reported it (no null: see rollout_level)."""
    if auroc is None:
        return {"max_auroc": None, "feature": None, "fire_rate": None, "direction": None}
    best = int(np.argmax(auroc))
    return {"max_auroc": float(auroc[best]), "feature": best, "fire_rate": float(rates[best]),
            "direction": auroc_direction(auroc[best:best + 1])[0]}


def rollout_feature_lists(by_rollout: dict) -> dict:
    names = ("rollout_auroc", "rollout_p", "rollout_q", "rollout_auroc_mean", "rollout_auroc_fire_fraction")
    if by_rollout["reason"] is not None:
        return dict.fromkeys(names)
    test = by_rollout["test"]
    arrays = (test.auroc, test.p, by_rollout["q"], by_rollout["auroc_mean"], by_rollout["auroc_fire_fraction"])
    return {name: np.asarray(a, dtype=np.float64).tolist() for name, a in zip(names, arrays)}


def fidelity_rollouts(selection: RowSelection, rollouts: dict[int, Rollout], limit: int | None,
                      seed: int) -> list[RolloutTokens]:
    """The held-out rollouts the model-loss fidelity runs on (a seeded sample of `limit` of them), each
    spliced at the positions of its rows that pass the masks; a response of one token predicts nothing."""
    ids = sorted(r for r in selection.heldout_positions if rollouts[r].n_response_tokens >= 2)
    if limit is not None and limit < len(ids):
        ids = sorted(np.random.default_rng(seed).choice(ids, size=limit, replace=False).tolist())
    return [RolloutTokens(r, rollouts[r].prompt_token_ids + rollouts[r].response_token_ids,
                          rollouts[r].n_prompt_tokens, selection.heldout_positions[r]) for r in ids]


def prepare_selection(cfg: PipelineConfig, run_dir: Path, rollouts: dict[int, Rollout]) -> RowSelection:
    """The rows the SAEs were trained and held out on, from the saved split; refuses a config or a
    store that would give other rows."""
    split = load_split(run_dir)
    check_same_split(split, RowRules.from_config(cfg), {r: x.question_id for r, x in rollouts.items()})
    selection = select_rows(run_dir / "activations", list(cfg.capture.layers), split)
    if split.rows and selection.counts != split.rows:
        raise SplitMismatchError("the activation store no longer gives the rows the SAEs were trained on "
                                 f"(split.json: {split.rows}, now: {selection.counts}); train again")
    return selection


def build_release(
    cfg: PipelineConfig, run_dir: Path, trained: dict[int, tuple[TopKSAE, dict]], tokenizer, timings: dict,
    fidelity_of: FidelityFn | None = None,
) -> Path:
    """Write <run>/release atomically (staged, then renamed); returns its path. `fidelity_of` computes
    the fidelity in the model's loss (None: not computed, and the card says so)."""
    store_dir = run_dir / "activations"
    manifest = read_manifest(store_dir)
    for layer in cfg.capture.layers:  # before any work: e.g. the store was captured again from another model
        if trained[layer][0].d_in != manifest["d_model"]:
            raise ValueError(f"layer {layer}: the trained SAE has d_in {trained[layer][0].d_in} but the store's "
                             f"residuals have d_model {manifest['d_model']}; train the layer again on this store")
    rollouts = {r.rollout_id: r for r in read_rollouts(run_dir / "rollouts.parquet")}
    selection = prepare_selection(cfg, run_dir, rollouts)
    labels = rollout_labels(rollouts, cfg.release.unscored_rollouts)
    context_of = token_context(rollouts, tokenizer, cfg.release.context_tokens)
    final = run_dir / "release"
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".release-"))
    try:
        results, exported, files, rows = {}, {}, [], None
        for layer in cfg.capture.layers:
            sae, history = trained[layer]
            sample = encode_sample(sae, StoreSource(store_dir, layer, selection.rows), selection,
                                   keep_residuals=cfg.release.export_activations)
            rows = sample_rows_of(selection, rollouts, labels, sample.position)
            results[layer] = analyze_layer(layer, sae, sample, rows, history, rollouts, cfg, context_of)
            exported[layer] = sample.residuals
            del sample  # its codes and held-out residuals: one layer's at a time
            files += [p.relative_to(staging).as_posix() for p in sae.save_release(staging, layer, hook_name(layer)).values()]
        fidelity = None
        if fidelity_of is not None:
            tokens = fidelity_rollouts(selection, rollouts, cfg.release.fidelity_rollouts, cfg.train.split_seed)
            fidelity = fidelity_of(tokens, {layer: r["train_mean"] for layer, r in results.items()})
        files += write_data_files(staging, cfg, results, rows, exported, fidelity, run_dir)
        chart_files = write_charts(staging, cfg, results, trained)
        write_json(staging / "final_summary.json", {
            "layers": {str(layer): {**r["summary"], "fidelity": None if fidelity is None else fidelity[layer]}
                       for layer, r in results.items()},
            "variance_explained_formula": VE_FORMULA,
            "rollouts": outcome_counts(rollouts, cfg.release.unscored_rollouts),
            "rows": selection.counts,
            "wall_clock_seconds": timings,
        })
        files.append("final_summary.json")
        info = card_info(cfg, manifest, rollouts, results, selection, fidelity, files, chart_files, timings)
        (staging / "README.md").write_text(card.render_model_card(info))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def outcome_counts(rollouts: dict[int, Rollout], unscored: str) -> dict:
    """How many rollouts of each outcome, and what the statistics did with the unscored ones."""
    counts = {outcome: 0 for outcome in ("correct", "wrong", "truncated", "no_answer")}
    for r in rollouts.values():
        counts[r.outcome] += 1
    return {"n": len(rollouts), **counts, "unscored_rollouts": unscored,
            "finish_reason_length": sum(r.finish_reason == "length" for r in rollouts.values())}


def write_data_files(staging: Path, cfg: PipelineConfig, results: dict, rows: SampleRows, exported: dict,
                     fidelity: dict | None, run_dir: Path) -> list[str]:
    """labels.npy, split.json, the activations and rollout features, feature_stats.json,
    feature_characterization.json and fidelity.json; returns their names."""
    np.save(staging / "labels.npy", rows.label)
    shutil.copyfile(run_dir / "saes" / "split.json", staging / "split.json")
    names = ["labels.npy", "split.json"]
    if cfg.release.export_activations:  # in the store dtype, as read
        save_file({**{f"L{layer}": residuals for layer, residuals in exported.items()},
                   "rollout_id": rows.rollout_id.astype(np.int64), "heldout": rows.heldout.astype(np.uint8)},
                  str(staging / "activations.safetensors"))
        names.append("activations.safetensors")
    first = next(iter(results.values()))["rollout"]
    if len(first["rollout_id"]):
        save_file({**{f"L{layer}": r["rollout"]["pooled"].max[r["rollout"]["keep"]] for layer, r in results.items()},
                   "rollout_id": first["rollout_id"].astype(np.int64), "label": first["label"]},
                  str(staging / "rollout_features.safetensors"))
        names.append("rollout_features.safetensors")
    write_json(staging / "feature_stats.json", {
        "rows": "token-level statistics over the rows of activations.safetensors / labels.npy (labelled rows "
                "only for AUROC); rollout-level ones over the labelled rollouts of rollout_features.safetensors",
        "healthy_range": list(HEALTHY_RANGE),
        "layers": {str(layer): r["stats"] for layer, r in results.items()},
    })
    write_json(staging / "feature_characterization.json",
               {"layers": {str(layer): r["contexts"] for layer, r in results.items()}})
    names += ["feature_stats.json", "feature_characterization.json"]
    if fidelity is not None:
        write_json(staging / "fidelity.json", {"definition": FIDELITY_DEFINITION,
                                               "layers": {str(layer): entry for layer, entry in fidelity.items()}})
        names.append("fidelity.json")
    return names


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))


def write_charts(staging: Path, cfg: PipelineConfig, results: dict, trained: dict) -> list[str]:
    ve = {L: (r["summary"]["variance_explained"], *r["summary"]["ve_ci"]) for L, r in results.items()
          if r["summary"]["ve_ci"] is not None}
    paths = [charts.plot_variance_explained(ve, staging / charts.VARIANCE_EXPLAINED_PNG)] if ve else []
    paths += [
        charts.plot_fire_rates({L: r["rates"] for L, r in results.items()}, staging / charts.FIRE_RATES_PNG),
        charts.plot_auroc({L: rollout_auroc_and_band(r) for L, r in results.items()},
                          staging / charts.FEATURE_AUROC_PNG),
        charts.plot_training(
            {L: history for L, (_, history) in trained.items()},
            staging / charts.TRAINING_CURVES_PNG,
            cfg.train.revival_period() or None,
        ),
        charts.plot_feature_health(
            {L: {key: r["summary"][key] for key in charts.HEALTH_CLASSES} for L, r in results.items()},
            staging / charts.FEATURE_HEALTH_PNG,
        ),
    ]
    return [p.name for p in paths]


def rollout_auroc_and_band(result: dict) -> tuple[np.ndarray, float] | None:
    by_rollout = result["rollout"]
    if by_rollout["reason"] is not None:
        return None
    return by_rollout["test"].auroc, by_rollout["summary"]["chance_band_95"]


def card_info(cfg, manifest, rollouts, results, selection, fidelity, files, chart_files, timings) -> dict:
    return {
        "model_id": manifest["model_id"],
        "model_revision": manifest["model_revision"],
        "layers": list(cfg.capture.layers),
        "d_model": manifest["d_model"],
        "n_features": cfg.train.n_features,
        "k": cfg.train.k,
        "hook": manifest["hook"],
        "questions": {"source": cfg.rollout.questions, "seed": cfg.rollout.seed,
                      "thinking": cfg.rollout.thinking, "max_new_tokens": cfg.rollout.max_new_tokens},
        "outcomes": outcome_counts(rollouts, cfg.release.unscored_rollouts),
        "tokens": {
            "total_response_tokens": int(sum(r.n_response_tokens for r in rollouts.values())),
            "per_layer_train": selection.counts["train"],
            "per_layer_heldout": selection.counts["heldout"],
        },
        "rows": {**selection.counts, "max_norm_multiple": cfg.capture.max_norm_multiple,
                 "max_tokens_per_layer": cfg.capture.max_tokens_per_layer},
        "split": {"holdout_fraction": cfg.train.holdout_fraction, "seed": cfg.train.split_seed,
                  "heldout_rollouts": len(selection.heldout_positions)},
        "recipe": {
            "recipe": cfg.train.recipe,
            "optimizer": "Adam",
            "lr": cfg.train.learning_rate(),
            "batch_size": cfg.train.batch_size,
            "epochs": cfg.train.epochs,
            "revive_every_epochs": cfg.train.revival_period(),
            "dead_after_steps": cfg.train.dead_after_steps,
        },
        "statistics": {"bootstrap": cfg.release.bootstrap, "permutations": cfg.release.permutations},
        "per_layer": {str(L): r["summary"] for L, r in results.items()},
        "fidelity": None if fidelity is None else {str(L): entry for L, entry in fidelity.items()},
        "files": files + ["README.md"],
        "charts": chart_files,
        "wall_clock": timings,
        "engine": cfg.rollout.engine,
        "qsae_version": qsae.__version__,
    }
