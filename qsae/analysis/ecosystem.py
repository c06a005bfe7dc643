"""The release's numbers and feature data in the layouts of the ecosystem's viewers.

- SAEBench's core evaluation output (`eval_type_id` "core": the JSON Neuronpedia shows for an SAE),
  one file per layer, `saebench/<release>_<hook>_eval_results.json`. Its seven metric groups are all
  required; qsae fills each from its own measurements on the held-out tokens and rollouts (the
  definitions are written into the file, under `eval_result_unstructured`), and writes SAEBench's
  own "not computed" value, -1, for what it did not measure (the loss metrics when the fidelity in
  the model's loss was not run). The ablation baseline is zero ablation, as SAEBench's.
- SAEDashboard's Neuronpedia runner output, `neuronpedia/<model>_<set>_<hook>_<n>/batch-<i>.json`
  (features in contiguous blocks of NEURONPEDIA_BATCH, dead ones left out and listed in
  skipped_indexes.json), which Neuronpedia's importer converts: per feature its decoder's largest
  residual dimensions, the logit table and a histogram of the logits over the vocabulary, its fire
  rate and activation histogram, and its example contexts (the top group first, then the quantile
  bins, highest first). Correlations of activations with neurons or other features are not
  computed (empty lists, as the importer accepts). Where autointerp ran, `explanations.jsonl` beside
  the batches holds one line per explained feature in the shape of Neuronpedia's explanation records
  (modelId, layer as <layer>-<set>, index, description, typeName, explanationModelName) with its
  detection and fuzzing balanced accuracies as scores.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import qsae
from qsae.analysis.features import nearest_decoder_directions
from qsae.analysis.facts import ReleaseFacts
from qsae.analysis.results import LayerAnalysis
from qsae.config import ReleaseConfig
from qsae.sae_files import hook_name, saelens_cfg

SAEBENCH_UNDEFINED = -1  # SAEBench's value for what was not computed (it writes -1 for NaN)
NEURONPEDIA_BATCH = 128  # features per batch file (SAEDashboard's runner default)
ALIGNMENT_DIMS = 3  # residual dimensions listed per feature (neuron_alignment_*)


def reconstruction_metrics(x: np.ndarray, x_hat: np.ndarray, values: np.ndarray) -> dict:
    """SAEBench's reconstruction_quality, shrinkage and sparsity groups over the held-out tokens:
    x, x_hat [H, d] and their codes' values [H, width]. Per-token quantities averaged over tokens."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    error = np.square(x - x_hat).sum(axis=1)
    spread = np.square(x - x.mean(axis=0)).sum(axis=1)
    norm_in, norm_out = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        explained = np.where(spread > 0, 1 - error / spread, np.nan)
        cosine = (x * x_hat).sum(axis=1) / (norm_in * norm_out)
    per_token = _finite_mean(explained)
    return {
        "reconstruction_quality": {"explained_variance": per_token,
                                   "explained_variance_legacy": per_token,  # the same formula in SAEBench 0.6
                                   "mse": float(error.mean() / x.shape[1]), "cossim": _finite_mean(cosine)},
        "shrinkage": {"l2_norm_in": float(norm_in.mean()), "l2_norm_out": float(norm_out.mean()),
                      "l2_ratio": float((norm_out / np.where(norm_in < 1e-4, 1.0, norm_in)).mean()),
                      "relative_reconstruction_bias": float(np.square(norm_out).mean() / (x * x_hat).sum(axis=1).mean())},
        "sparsity": {"l0": float((values > 0).sum(axis=1).mean()), "l1": float(values.sum(axis=1).mean())},
    }


def _finite_mean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else SAEBENCH_UNDEFINED


