"""Analyze and release: per-layer statistics, charts, weight exports and the model card.

Each layer's sample is streamed from the store chunk by chunk and kept only as top-k codes, token
metadata and the held-out rows' residuals, so the analysis needs memory for N x k codes, not for N
residual rows (unless the sample itself is exported).

The release is assembled in a staging directory and renamed into place only when complete, so a
failed run never leaves a half-written release where a good one is expected.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.numpy import save_file

import qsae
from qsae.analysis import card, charts
from qsae.analysis.contexts import describe_contexts, top_activating_rows
from qsae.analysis.features import (
    HEALTHY_RANGE,
    auroc_direction,
    auroc_per_feature,
    feature_health,
    fire_rates,
)
from qsae.analysis.fidelity import mean_l0, variance_explained, variance_explained_ci
from qsae.config import PipelineConfig
from qsae.rollout import Rollout, read_rollouts
from qsae.sae import TopKSAE
from qsae.store import CHUNK_ROWS, StoreSource, read_manifest
from qsae.train import sampled_split

VE_FORMULA = "1 - sum_rows ||x - x_hat||^2 / sum_rows ||x - mean(x)||^2 (pooled over held-out rows)"
METADATA_COLUMNS = ["rollout_id", "position", "correct"]  # what the analysis needs besides `act`


@dataclass
class SampleRows:
    """Which tokens a layer's sample holds, in sample order (the same at every layer), and its split."""

    rollout_id: np.ndarray
    position: np.ndarray
    correct: np.ndarray  # bool, the rollout's correctness for every token
    train_rows: np.ndarray  # positions in the sample
    heldout_rows: np.ndarray


@dataclass
class EncodedSample:
    """One layer's sample as the analysis keeps it: residuals of the held-out rows only, unless the
    whole sample is exported. Residuals stay in the store dtype (float16 widens exactly later)."""

    rows: SampleRows
    values: np.ndarray  # [N, k] float32, top-k activations
    indices: np.ndarray  # [N, k] int32, their feature ids
    heldout_residuals: np.ndarray  # [len(rows.heldout_rows), d_model]
    residuals: np.ndarray | None  # [N, d_model], only when the sample is exported


@torch.no_grad()
def encode_sample(sae: TopKSAE, source: StoreSource, train_rows: np.ndarray, heldout_rows: np.ndarray,
                  keep_residuals: bool = False) -> EncodedSample:
    """One pass over the sampled rows in `source` (its chunks follow the sample's order), one chunk
    in memory at a time: top-k codes and metadata of every row, residuals of the held-out rows."""
    values, indices, metadata, heldout, kept = [], [], [], [], []
    offset = 0
    for chunk, size in enumerate(source.chunk_sizes):
        x = source.read_chunk(chunk)
        v, i = sae.encode_topk(torch.from_numpy(x.astype(np.float32)))
        values.append(v.numpy())
        indices.append(i.numpy().astype(np.int32))  # feature ids fit: half the memory of int64
        metadata.append(source.read_columns(chunk, METADATA_COLUMNS))  # the memory-mapped `act` stays unread
        lo, hi = np.searchsorted(heldout_rows, [offset, offset + size])
        heldout.append(x[heldout_rows[lo:hi] - offset])
        kept += [x] if keep_residuals else []
        offset += size
    table = pa.concat_tables(metadata)
    rows = SampleRows(
        rollout_id=table.column("rollout_id").to_numpy(),
        position=table.column("position").to_numpy(),
        correct=table.column("correct").to_numpy(zero_copy_only=False),
        train_rows=train_rows,
        heldout_rows=heldout_rows,
    )
    return EncodedSample(rows, np.concatenate(values), np.concatenate(indices), np.concatenate(heldout),
                         np.concatenate(kept) if keep_residuals else None)


def encode_layer_sample(store_dir: Path, layer: int, sae: TopKSAE, cfg: PipelineConfig) -> EncodedSample:
    """The layer's seeded sample and split, the same rows the trainer drew, streamed from the store."""
    sampled, train_rows, heldout_rows = sampled_split(
        store_dir, layer, cfg.capture.max_tokens_per_layer, cfg.train.holdout_fraction, cfg.train.seed
    )
    return encode_sample(sae, StoreSource(store_dir, layer, sampled), train_rows, heldout_rows,
                         keep_residuals=cfg.release.export_activations)


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


