"""Analyze and release: per-layer statistics (analysis.layer), the fidelity in the model's loss,
charts, weight exports and the model card.

The rows are those the SAEs were trained and held out on (qsae.sample: masks, cap, split by question,
read back from the run's split.json, which a config that would change it may not). The release is
assembled in a staging directory and renamed into place only when complete, so a failed run never
leaves a half-written release where a good one is expected.
"""
from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import qsae
from qsae import causal
from qsae.analysis import card, charts, ecosystem
from qsae.analysis.feature_data import LayerFeatures, TokenTable, layer_features
from qsae.analysis.features import HEALTHY_RANGE
from qsae.analysis.layer import SampleRows, analyze_layer, encode_sample, rollout_labels, sample_rows_of
from qsae.analysis.model_loss import FIDELITY_DEFINITION, RolloutTokens
from qsae.browser import BLOCK_SIZE, LayerPages, write_assets, write_data
from qsae.config import PipelineConfig
from qsae.files import new_staging_dir, replace_directory
from qsae.questions import OUTCOMES
from qsae.rollout import Rollout, read_rollouts
from qsae.sae import TopKSAE
from qsae.sample import RowRules, RowSelection, SplitMismatchError, check_same_split, load_split, select_rows
from qsae.store import StoreSource, read_manifest
from qsae.train import TrainConfig

STAGING_PREFIX = ".release-"  # the release is assembled in <run>/.release-XXXX, then swapped in
VE_FORMULA = "1 - sum_rows ||x - x_hat||^2 / sum_rows ||x - mean(x)||^2 (pooled over held-out rows, float64)"
# (held-out rollouts with their splice positions, {layer: training mean}) ->
# ({layer: fidelity entry} or None without rollouts, {layer: decoder logit tables}): what needs the model
# (arms, held-out rollouts) -> {arm name: its Answers}: the causal check's reruns (qsae.causal)
CausalFn = Callable[[list, list[Rollout]], dict]
ModelSideFn = Callable[[list[RolloutTokens], dict[int, np.ndarray]], tuple[dict[int, dict] | None, dict[int, dict]]]


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


def check_trained_matches(cfg: PipelineConfig, trained: dict[int, tuple[TopKSAE, dict]], manifest: dict) -> None:
    """The SAEs are those the config names and fit the store's rows (else the release would name one
    SAE and hold another, or encode rows of another width): checked before any work."""
    asked = (cfg.train.architecture, cfg.train.n_features, cfg.train.k)
    for layer in cfg.capture.layers:
        sae = trained[layer][0]
        if (sae.architecture, sae.n_features, sae.k) != asked:
            raise ValueError(f"layer {layer}: the trained SAE is {sae.architecture} with n_features={sae.n_features}, "
                             f"k={sae.k}, but the config asks for {asked[0]} with n_features={asked[1]}, k={asked[2]}; "
                             "analyze with the config it was trained with, or train again")
        if sae.d_in != manifest["d_model"]:  # e.g. the store was captured again from another model
            raise ValueError(f"layer {layer}: the trained SAE has d_in {sae.d_in} but the store's residuals have "
                             f"d_model {manifest['d_model']}; train the layer again on this store")