RECONSTRUCTION_DEFINITIONS = {
    "tokens": "the held-out tokens (all rows of the held-out questions' rollouts that pass the row masks)",
    "explained_variance": "mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean(x)||^2, mean over the held-out tokens "
                          "(SAEBench's per-token form; the card's variance explained is pooled instead)",
    "explained_variance_legacy": "the same value as explained_variance: SAEBench's (0.6) explained_variance_legacy is "
                                 "this per-token mean of 1 - ||x - x_hat||^2 / ||x - mean(x)||^2 (its mean(x) over "
                                 "each evaluation batch, here over the held-out tokens)",
    "mse": "mean over tokens of ||x - x_hat||^2 / d_model",
    "cossim": "mean over tokens of cos(x, x_hat)",
    "l2_ratio": "mean over tokens of ||x_hat|| / ||x||",
    "relative_reconstruction_bias": "mean ||x_hat||^2 / mean x . x_hat",
    "l0": "mean number of active latents per token", "l1": "mean sum of latent activations per token",
    "loss_metrics": "qsae's fidelity in the model's loss (fidelity.json): next-token CE and KL(clean || variant) "
                    "per scored token of the held-out rollouts, ablation = the layer's output set to zero",
    "feature_density": "fire rate over every sampled token (training and held out)",
    "consistent_activation_heuristic": "firing tokens / rollouts in which the feature fired at least once",
}


def saebench_core(*, layer: int, sae, hook: str, release_id: str, metrics: dict, fidelity: dict | None,
                  fire_rate: np.ndarray, fire_count: np.ndarray, rollouts_fired: np.ndarray, decoder_similar: np.ndarray,
                  config: dict, extra: dict) -> dict:
    """One layer's SAEBench core eval output. `metrics` is reconstruction_metrics'; `fidelity` the
    layer's fidelity.json entry or None; the per-feature arrays are over all n features
    (decoder_similar: each feature's largest cosine with another decoder row). `config` fills
    eval_config, `extra` joins eval_result_unstructured."""
    W_enc = sae.W_enc.detach().float().cpu()
    W_dec = sae.W_dec.detach().float().cpu()
    b_enc = sae.b_enc.detach().float().cpu().numpy()
    _, encoder_similar = nearest_decoder_directions(W_enc.T, 1)
    encoder_similar = encoder_similar[:, 0]
    encoder_norm = torch.linalg.vector_norm(W_enc, dim=0).numpy()
    enc_dec_cos = torch.nn.functional.cosine_similarity(W_enc.T, W_dec, dim=1).numpy()
    total = fire_rate.sum()
    density = {
        "freq_over_1_percent": float((fire_rate > 0.01).mean()),
        "freq_over_10_percent": float((fire_rate > 0.1).mean()),
        "normalized_freq_over_1_percent": float(fire_rate[fire_rate > 0.01].sum() / total) if total else 0.0,
        "normalized_freq_over_10_percent": float(fire_rate[fire_rate > 0.1].sum() / total) if total else 0.0,
        "average_max_encoder_cosine_sim": float(encoder_similar.mean()),
        "average_max_decoder_cosine_sim": float(decoder_similar.mean()),
        "frac_alive": float((fire_rate > 0).mean()),
    }
    f = fidelity or {}
    undefined = SAEBENCH_UNDEFINED
    kl, kl_zero = f.get("kl", undefined), f.get("kl_zero", undefined)
    details = [{"index": i, "feature_density": float(fire_rate[i]),
                "consistent_activation_heuristic": float(fire_count[i] / rollouts_fired[i]) if rollouts_fired[i] else undefined,
                "encoder_bias": float(b_enc[i]), "encoder_norm": float(encoder_norm[i]),
                "encoder_decoder_cosine_sim": float(enc_dec_cos[i]), "max_decoder_cosine_sim": float(decoder_similar[i]),
                "max_encoder_cosine_sim": float(encoder_similar[i])} for i in range(sae.n_features)]
    return {
        "eval_type_id": "core",
        "eval_config": config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {
            "model_behavior_preservation": {
                "kl_div_score": (kl_zero - kl) / kl_zero if fidelity and kl_zero else undefined,
                "kl_div_with_ablation": kl_zero, "kl_div_with_sae": kl},
            "model_performance_preservation": {
                "ce_loss_score": _or_undefined(f.get("ce_loss_recovered")),
                "ce_loss_with_ablation": f.get("ce_zero", undefined), "ce_loss_with_sae": f.get("ce_spliced", undefined),
                "ce_loss_without_sae": f.get("ce_clean", undefined)},
            **metrics,
            "token_stats": {"total_tokens_eval_reconstruction": f.get("n_tokens", undefined),
                            "total_tokens_eval_sparsity_variance": extra["heldout_tokens"]},
            "misc_metrics": density,
        },
        "eval_result_details": details,
        "sae_bench_commit_hash": "Unknown",
        "sae_lens_id": hook,
        "sae_lens_release_id": release_id,
        "sae_lens_version": None,
        "sae_cfg_dict": {**saelens_cfg(sae, hook), "hook_layer": layer},
        "eval_result_unstructured": {"written_by": f"qsae {qsae.__version__}", "definitions": RECONSTRUCTION_DEFINITIONS,
                                     **extra},
    }