def analyze_layer(
    layer: int, sae: TopKSAE, sample: EncodedSample, history: dict, cfg: PipelineConfig, context_of
) -> dict:
    """Every statistic of one layer's SAE; AUROC only where both classes occur."""
    values, indices, rows = sample.values, sample.indices, sample.rows
    held = rows.heldout_rows
    x_held = sample.heldout_residuals
    x_hat = reconstruct(sae, values[held], indices[held])
    ve = variance_explained(x_held, x_hat)
    ve_ci = variance_explained_ci(x_held, x_hat, n_boot=cfg.release.bootstrap, seed=cfg.train.seed)
    rates = fire_rates(indices, values, sae.n_features)
    both_classes = 0 < rows.correct.sum() < len(rows.correct)
    auroc = auroc_per_feature(indices, values, rows.correct, sae.n_features) if both_classes else None
    top = top_activating_rows(indices, values, sae.n_features, cfg.release.top_contexts)
    shown = {row for ranked in top.values() for row, _ in ranked}
    text = {row: context_of(int(rows.rollout_id[row]), int(rows.position[row])) for row in shown}
    contexts = describe_contexts(top, {row: t for row, (_, t) in text.items()}, lambda row: text[row])
    summary = {
        "variance_explained": ve,
        "ve_ci": list(ve_ci),
        "l0": mean_l0(values[held]),
        **feature_health(rates),
        "revived": int(history["revived"]),
        "train_rows": len(rows.train_rows),
        "heldout_rows": len(held),
    }
    if auroc is not None:
        best = int(np.argmax(auroc))
        summary.update(
            max_auroc=float(auroc[best]),
            max_auroc_feature=best,
            max_auroc_fire_rate=float(rates[best]),
            max_auroc_direction=auroc_direction(auroc[best : best + 1])[0],
        )
    else:
        summary.update(max_auroc=None, max_auroc_feature=None, max_auroc_fire_rate=None, max_auroc_direction=None)
    stats = {
        "fire_rate": rates.tolist(),
        "auroc": None if auroc is None else auroc.tolist(),
        "direction": None if auroc is None else auroc_direction(auroc),
    }
    return {"summary": summary, "stats": stats, "contexts": contexts, "rates": rates, "auroc": auroc}