def build_release(
    cfg: PipelineConfig, run_dir: Path, trained: dict[int, tuple[TopKSAE, dict]], tokenizer, timings: dict,
    model_side_of: ModelSideFn | None = None, causal_of: CausalFn | None = None,
) -> Path:
    """Write <run>/release atomically (staged, then renamed); returns its path. `model_side_of`
    computes the fidelity in the model's loss and the decoder logit tables (None: neither, and the
    card and the browser say so); `causal_of` runs the causal check's arms (None, or
    causal.enabled off: no causal check, and the card says so)."""
    store_dir = run_dir / "activations"
    manifest = read_manifest(store_dir)
    check_trained_matches(cfg, trained, manifest)
    rollouts = {r.rollout_id: r for r in read_rollouts(run_dir / "rollouts.parquet")}
    selection = prepare_selection(cfg, run_dir, rollouts)
    rows = sample_rows_of(selection, rollouts, rollout_labels(rollouts, cfg.release.unscored_rollouts))
    tokens = TokenTable({r: x.prompt_token_ids + x.response_token_ids for r, x in rollouts.items()})
    final = run_dir / "release"
    for stale in run_dir.glob(f"{STAGING_PREFIX}*"):  # what a killed run left half-assembled
        shutil.rmtree(stale, ignore_errors=True)
    staging = new_staging_dir(run_dir, STAGING_PREFIX)
    try:
        results, exported, files, features, causal_inputs = {}, {}, [], {}, {}
        causal_layers = cfg.causal.layers or cfg.capture.layers
        label_of = {rid: int(label) for rid, label in zip(rows.selection.rollout_id.tolist(), rows.label.tolist())}
        for layer in cfg.capture.layers:
            sae, history = trained[layer]
            sample = encode_sample(sae, StoreSource(store_dir, layer, selection.rows), selection,
                                   keep_residuals=cfg.release.export_activations)
            results[layer] = analyze_layer(layer, sae, sample, rows, history, rollouts, cfg)
            features[layer] = layer_features(
                sae.W_dec.detach(), sample.values, sample.indices, selection.rollout_id, sample.position, tokens,
                top=cfg.release.top_contexts, width=cfg.release.context_tokens,
                per_bin=cfg.release.quantile_examples, seed=cfg.train.split_seed)
            exported[layer] = sample.residuals
            if layer in causal_layers:
                causal_inputs[layer] = causal.training_inputs(results[layer]["rollout"]["pooled"], sample.rollout_sum,
                                                              label_of, set(selection.heldout_positions))
            del sample  # its codes and held-out residuals: one layer's at a time
            files += [p.relative_to(staging).as_posix() for p in sae.save_release(staging, layer, hook_name(layer)).values()]
        fidelity, logits = None, None
        if model_side_of is not None:  # else the card and the browser say what was not computed
            fidelity, logits = model_side_of(
                fidelity_rollouts(selection, rollouts, cfg.release.fidelity_rollouts, cfg.train.split_seed),
                {layer: r["train_mean"] for layer, r in results.items()})
        causal_check = None
        if causal_of is not None and cfg.causal.enabled:
            causal_check = run_causal_check(cfg, results, features, causal_inputs, rollouts, selection, causal_of)
            write_json(staging / "causal.json", causal_check)
            files.append("causal.json")
        files += write_data_files(staging, cfg, results, rows, exported, fidelity, run_dir)
        chart_files = write_charts(staging, cfg, results, trained, causal_check)
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
        info["causal"] = causal_check
        files += write_feature_pages(staging, cfg, info, results, features, trained, logits, token_texts(tokenizer),
                                     {r: x.outcome for r, x in rollouts.items()})
        files += [p.relative_to(staging).as_posix() for p in ecosystem.write_saebench(
            staging / "saebench", cfg, info, results, features, trained, fidelity, hook_name)]
        info["files"] = files + ["README.md"]
        (staging / "README.md").write_text(card.render_model_card(info))
        replace_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def outcome_counts(rollouts: dict[int, Rollout], unscored: str) -> dict:
    """How many rollouts of each outcome, and what the statistics did with the unscored ones."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for r in rollouts.values():
        counts[r.outcome] += 1
    return {"n": len(rollouts), **counts, "unscored_rollouts": unscored,
            "finish_reason_length": sum(r.finish_reason == "length" for r in rollouts.values())}


def write_data_files(staging: Path, cfg: PipelineConfig, results: dict, rows: SampleRows, exported: dict,
                     fidelity: dict | None, run_dir: Path) -> list[str]:
    """labels.npy, split.json, the activations and rollout features, feature_stats.json and
    fidelity.json; returns their names."""
    np.save(staging / "labels.npy", rows.label)
    shutil.copyfile(run_dir / "saes" / "split.json", staging / "split.json")
    names = ["labels.npy", "split.json"]
    if cfg.release.export_activations:  # in the store dtype, as read
        save_file({**{f"L{layer}": residuals for layer, residuals in exported.items()},
                   "rollout_id": rows.selection.rollout_id.astype(np.int64),
                   "heldout": rows.selection.heldout.astype(np.uint8)},
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
    names.append("feature_stats.json")
    if fidelity is not None:
        write_json(staging / "fidelity.json", {"definition": FIDELITY_DEFINITION,
                                               "layers": {str(layer): entry for layer, entry in fidelity.items()}})
        names.append("fidelity.json")
    return names


def token_texts(tokenizer) -> Callable[[int], str]:
    """The text of one token id, decoded once per id."""
    return functools.lru_cache(maxsize=None)(lambda token_id: tokenizer.decode([token_id]))


def write_feature_pages(staging: Path, cfg: PipelineConfig, info: dict, results: dict,
                        features: dict[int, LayerFeatures], trained: dict, logits: dict | None,
                        token_text: Callable[[int], str], outcome_of: dict[int, str]) -> list[str]:
    """browser/ (qsae.browser), neuronpedia/ (ecosystem) and feature_characterization.json (every
    live feature's top contexts); each feature's page is written to both as it is made, so memory
    holds one block of pages, not a layer's. Returns the files' names."""
    out = staging / "browser"
    charts = write_assets(out, [staging / name for name in info["charts"]])
    top_contexts = {}
    for layer, data in features.items():
        layer_logits = None if logits is None else logits[layer]
        pages = LayerPages(out, layer, len(data.fire_count))
        neuronpedia = ecosystem.NeuronpediaLayer(staging / "neuronpedia", cfg, info, layer, hook_name(layer),
                                                 trained[layer][0], layer_logits)
        tops = top_contexts[str(layer)] = {}
        for feature in data.live:
            record = data.record(int(feature), results[layer]["stats"], token_text, outcome_of.__getitem__,
                                 layer_logits)
            pages.add(record)
            neuronpedia.add(record)
            tops[str(record["feature"])] = record["top"]
        pages.close()
        neuronpedia.close()
    write_data(out, "release", browser_front_page(info, results, charts))
    write_json(staging / "feature_characterization.json", {
        "contexts": "per layer, per live feature: its top-activating tokens (descending), each with `tokens`, the "
                    "text of the tokens around it, `acts`, the feature's activation at each (0 where it did not "
                    "fire or the token is not in the sample), and `at`, the index of the token itself",
        "layers": top_contexts})
    return ["feature_characterization.json", *sorted(p.relative_to(staging).as_posix() for folder in
                                                     (out, staging / "neuronpedia") for p in folder.rglob("*") if p.is_file())]


def browser_front_page(info: dict, results: dict, charts: list[str]) -> dict:
    """data/release.js: the card's key numbers and each layer's headline statistics."""
    outcomes = info["outcomes"]
    scored = outcomes["correct"] + outcomes["wrong"]
    key_numbers = [
        ("Model", f"{info['model_id']}" + (f" @ {info['model_revision']}" if info["model_revision"] else "")),
        ("SAE", f"{info['architecture']}, {info['n_features']} features, k = {info['k']}, d_model {info['d_model']}"),
        ("Hook", info["hook"]),
        ("Layers", ", ".join(str(layer) for layer in info["layers"])),
        ("Rollouts", f"{outcomes['n']} ({outcomes['correct']} correct of {scored} scored)"),
        ("Sampled tokens per layer", f"{info['tokens']['per_layer_train']} training, "
                                     f"{info['tokens']['per_layer_heldout']} held out"),
        ("Recipe", f"{info['recipe']['recipe']}, lr {info['recipe']['lr']:.3g}, {info['recipe']['epochs']} epochs"),
    ]
    per_layer = {}
    for layer, r in results.items():
        summary, level = r["summary"], r["summary"]["rollout_level"]
        per_layer[str(layer)] = {
            "variance_explained": summary["variance_explained"], "ve_ci": summary["ve_ci"], "l0": summary["l0"],
            "live": info["n_features"] - summary["dead"], "dead": summary["dead"], "n_features": info["n_features"],
            "rollout_max_abs_auroc": level["max_abs_auroc"], "n_q_below_0_05": level["n_q_below_0_05"]}
    return {"title": f"{card.ARCHITECTURE_NAMES[info['architecture']]} sparse autoencoders for {info['model_id']}", "model_id": info["model_id"],
            "model_revision": info["model_revision"], "architecture": info["architecture"],
            "n_features": info["n_features"], "k": info["k"], "d_model": info["d_model"], "hook": info["hook"],
            "layers": list(info["layers"]),
            "key_numbers": [{"label": label, "value": value} for label, value in key_numbers],
            "per_layer": per_layer,
            "charts": [{"file": c, "title": Path(c).stem.replace("_", " ")} for c in charts],
            "block_size": BLOCK_SIZE}


def encoder_precision(train: TrainConfig) -> str:
    """The encoder matmul's precision as the config sets it (an unset autocast_bf16 is decided by
    each trainer's device, which the driver may not share)."""
    if train.recipe == "original" or train.autocast_bf16 is False:
        return "fp32"
    return "bf16 (autocast)" if train.autocast_bf16 else "bf16 where the training device has native bf16, else fp32"


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))