def _or_undefined(value) -> float:
    return SAEBENCH_UNDEFINED if value is None else value


def saebench_file_name(release_id: str, hook: str) -> str:
    """SAEBench's result file name for an SAE (its `<release>_<sae id>_eval_results.json`, "/" as "_")."""
    return f"{release_id}_{hook}_eval_results.json".replace("/", "_")


# ------------------------------------------------------------------------------------------------
# Neuronpedia (SAEDashboard's runner layout)


def neuronpedia_folder(model_id: str, sae_set: str, hook: str, n_features: int) -> str:
    """The runner's output folder name: <model>_<set>_<hook>_<n>, "/" in a model id as "_"."""
    return re.sub(r"[/\\]", "_", f"{model_id}_{sae_set}_{hook}_{n_features}")


def neuronpedia_feature(record: dict, W_dec_row: np.ndarray, logit_histogram: tuple[list, list] | None,
                        context: dict) -> dict:
    """One feature of a batch file, from its browser record (feature_data.LayerFeatures.record).
    context: n_prompts_total, n_tokens_in_prompt, dataset, n_rows (sampled tokens)."""
    top_dims = np.argsort(-W_dec_row, kind="stable")[:ALIGNMENT_DIMS]
    l1 = float(np.abs(W_dec_row).sum()) or 1.0
    logits = record["logits"] or {"promoted": [], "suppressed": []}
    hist = record["histogram"]
    edges = np.asarray(hist["edges"], dtype=np.float64)
    centres = np.sqrt(edges[:-1] * edges[1:]).tolist() if len(edges) > 1 else []  # log-spaced bins
    heights, values = logit_histogram if logit_histogram is not None else ([], [])
    activations = [_activation(e, -1, record["max_activation"], -1) for e in record["top"]]
    share = record["fire_rate"] / max(len(record["quantiles"]), 1)  # each quantile bin holds about this share
    for b in reversed(record["quantiles"]):  # highest activations first, as the runner orders its bins
        activations += [_activation(e, b["low"], b["high"], share) for e in b["examples"]]
    return {
        "feature_index": record["feature"],
        "neuron_alignment_indices": top_dims.tolist(),
        "neuron_alignment_values": [round(float(W_dec_row[i]), 3) for i in top_dims],
        "neuron_alignment_l1": [round(abs(float(W_dec_row[i])) / l1, 3) for i in top_dims],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [t for t, _ in logits["suppressed"]], "neg_values": [round(v, 3) for _, v in logits["suppressed"]],
        "pos_str": [t for t, _ in logits["promoted"]], "pos_values": [round(v, 3) for _, v in logits["promoted"]],
        "frac_nonzero": record["fire_rate"],
        "freq_hist_data_bar_values": [round(c, 4) for c in centres], "freq_hist_data_bar_heights": hist["counts"],
        "logits_hist_data_bar_heights": heights, "logits_hist_data_bar_values": [round(v, 3) for v in values],
        "n_prompts_total": context["n_prompts_total"], "n_tokens_in_prompt": context["n_tokens_in_prompt"],
        "dataset": context["dataset"], "decoder_weights_dist": [],
        "activations": activations,
    }


