"""Release stage: a pure writer. It reads the run directory (the store's manifest, the rollouts, the
split, the trained SAEs, the analysis, the evaluation and the causal check) and writes <run>/release:
weight exports, statistics, charts, the feature browser, SAEBench and Neuronpedia files and the
model card. No Ray, no model: everything it shows was computed by the stages before it.

The release is assembled in a staging directory and swapped in only when complete, so a failed run
never leaves a half-written release where a good one is expected.
"""
from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import qsae
from qsae.analysis import card, charts, ecosystem
from qsae.analysis.facts import ReleaseFacts
from qsae.analysis.features import HEALTHY_RANGE
from qsae.analysis.frontier import FRONTIER_DEFINITION, SweepAnalysis, layer_frontier
from qsae.analysis.layer import rollout_labels
from qsae.analysis.model_loss import FIDELITY_DEFINITION
from qsae.analysis.results import LayerAnalysis
from qsae.browser import BLOCK_SIZE, LayerPages, write_assets, write_data
from qsae.config import ReleaseConfig
from qsae.evaluate import load_fidelity, load_logits, load_sweep_fidelity
from qsae.files import replace_directory
from qsae.questions import OUTCOMES
from qsae.rollout import Rollout, read_rollouts
from qsae.rundir import RunDir
from qsae.sae_files import hook_name, save_sae
from qsae.sample import RowSelection, load_selection, load_split
from qsae.store import KeptPositions, read_manifest
from qsae.streaming import StoreSource
from qsae.training.trained import SWEEP, TrainedSAE, load_trained, sweep_member_name

FRONTIER_JSON = "frontier.json"
VE_FORMULA = "1 - sum_rows ||x - x_hat||^2 / sum_rows ||x - mean(x)||^2 (pooled over held-out rows, float64)"


@dataclass(frozen=True)
class ReleaseSettings:
    """What the release takes from the config: its own section, and the question source and seed the
    card names (everything else it reads from the run directory)."""

    release: ReleaseConfig
    questions: str
    question_seed: int


@dataclass
class RunRecord:
    """Everything the stages before the release left in the run directory."""

    manifest: dict
    rollouts: dict[int, Rollout]
    selection: RowSelection
    split_rules: dict
    trained: dict[int, TrainedSAE]
    analyses: dict[int, LayerAnalysis]
    fidelity: dict[int, dict] | None
    logits: dict[int, dict | None]  # the decoder directions' logit tables, None where not computed
    causal: dict | None
    timings: dict[str, float]
    sweep: dict[int, dict[str, SweepAnalysis]]  # each layer's other SAEs (train.sweep) by shape name
    sweep_fidelity: dict[int, dict[str, dict]]
    autointerp: dict | None = None  # the explanations and their scores, None where not run

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])


def read_run(run: RunDir) -> RunRecord:
    manifest = read_manifest(run.store)
    layers = manifest["layers"]
    trained = {layer: load_trained(run, layer) for layer in layers}
    return RunRecord(
        manifest=manifest, rollouts={r.rollout_id: r for r in read_rollouts(run.rollouts)},
        selection=load_selection(run.selection), split_rules=load_split(run).to_json()["rules"],
        trained=trained,
        analyses={layer: LayerAnalysis.load(run.layer_analysis(layer)) for layer in layers},
        fidelity=load_fidelity(run), logits={layer: load_logits(run, layer) for layer in layers},
        causal=json.loads(run.causal.read_text()) if run.causal.exists() else None, timings=run.read_timings(),
        sweep={layer: {m.shape_name: SweepAnalysis.load(run.sweep_analysis(layer, m.shape_name)) for m in t.sweep}
               for layer, t in trained.items() if t.sweep},
        sweep_fidelity=load_sweep_fidelity(run),
        autointerp=json.loads(run.autointerp.read_text()) if run.autointerp.exists() else None)