def run_causal_check(cfg: PipelineConfig, results: dict, features: dict[int, LayerFeatures], inputs: dict,
                     rollouts: dict[int, Rollout], selection: RowSelection, causal_of: CausalFn) -> dict:
    """causal.json: the plans of the layers checked (qsae.causal), run on the held-out rollouts (a
    seeded sample of causal.questions of them)."""
    plans = {}
    for layer in cfg.causal.layers or cfg.capture.layers:
        if layer not in inputs:
            plans[layer] = causal.LayerPlan(layer, skipped=f"layer {layer} is not captured "
                                                           f"(capture.layers = {list(cfg.capture.layers)})")
            continue
        pooled_max, labels, direction = inputs[layer]
        plans[layer] = causal.plan_layer(
            layer, m=cfg.causal.features, steer_multiples=cfg.causal.steer_multiples, fire_rate=results[layer]["rates"],
            typical=features[layer].mean_activation, pooled_max=pooled_max, labels=labels, direction=direction,
            seed=cfg.train.split_seed)
    ids = sorted(selection.heldout_positions)
    if cfg.causal.questions is not None and cfg.causal.questions < len(ids):
        ids = sorted(np.random.default_rng(cfg.train.split_seed).choice(ids, cfg.causal.questions, replace=False).tolist())
    return causal.run_causal(plans, [rollouts[r] for r in ids], causal_of, n_boot=cfg.release.bootstrap,
                             seed=cfg.train.split_seed)


def write_charts(staging: Path, cfg: PipelineConfig, results: dict, trained: dict,
                 causal_check: dict | None = None) -> list[str]:
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
    arms = {int(layer): entry["arms"] for layer, entry in ((causal_check or {}).get("layers") or {}).items()
            if entry["arms"]}
    if arms:
        paths.append(charts.plot_causal(arms, staging / charts.CAUSAL_PNG))
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
        "architecture": cfg.train.architecture,
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
            "lr_decay_fraction": cfg.train.decay_fraction(),
            "encoder_matmul": encoder_precision(cfg.train),
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