def neuronpedia_explanation(record: dict, head: dict, explainer: str | None) -> dict:
    """A feature's explanation (its browser record's, from autointerp) as a Neuronpedia explanation
    record, its scores the detection and fuzzing balanced accuracies (null where not computable)."""
    entry = record["explanation"]
    return {"modelId": head["model_id"], "layer": f"{head['layer']}-{head['sae_set']}", "index": str(record["feature"]),
            "description": entry["explanation"], "typeName": "qsae-autointerp", "explanationModelName": explainer,
            "scores": [{"explanationScoreTypeName": method, "explanationScoreModelName": explainer,
                        "value": entry[method]["balanced_accuracy"]} for method in ("detection", "fuzzing")]}


def _activation(example: dict, bin_min: float, bin_max: float, bin_contains: float) -> dict:
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains, "tokens": example["tokens"],
            "values": example["acts"], "qualifying_token_index": example["at"]}


def sae_set_name(info: ReleaseFacts) -> str:
    """The release's name as SAEBench and Neuronpedia files give it (their SAELens release / SAE set)."""
    return f"qsae-{info.architecture}-{info.n_features}"


class NeuronpediaLayer:
    """One layer's folder in SAEDashboard's Neuronpedia runner layout, written as its live features'
    browser records (feature_data.LayerFeatures.record) arrive in ascending feature order: a batch
    file of NEURONPEDIA_BATCH consecutive feature indices once the batch is complete (a batch whose
    features are all dead gets no file; the runner skips it too), the index files at close().
    `info` is the model card's."""

    def __init__(self, root: Path, info: ReleaseFacts, release: ReleaseConfig, *, layer: int, sae, logits: dict | None):
        hook = hook_name(layer)
        self.out = root / neuronpedia_folder(info.model_id, sae_set_name(info), hook, sae.n_features)
        self.out.mkdir(parents=True)
        self.release, self.info, self.hook, self.n_features, self.logits = release, info, hook, sae.n_features, logits
        self.context = {"n_prompts_total": info.outcomes["n"],
                        "n_tokens_in_prompt": 2 * release.context_tokens + 1, "dataset": str(info.questions["source"])}
        self.W_dec = sae.W_dec.detach().float().cpu().numpy()
        self.head = {"model_id": info.model_id, "layer": layer, "sae_set": sae_set_name(info), "sae_id_suffix": None}
        self.number: int | None = None
        self.batch: list[dict] = []
        self.live: set[int] = set()
        self.explanations: list[dict] = []

    def add(self, record: dict) -> None:
        if record["feature"] // NEURONPEDIA_BATCH != self.number:
            self._write_batch()
            self.number, self.batch = record["feature"] // NEURONPEDIA_BATCH, []
        self.batch.append(record)
        self.live.add(record["feature"])
        if record.get("explanation"):
            self.explanations.append(neuronpedia_explanation(record, self.head, (self.info.autointerp or {}).get("explainer")))

    def _write_batch(self) -> None:
        if not self.batch:
            return
        logits = self.logits
        features = [neuronpedia_feature(
            r, self.W_dec[r["feature"]], None if logits is None else
            (logits["histogram_heights"][r["feature"]], logits["histogram_values"][r["feature"]]), self.context)
            for r in self.batch]
        (self.out / f"batch-{self.number}.json").write_text(json.dumps({**self.head, "features": features},
                                                                       allow_nan=False))
        self.batch = []

    def close(self) -> None:
        self._write_batch()
        if self.explanations:
            (self.out / "explanations.jsonl").write_text(
                "".join(json.dumps(e, allow_nan=False) + "\n" for e in self.explanations))
        release, info, live = self.release, self.info, self.live
        (self.out / "skipped_indexes.json").write_text(json.dumps({
            **self.head, "layer": str(self.head["layer"]), "log_sparsity": None,
            "skipped_indexes": [f for f in range(self.n_features) if f not in live]}, indent=1))
        (self.out / "run_settings.json").write_text(json.dumps({
            "written_by": f"qsae {qsae.__version__}", "hook_name": self.hook, "model_id": info.model_id,
            "model_revision": info.model_revision, "n_features_at_a_time": NEURONPEDIA_BATCH,
            "top_contexts": release.top_contexts, "quantile_bins": "5 quantile bins of the feature's activations",
            "quantile_examples": release.quantile_examples,
            "context_tokens_each_side": release.context_tokens, **self.context}, indent=1))