def build_release(run: RunDir, settings: ReleaseSettings, token_text: Callable[[int], str]) -> Path:
    """Write <run>/release atomically (staged, then swapped in); returns its path. `token_text` gives
    the text of a token id (the model's tokenizer)."""
    record = read_run(run)
    staging = run.new_release_staging()
    try:
        files = write_saes(staging, record)
        if record.causal is not None:
            write_json(staging / "causal.json", record.causal)
            files.append("causal.json")
        if record.autointerp is not None:
            write_json(staging / "autointerp.json", record.autointerp)
            files.append("autointerp.json")
        files += write_data_files(staging, record, run, settings.release)
        chart_files = write_charts(staging, record)
        frontier = layer_frontiers(record)
        if frontier:
            write_json(staging / FRONTIER_JSON, {"definition": FRONTIER_DEFINITION,
                                                 "layers": {str(layer): points for layer, points in frontier.items()}})
            files.append(FRONTIER_JSON)
            chart_files += [charts.plot_frontier(points, staging / charts.frontier_png(layer)).name
                            for layer, points in frontier.items()]
        write_json(staging / "final_summary.json", final_summary(record, settings.release))
        files.append("final_summary.json")
        facts = release_facts(record, settings, files, chart_files)
        facts.frontier = {str(layer): points for layer, points in frontier.items()} or None
        files += write_feature_pages(staging, facts, record, token_text=token_text, release=settings.release)
        saes = {layer: trained.sae for layer, trained in record.trained.items()}
        files += [p.relative_to(staging).as_posix() for p in
                  ecosystem.write_saebench(staging / "saebench", facts, record.analyses, saes,
                                           sweep=sweep_saebench_inputs(record))]
        facts.files = files + ["README.md"]
        (staging / "README.md").write_text(card.render_model_card(facts))
        replace_directory(staging, run.release)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return run.release


def write_saes(staging: Path, record: RunRecord) -> list[str]:
    """Every layer's SAE in every release format, and a sweep's others under sweep/n=<n>-k=<k>/;
    returns the files' names."""
    files = []
    for layer in record.layers:
        trained = record.trained[layer]
        for folder, sae in [(staging, trained.sae), *[(staging / SWEEP / m.shape_name, m.sae) for m in trained.sweep]]:
            paths = save_sae(sae, folder, layer, hook_name(layer))
            files += [p.relative_to(staging).as_posix() for p in paths.values()]
    return files


def layer_frontiers(record: RunRecord) -> dict[int, list[dict]]:
    """Each swept layer's frontier: its selected SAE and the sweep's others, on the same rows and rollouts."""
    frontiers = {}
    for layer, members in record.sweep.items():
        sae, analysis = record.trained[layer].sae, record.analyses[layer]
        selected = (sweep_member_name(sae.n_features, sae.k),
                    {**analysis.summary, "n_features": sae.n_features, "k": sae.k},
                    None if record.fidelity is None else record.fidelity[layer])
        fidelity = record.sweep_fidelity.get(layer, {})
        frontiers[layer] = layer_frontier(layer, selected, {shape: (m.summary, fidelity.get(shape))
                                                     for shape, m in members.items()})
    return frontiers


def sweep_saebench_inputs(record: RunRecord) -> dict[int, list[tuple[object, SweepAnalysis, dict | None]]]:
    """Each layer's sweep SAEs with their analysis and fidelity entry, for their SAEBench files."""
    return {layer: [(m.sae, record.sweep[layer][m.shape_name],
                     record.sweep_fidelity.get(layer, {}).get(m.shape_name)) for m in record.trained[layer].sweep]
            for layer in record.sweep}


