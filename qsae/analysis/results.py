"""A layer's analysis as the analyze stage leaves it in the run directory (analysis/layer=<L>/) for the
stages after it: the numbers as JSON (summary.json), the arrays as safetensors (arrays.safetensors,
features.safetensors). Nothing is pickled; every array reads back bit for bit."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qsae.analysis.feature_data import Examples, LayerFeatures, examples_by_feature

SUMMARY, ARRAYS, FEATURES = "summary.json", "arrays.safetensors", "features.safetensors"


@dataclass
class LayerAnalysis:
    """Every statistic of one layer's SAE over its sample, and its feature data."""

    layer: int
    summary: dict  # JSON: the layer's headline numbers (final_summary.json and the card)
    feature_stats: dict  # JSON: per-feature lists and the rollout-level summary (feature_stats.json)
    core_metrics: dict  # JSON: SAEBench's reconstruction, shrinkage and sparsity groups (ecosystem)
    rollouts_fired: np.ndarray  # [n] sampled rollouts in which each feature fired
    train_mean: np.ndarray  # [d] float64, the training rows' mean (the mean ablation)
    rollout_ids: np.ndarray  # [R] the labelled rollouts with rows in the sample, ascending
    rollout_labels: np.ndarray  # [R] uint8, 1 = correct
    rollout_max: np.ndarray  # [R, n] float32, each feature's max activation over the rollout's sampled tokens
    dom_direction: np.ndarray | None  # [d] correct minus wrong training rollouts' mean residual, if both occur
    features: LayerFeatures | None = None  # qsae.analysis.feature_data

    @property
    def fire_rate(self) -> np.ndarray:
        return np.asarray(self.feature_stats["fire_rate"], dtype=np.float64)

    @property
    def rollout_auroc_and_band(self) -> tuple[np.ndarray, float] | None:
        """Each feature's rollout-level AUROC minus its null centre, and the layer's 95% chance band of
        that distance; None when not computable."""
        level = self.summary["rollout_level"]
        if level["reason"] is not None:
            return None
        auroc, centre = (np.asarray(self.feature_stats[name]) for name in ("rollout_auroc", "rollout_null_centre"))
        return auroc - centre, level["chance_band_95"]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SUMMARY).write_text(json.dumps({"layer": self.layer, "summary": self.summary,
                                                  "feature_stats": self.feature_stats,
                                                  "core_metrics": self.core_metrics}, allow_nan=False))
        arrays = {"rollouts_fired": self.rollouts_fired, "train_mean": self.train_mean, "rollout_ids": self.rollout_ids,
                  "rollout_labels": self.rollout_labels, "rollout_max": self.rollout_max}
        if self.dom_direction is not None:
            arrays["dom_direction"] = self.dom_direction
        save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, str(folder / ARRAYS))
        if self.features is not None:
            save_features(self.features, folder / FEATURES)

    @classmethod
    def load(cls, folder: Path) -> LayerAnalysis:
        if not (folder / SUMMARY).exists():
            raise FileNotFoundError(f"no analysis at {folder}: run the analyze stage first")
        data = json.loads((folder / SUMMARY).read_text())
        arrays = load_file(str(folder / ARRAYS))
        features = load_features(folder / FEATURES) if (folder / FEATURES).exists() else None
        return cls(layer=data["layer"], summary=data["summary"], feature_stats=data["feature_stats"],
                   core_metrics=data["core_metrics"], rollouts_fired=arrays["rollouts_fired"],
                   train_mean=arrays["train_mean"], rollout_ids=arrays["rollout_ids"],
                   rollout_labels=arrays["rollout_labels"], rollout_max=arrays["rollout_max"],
                   dom_direction=arrays.get("dom_direction"), features=features)


EXAMPLE_FIELDS = ("feature", "row", "group", "rollout_id", "position", "token_ids", "acts")


def save_features(features: LayerFeatures, path: Path) -> None:
    """LayerFeatures as one safetensors file: its arrays as tensors, its histograms and quantile bins
    as JSON in the metadata."""
    arrays = {"live": features.live, "fire_count": features.fire_count, "mean_activation": features.mean_activation,
              "max_activation": features.max_activation, "similar_ids": features.similar[0],
              "similar_cosines": features.similar[1],
              **{f"examples.{name}": getattr(features.examples, name) for name in EXAMPLE_FIELDS}}
    metadata = {"n_rows": str(features.n_rows), "histograms": json.dumps(features.histograms),
                "bins": json.dumps(features.bins)}
    save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, str(path), metadata=metadata)


def load_features(path: Path) -> LayerFeatures:
    arrays = load_file(str(path))
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    examples = Examples(*(arrays[f"examples.{name}"] for name in EXAMPLE_FIELDS))
    return LayerFeatures(
        n_rows=int(metadata["n_rows"]), live=arrays["live"], fire_count=arrays["fire_count"],
        mean_activation=arrays["mean_activation"], max_activation=arrays["max_activation"],
        histograms={int(f): h for f, h in json.loads(metadata["histograms"]).items()},
        bins={int(f): b for f, b in json.loads(metadata["bins"]).items()}, examples=examples,
        similar=(arrays["similar_ids"], arrays["similar_cosines"]),
        by_feature=examples_by_feature(examples.feature, arrays["live"]))