def write_saebench(out: Path, info: ReleaseFacts, analyses: dict[int, LayerAnalysis], saes: dict, *,
                   sweep: dict[int, list] | None = None) -> list[Path]:
    """Each layer's SAEBench core eval output under `out`, from the release's per-layer analysis
    (statistics and feature data) and fidelity, and each sweep SAE's (layer -> [(sae, SweepAnalysis,
    fidelity entry)]) under out/sweep/n=<n>-k=<k>/; returns the files."""
    out.mkdir()
    names = []
    for layer, analysis in analyses.items():
        entry = None if info.fidelity is None else info.fidelity[str(layer)]
        summary = analysis.summary
        extra = {"heldout_tokens": summary["heldout_rows"], "variance_explained_pooled": summary["variance_explained"],
                 "variance_explained_pooled_ci": summary["ve_ci"], "rollout_level": summary["rollout_level"],
                 "token_level": summary["token_level"]}
        features = analysis.features
        core = saebench_core(
            layer=layer, sae=saes[layer], hook=hook_name(layer), release_id=sae_set_name(info),
            metrics=analysis.core_metrics, fidelity=entry, fire_rate=analysis.fire_rate, fire_count=features.fire_count,
            rollouts_fired=analysis.rollouts_fired, decoder_similar=features.similar[1][:, 0],
            config=saebench_config(info, entry), extra=extra)
        names.append(write_core(out, layer, core))
        for sae, member, member_entry in (sweep or {}).get(layer, []):
            extra = {"heldout_tokens": summary["heldout_rows"],
                     "variance_explained_pooled": member.summary["variance_explained"],
                     "variance_explained_pooled_ci": member.summary["ve_ci"],
                     "over": "the layer's sampled tokens (feature density, activation heuristic)"}
            core = saebench_core(
                layer=layer, sae=sae, hook=hook_name(layer), release_id=f"{sae_set_name(info)}-{member.shape}",
                metrics=member.core_metrics, fidelity=member_entry, fire_rate=member.fire_rate,
                fire_count=member.fire_count, rollouts_fired=member.rollouts_fired,
                decoder_similar=member.decoder_similar, config=saebench_config(info, member_entry), extra=extra)
            names.append(write_core(out / "sweep" / member.shape, layer, core))
    return names


def saebench_config(info: ReleaseFacts, entry: dict | None) -> dict:
    """SAEBench's eval_config for a layer's SAE whose fidelity entry is `entry` (None: not computed)."""
    return {"model_name": info.model_id, "llm_dtype": info.model_dtype, "batch_size_prompts": 1,
            "n_eval_reconstruction_batches": 0 if entry is None else entry["n_rollouts"],
            "n_eval_sparsity_variance_batches": 1, "dataset": str(info.questions["source"]),
            "context_size": info.questions["max_new_tokens"], "compute_kl": entry is not None,
            "compute_ce_loss": entry is not None, "compute_l2_norms": True, "compute_sparsity_metrics": True,
            "compute_variance_metrics": True, "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": info.exclude_special_tokens, "verbose": False}


def write_core(out: Path, layer: int, core: dict) -> Path:
    """One SAEBench core file in `out`, named as SAEBench names it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / saebench_file_name(core["sae_lens_release_id"], hook_name(layer))
    path.write_text(json.dumps(core, indent=1, allow_nan=False))
    return path