def outcome_counts(rollouts: dict[int, Rollout], unscored: str) -> dict:
    """How many rollouts of each outcome, and what the statistics did with the unscored ones."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for r in rollouts.values():
        counts[r.outcome] += 1
    return {"n": len(rollouts), **counts, "unscored_rollouts": unscored,
            "finish_reason_length": sum(r.finish_reason == "length" for r in rollouts.values())}


def write_data_files(staging: Path, record: RunRecord, run: RunDir, release: ReleaseConfig) -> list[str]:
    """labels.npy, split.json, the activations and rollout features, feature_stats.json and
    fidelity.json; returns their names."""
    selection = record.selection
    label_of = rollout_labels(record.rollouts, release.unscored_rollouts)
    np.save(staging / "labels.npy", np.array([label_of[r] for r in selection.rollout_id.tolist()], dtype=np.int8))
    shutil.copyfile(run.split, staging / "split.json")
    names = ["labels.npy", "split.json"]
    if release.export_activations:  # in the store dtype, as read
        save_file({**{f"L{layer}": sample_residuals(run, layer, selection) for layer in record.layers},
                   "rollout_id": selection.rollout_id.astype(np.int64), "heldout": selection.heldout.astype(np.uint8)},
                  str(staging / "activations.safetensors"))
        names.append("activations.safetensors")
    first = record.analyses[record.layers[0]]
    if len(first.rollout_ids):
        save_file({**{f"L{layer}": a.rollout_max for layer, a in record.analyses.items()},
                   "rollout_id": first.rollout_ids.astype(np.int64), "label": first.rollout_labels},
                  str(staging / "rollout_features.safetensors"))
        names.append("rollout_features.safetensors")
    write_json(staging / "feature_stats.json", feature_stats_file(record.analyses))
    names.append("feature_stats.json")
    if record.fidelity is not None:
        sweep = {str(layer): shapes for layer, shapes in record.sweep_fidelity.items()}
        write_json(staging / "fidelity.json", {"definition": FIDELITY_DEFINITION,
                                               "layers": {str(layer): record.fidelity[layer] for layer in record.layers},
                                               **({"sweep": sweep} if sweep else {})})
        names.append("fidelity.json")
    return names


def feature_stats_file(analyses: dict[int, LayerAnalysis]) -> dict:
    """feature_stats.json: each layer's per-feature statistics."""
    return {
        "rows": "token-level statistics over the rows of activations.safetensors / labels.npy (labelled rows "
                "only for AUROC); rollout-level ones over the labelled rollouts of rollout_features.safetensors",
        "healthy_range": list(HEALTHY_RANGE),
        "layers": {str(layer): a.feature_stats for layer, a in analyses.items()},
    }


def layer_summary(analysis: LayerAnalysis, fidelity: dict | None) -> dict:
    """A layer's entry in final_summary.json: its headline statistics and fidelity (None: not computed)."""
    return {**analysis.summary, "fidelity": fidelity}


def sample_residuals(run: RunDir, layer: int, selection: RowSelection) -> np.ndarray:
    """The sampled rows of a layer, in the store dtype, read chunk by chunk from the store."""
    source = StoreSource(run.store, layer, selection.rows)
    return np.concatenate([source.read_chunk(chunk) for chunk in range(len(source.chunk_sizes))])


def final_summary(record: RunRecord, release: ReleaseConfig) -> dict:
    fidelity = record.fidelity
    return {
        "layers": {str(layer): layer_summary(a, None if fidelity is None else fidelity[layer])
                   for layer, a in record.analyses.items()},
        "variance_explained_formula": VE_FORMULA,
        "rollouts": outcome_counts(record.rollouts, release.unscored_rollouts),
        "rows": record.selection.counts,
        "wall_clock_seconds": record.timings,
    }


def token_texts(tokenizer) -> Callable[[int], str]:
    """The text of one token id, decoded once per id."""
    return functools.lru_cache(maxsize=None)(lambda token_id: tokenizer.decode([token_id]))


def write_feature_pages(staging: Path, facts: ReleaseFacts, record: RunRecord, *, token_text: Callable[[int], str],
                        release: ReleaseConfig) -> list[str]:
    """browser/ (qsae.browser), neuronpedia/ (ecosystem) and feature_characterization.json (every
    live feature's top contexts); each feature's page is written to both as it is made, so memory
    holds one block of pages, not a layer's. Returns the files' names."""
    out = staging / "browser"
    chart_paths = write_assets(out, [staging / name for name in facts.charts])
    outcome_of = {r: x.outcome for r, x in record.rollouts.items()}
    top_contexts = {}
    explained = (record.autointerp or {}).get("layers", {})
    for layer, analysis in record.analyses.items():
        data, logits = analysis.features, record.logits[layer]
        explanations = explained.get(str(layer), {}).get("features", {})
        pages = LayerPages(out, layer, len(data.fire_count))
        neuronpedia = ecosystem.NeuronpediaLayer(staging / "neuronpedia", facts, release, layer=layer,
                                                 sae=record.trained[layer].sae, logits=logits)
        tops = top_contexts[str(layer)] = {}
        for feature in data.live:
            page = data.record(int(feature), analysis.feature_stats, token_text=token_text,
                               outcome_of=outcome_of.__getitem__, logits=logits)
            page["explanation"] = explanation_entry(explanations.get(str(int(feature))))
            pages.add(page)
            neuronpedia.add(page)
            tops[str(page["feature"])] = page["top"]
        pages.close()
        neuronpedia.close()
    write_data(out, "release", browser_front_page(facts, record, chart_paths))
    write_json(staging / "feature_characterization.json", {
        "contexts": "per layer, per live feature: its top-activating tokens (descending), each with `tokens`, the "
                    "text of the tokens around it, `acts`, the feature's activation at each (0 where it did not "
                    "fire or the token was not encoded: prompt tokens, tokens the row rules leave out, and without "
                    "the encode pass tokens outside the sample), and `at`, the index of the token itself",
        "layers": top_contexts})
    return ["feature_characterization.json", *sorted(p.relative_to(staging).as_posix() for folder in
                                                     (out, staging / "neuronpedia") for p in folder.rglob("*") if p.is_file())]