def build_release(
    cfg: PipelineConfig, run_dir: Path, trained: dict[int, tuple[TopKSAE, dict]], tokenizer, timings: dict
) -> Path:
    """Write <run>/release atomically (staged, then renamed); returns its path."""
    store_dir = run_dir / "activations"
    manifest = read_manifest(store_dir)
    for layer in cfg.capture.layers:  # before any work: e.g. the store was captured again from another model
        if trained[layer][0].d_in != manifest["d_model"]:
            raise ValueError(f"layer {layer}: the trained SAE has d_in {trained[layer][0].d_in} but the store's "
                             f"residuals have d_model {manifest['d_model']}; train the layer again on this store")
    rollouts = {r.rollout_id: r for r in read_rollouts(run_dir / "rollouts.parquet")}
    context_of = token_context(rollouts, tokenizer, cfg.release.context_tokens)
    final = run_dir / "release"
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".release-"))
    try:
        results, samples, exported, files = {}, {}, {}, []
        for layer in cfg.capture.layers:
            sae, history = trained[layer]
            sample = encode_layer_sample(store_dir, layer, sae, cfg)
            results[layer] = analyze_layer(layer, sae, sample, history, cfg, context_of)
            samples[layer], exported[layer] = sample.rows, sample.residuals
            del sample  # its codes and held-out residuals: one layer's at a time
            files += [p.relative_to(staging).as_posix() for p in sae.save_release(staging, layer, hook_name(layer)).values()]
        labels = check_aligned(samples)
        np.save(staging / "labels.npy", labels)
        if cfg.release.export_activations:  # in the store dtype, as read
            save_file({f"L{layer}": residuals for layer, residuals in exported.items()},
                      str(staging / "activations.safetensors"))
        write_json(staging / "feature_stats.json", {
            "rows": "feature statistics over the rows of activations.safetensors / labels.npy",
            "healthy_range": list(HEALTHY_RANGE),
            "layers": {str(layer): r["stats"] for layer, r in results.items()},
        })
        write_json(staging / "feature_characterization.json", {
            "layers": {str(layer): r["contexts"] for layer, r in results.items()},
        })
        n_correct = int(sum(r.correct for r in rollouts.values()))
        write_json(staging / "final_summary.json", {
            "layers": {str(layer): r["summary"] for layer, r in results.items()},
            "variance_explained_formula": VE_FORMULA,
            "rollouts": {"n": len(rollouts), "correct": n_correct},
            "wall_clock_seconds": timings,
        })
        chart_files = write_charts(staging, cfg, results, trained)
        files += ["labels.npy", "feature_stats.json", "feature_characterization.json", "final_summary.json"]
        files += ["activations.safetensors"] if cfg.release.export_activations else []
        info = card_info(cfg, manifest, rollouts, results, samples, files, chart_files, timings)
        (staging / "README.md").write_text(card.render_model_card(info))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def check_aligned(samples: dict[int, SampleRows]) -> np.ndarray:
    """labels.npy serves every layer, so every layer's sample must be the same tokens in the same order."""
    first = next(iter(samples.values()))
    for layer, sample in samples.items():
        if not (np.array_equal(sample.rollout_id, first.rollout_id) and np.array_equal(sample.position, first.position)):
            raise RuntimeError(f"layer {layer}'s rows are not the same tokens as the other layers'; the store is inconsistent")
    return first.correct.astype(bool)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))


def write_charts(staging: Path, cfg: PipelineConfig, results: dict, trained: dict) -> list[str]:
    paths = [
        charts.plot_variance_explained(
            {L: (r["summary"]["variance_explained"], *r["summary"]["ve_ci"]) for L, r in results.items()},
            staging / charts.VARIANCE_EXPLAINED_PNG,
        ),
        charts.plot_fire_rates({L: r["rates"] for L, r in results.items()}, staging / charts.FIRE_RATES_PNG),
        charts.plot_auroc({L: r["auroc"] for L, r in results.items()}, staging / charts.FEATURE_AUROC_PNG),
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


def card_info(cfg, manifest, rollouts, results, samples, files, chart_files, timings) -> dict:
    n_correct = int(sum(r.correct for r in rollouts.values()))
    first = next(iter(samples.values()))
    return {
        "model_id": manifest["model_id"],
        "model_revision": manifest["model_revision"],
        "layers": list(cfg.capture.layers),
        "d_model": manifest["d_model"],
        "n_features": cfg.train.n_features,
        "k": cfg.train.k,
        "hook": manifest["hook"],
        "questions": {
            "source": cfg.rollout.questions,
            "n": len(rollouts),
            "seed": cfg.rollout.seed,
            "n_correct": n_correct,
            "n_wrong": len(rollouts) - n_correct,
        },
        "tokens": {
            "total_response_tokens": int(sum(r.n_response_tokens for r in rollouts.values())),
            "per_layer_train": len(first.train_rows),
            "per_layer_heldout": len(first.heldout_rows),
        },
        "recipe": {
            "recipe": cfg.train.recipe,
            "optimizer": "Adam",
            "lr": cfg.train.learning_rate(),
            "batch_size": cfg.train.batch_size,
            "epochs": cfg.train.epochs,
            "revive_every_epochs": cfg.train.revival_period(),
            "dead_after_steps": cfg.train.dead_after_steps,
        },
        "per_layer": {str(L): r["summary"] for L, r in results.items()},
        "auroc_defined": all(r["auroc"] is not None for r in results.values()),
        "files": files + ["README.md"],
        "charts": chart_files,
        "wall_clock": timings,
        "engine": cfg.rollout.engine,
        "qsae_version": qsae.__version__,
    }
