"""The frontier of a layer's SAEs (train.sweep): each SAE's reconstruction of the held-out rows and its
fidelity in the model's loss, against its L0, on the same rows and rollouts as the layer's own SAE.

A sweep member's analysis is the reconstruction and health part of the layer's (qsae.analysis.layer)
over the same sample, and what its SAEBench core file needs; the correctness statistics, feature data
and browser stay with the layer's own SAE (the configured n_features/k). Kept in the run directory
(analysis/layer=<L>/sweep/n=<n>-k=<k>/) as JSON and safetensors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from qsae.analysis.features import feature_health, fire_counts, nearest_decoder_directions
from qsae.analysis.layer import EncodedSample, LayerInputs, architecture_summary, reconstruction_stats
from qsae.sae import TopKSAE

SUMMARY, ARRAYS = "summary.json", "arrays.safetensors"

FRONTIER_DEFINITION = {
    "l0": "mean number of active latents per held-out token",
    "fvu": "fraction of variance unexplained, 1 - variance explained (pooled over the held-out rows); fvu_ci "
           "from resampling held-out questions, as the layer's variance explained",
    "delta_ce": "next-token CE with the SAE spliced in minus clean, nats per scored token of the held-out rollouts "
                "(fidelity.json); delta_ce_ci a 95% bootstrap-t interval over questions",
    "kl": "mean KL(p_clean || p_spliced) per scored token, nats; kl_ci as delta_ce_ci",
    "ce_loss_recovered": "(ce_zero - ce_spliced) / (ce_zero - ce_clean), against the layer's one zero ablation",
    "selected": "the layer's SAE the statistics, feature browser and exports at the top level use "
                "(the configured train.n_features and train.k)",
}


@dataclass
class SweepAnalysis:
    """One sweep SAE of a layer over the layer's sample."""

    shape: str  # n=<n>-k=<k>
    summary: dict  # reconstruction (variance_explained, ve_ci, l0), health counts, architecture
    core_metrics: dict  # SAEBench's reconstruction, shrinkage and sparsity groups (ecosystem)
    fire_rate: np.ndarray  # [n] over the sampled tokens
    fire_count: np.ndarray  # [n] sampled tokens on which each feature fired
    rollouts_fired: np.ndarray  # [n] sampled rollouts in which each feature fired
    decoder_similar: np.ndarray  # [n] each decoder row's largest cosine with another

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SUMMARY).write_text(json.dumps({"shape": self.shape, "summary": self.summary,
                                                  "core_metrics": self.core_metrics}, allow_nan=False))
        arrays = {"fire_rate": self.fire_rate, "fire_count": self.fire_count, "rollouts_fired": self.rollouts_fired,
                  "decoder_similar": self.decoder_similar}
        save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, str(folder / ARRAYS))

    @classmethod
    def load(cls, folder: Path) -> SweepAnalysis:
        data = json.loads((folder / SUMMARY).read_text())
        arrays = load_file(str(folder / ARRAYS))
        return cls(shape=data["shape"], summary=data["summary"], core_metrics=data["core_metrics"], **arrays)


def analyze_sweep_member(shape: str, sae: TopKSAE, sample: EncodedSample, inputs: LayerInputs) -> SweepAnalysis:
    """A sweep SAE's reconstruction, health and SAEBench arrays over the layer's sample (encoded with it)."""
    values, indices = sample.values, sample.indices
    counts = fire_counts(indices, values, sae.n_features)
    rate = counts / max(len(values), 1)
    reconstruction, core_metrics = reconstruction_stats(sae, sample, inputs)
    _, similar = nearest_decoder_directions(sae.W_dec.detach(), 1)
    return SweepAnalysis(
        shape=shape,
        summary={**reconstruction, **feature_health(rate), **architecture_summary(sae, values),
                 "n_features": sae.n_features, "k": sae.k},
        core_metrics=core_metrics, fire_rate=rate, fire_count=counts,
        rollouts_fired=rollouts_fired(indices, values, inputs.rows.selection.rollout_id, sae.n_features),
        decoder_similar=similar[:, 0])


def rollouts_fired(indices: np.ndarray, values: np.ndarray, rollout_id: np.ndarray, n_features: int) -> np.ndarray:
    """[n] the number of distinct rollouts among the rows in which each feature fired (value > 0)."""
    active = values > 0
    features = indices[active].astype(np.int64)
    rollouts = np.broadcast_to(rollout_id[:, None], indices.shape)[active].astype(np.int64)
    pairs = np.unique(rollouts * n_features + features)
    return np.bincount(pairs % n_features, minlength=n_features)


def frontier_point(layer: int, shape: str, selected: bool, summary: dict, fidelity: dict | None) -> dict:
    """One SAE's row of its layer's frontier: L0 against FVU, delta CE and KL, each with its interval
    (None where not computed)."""
    ve_ci = summary.get("ve_ci")
    f = fidelity or {}
    return {
        "layer": layer, "sae": shape, "selected": selected, "architecture": summary["architecture"],
        "n_features": summary["n_features"], "k": summary["k"], "l0": summary["l0"],
        "fvu": 1 - summary["variance_explained"], "fvu_ci": None if ve_ci is None else [1 - ve_ci[1], 1 - ve_ci[0]],
        **{name: f.get(name) for name in ("delta_ce", "delta_ce_ci", "kl", "kl_ci", "ce_loss_recovered")},
    }


def layer_frontier(layer: int, selected: tuple[str, dict, dict | None],
                   members: dict[str, tuple[dict, dict | None]]) -> list[dict]:
    """A layer's frontier, by width then L0: the selected SAE (shape, summary, fidelity) and each sweep
    member's (shape -> summary, fidelity)."""
    shape, summary, fidelity = selected
    points = [frontier_point(layer, shape, True, summary, fidelity)]
    points += [frontier_point(layer, name, False, s, f) for name, (s, f) in members.items()]
    return sorted(points, key=lambda p: (p["n_features"], p["l0"]))