def explanation_entry(entry: dict | None) -> dict | None:
    """A feature's explanation and its scores as its page shows them (autointerp.json's entry, less the
    null's details)."""
    if entry is None:
        return None
    keep = ("chosen_by", "explanation", "detection", "fuzzing", "null_detection", "null_fuzzing", "n_shown", "note")
    return {key: entry[key] for key in keep}


def browser_front_page(facts: ReleaseFacts, record: RunRecord, chart_paths: list[str]) -> dict:
    """data/release.js: the card's key numbers and each layer's headline statistics."""
    outcomes, recipe = facts.outcomes, facts.recipe
    scored = outcomes["correct"] + outcomes["wrong"]
    key_numbers = [
        ("Model", f"{facts.model_id}" + (f" @ {facts.model_revision}" if facts.model_revision else "")),
        ("SAE", f"{facts.architecture}, {facts.n_features} features, k = {facts.k}, d_model {facts.d_model}"
                + (f", prefixes {', '.join(map(str, prefixes))}" if (prefixes := recipe.get("matryoshka_prefixes")) else "")),
        ("Hook", facts.hook),
        ("Layers", ", ".join(str(layer) for layer in facts.layers)),
        ("Rollouts", f"{outcomes['n']} ({outcomes['correct']} correct of {scored} scored)"),
        ("Sampled tokens per layer", f"{facts.tokens['per_layer_train']} training, "
                                     f"{facts.tokens['per_layer_heldout']} held out"),
        ("Recipe", f"{recipe['recipe']}, lr {recipe['lr']:.3g}, {recipe['epochs']} epochs"),
    ]
    per_layer = {}
    for layer, analysis in record.analyses.items():
        summary, level = analysis.summary, analysis.summary["rollout_level"]
        per_layer[str(layer)] = {
            "variance_explained": summary["variance_explained"], "ve_ci": summary["ve_ci"], "l0": summary["l0"],
            "live": facts.n_features - summary["dead"], "dead": summary["dead"], "n_features": facts.n_features,
            "rollout_max_abs_auroc": level["max_abs_auroc"], "n_q_below_0_05": level["n_q_below_0_05"]}
    return {"title": f"{card.ARCHITECTURE_NAMES[facts.architecture]} sparse autoencoders for {facts.model_id}",
            "model_id": facts.model_id, "model_revision": facts.model_revision, "architecture": facts.architecture,
            "architecture_name": card.ARCHITECTURE_NAMES[facts.architecture],
            "matryoshka_prefixes": recipe.get("matryoshka_prefixes"),
            "n_features": facts.n_features, "k": facts.k, "d_model": facts.d_model, "hook": facts.hook,
            "layers": list(facts.layers),
            "key_numbers": [{"label": label, "value": value} for label, value in key_numbers],
            "per_layer": per_layer,
            "charts": [{"file": c, "title": Path(c).stem.replace("_", " ")} for c in chart_paths],
            "frontier": facts.frontier, "block_size": BLOCK_SIZE}


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))


def write_charts(staging: Path, record: RunRecord) -> list[str]:
    analyses = record.analyses
    ve = {L: (a.summary["variance_explained"], *a.summary["ve_ci"]) for L, a in analyses.items()
          if a.summary["ve_ci"] is not None}
    revival = next(iter(record.trained.values())).settings["revive_every_epochs"]
    paths = [charts.plot_variance_explained(ve, staging / charts.VARIANCE_EXPLAINED_PNG)] if ve else []
    paths += [
        charts.plot_fire_rates({L: a.fire_rate for L, a in analyses.items()}, staging / charts.FIRE_RATES_PNG),
        charts.plot_auroc({L: a.rollout_auroc_and_band for L, a in analyses.items()},
                          staging / charts.FEATURE_AUROC_PNG),
        charts.plot_training({L: t.history for L, t in record.trained.items()}, staging / charts.TRAINING_CURVES_PNG,
                             revival or None),
        charts.plot_feature_health({L: {key: a.summary[key] for key in charts.HEALTH_CLASSES} for L, a in analyses.items()},
                                   staging / charts.FEATURE_HEALTH_PNG),
    ]
    arms = {int(layer): entry["arms"] for layer, entry in ((record.causal or {}).get("layers") or {}).items()
            if entry["arms"]}
    if arms:
        paths.append(charts.plot_causal(arms, staging / charts.CAUSAL_PNG))
    return [p.name for p in paths]


# How rollouts were drawn, as a store's manifest records it; a store from before sampling was greedy.
SAMPLING_DEFAULTS = {"samples_per_question": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "sampling_seed": 0}


def release_facts(record: RunRecord, settings: ReleaseSettings, files: list[str], chart_files: list[str]) -> ReleaseFacts:
    """What the card and the other writers say about the run, from its record."""
    manifest, selection, rules = record.manifest, record.selection, record.split_rules
    first = next(iter(record.trained.values()))
    generated = manifest["generated_with"]
    train_settings = first.settings
    return ReleaseFacts(
        model_id=manifest["model_id"], model_revision=manifest["model_revision"], layers=record.layers,
        d_model=manifest["d_model"], n_features=first.sae.n_features, k=first.sae.k,
        architecture=first.sae.architecture, hook=manifest["hook"],
        questions={"source": settings.questions, "seed": settings.question_seed, "thinking": generated["thinking"],
                   "max_new_tokens": generated["max_new_tokens"],
                   "n_questions": len({r.question_id for r in record.rollouts.values()}),
                   **{key: generated.get(key, default) for key, default in SAMPLING_DEFAULTS.items()}},
        outcomes=outcome_counts(record.rollouts, settings.release.unscored_rollouts),
        tokens={"total_response_tokens": int(sum(r.n_response_tokens for r in record.rollouts.values())),
                "per_layer_train": selection.counts["train"], "per_layer_heldout": selection.counts["heldout"]},
        rows={**selection.counts, "max_norm_multiple": rules["max_norm_multiple"],
              "max_tokens_per_layer": rules["max_rows"],
              "stored_positions": KeptPositions.from_json(manifest.get("kept_positions")).describe(),
              "beyond_float16": sum(entry.get("beyond_float16", 0) for entry in manifest["shards"].values())},
        split={"holdout_fraction": rules["holdout_fraction"], "seed": rules["seed"],
               "heldout_rollouts": len(selection.heldout_positions)},
        recipe={"recipe": train_settings["recipe"], "optimizer": "Adam", "lr": train_settings["lr"],
                "lr_decay_fraction": train_settings["lr_decay_fraction"],
                "encoder_matmul": train_settings["encoder_matmul"], "batch_size": train_settings["batch_size"],
                "epochs": train_settings["epochs"], "revive_every_epochs": train_settings["revive_every_epochs"],
                "dead_after_steps": train_settings["dead_after_steps"],
                **({"matryoshka_prefixes": train_settings["matryoshka_prefixes"]}
                   if "matryoshka_prefixes" in train_settings else {})},
        statistics={"bootstrap": settings.release.bootstrap, "permutations": settings.release.permutations,
                    "probe_permutations": settings.release.probe_permutations},
        per_layer={str(layer): a.summary for layer, a in record.analyses.items()},
        fidelity=None if record.fidelity is None else {str(layer): entry for layer, entry in record.fidelity.items()},
        files=files + ["README.md"], charts=chart_files, wall_clock=record.timings, engine=generated["engine"],
        qsae_version=qsae.__version__, causal=record.causal, autointerp=record.autointerp,
        model_dtype=generated["model_dtype"],
        exclude_special_tokens=rules["exclude_special"])
