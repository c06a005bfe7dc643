"""Analyze stage: every layer's statistics and feature data, from the rows its SAE was trained and held
out on, written to the run directory (analysis/) for the stages after it.

Per layer, its sample is streamed from the store once (qsae.analysis.layer: reconstruction, feature
health, token- and rollout-level correctness) and its codes are passed once through the feature-data
stream (qsae.analysis.feature_data: top contexts, quantile samples, histograms). No model and no
Ray: the stages that need the model (qsae.evaluate, qsae.causal) come after.
"""
from __future__ import annotations

import shutil

from qsae import console
from qsae.analysis.feature_data import SampleCodes, TokenTable, layer_features
from qsae.analysis.layer import (
    LayerInputs,
    StatisticsSettings,
    analyze_layer,
    encode_sample,
    rollout_labels,
    sample_rows_of,
)
from qsae.config import ReleaseConfig, TrainConfig
from qsae.rollout import read_rollouts
from qsae.rundir import RunDir
from qsae.sample import RowRules, save_selection, trained_selection
from qsae.store import read_manifest, verify_store
from qsae.streaming import StoreSource
from qsae.training.trained import TrainedSAE, load_trained


def check_trained_matches(train: TrainConfig, trained: dict[int, TrainedSAE], d_model: int) -> None:
    """The SAEs are those the config names and fit the store's rows (else the release would name one
    SAE and hold another, or encode rows of another width)."""
    asked = (train.architecture, train.n_features, train.k)
    for layer, entry in trained.items():
        sae = entry.sae
        if (sae.architecture, sae.n_features, sae.k) != asked:
            raise ValueError(f"layer {layer}: the trained SAE is {sae.architecture} with n_features={sae.n_features}, "
                             f"k={sae.k}, but the config asks for {asked[0]} with n_features={asked[1]}, k={asked[2]}; "
                             "analyze with the config it was trained with, or train again")
        if sae.d_in != d_model:  # e.g. the store was captured again from another model
            raise ValueError(f"layer {layer}: the trained SAE has d_in {sae.d_in} but the store's residuals have "
                             f"d_model {d_model}; train the layer again on this store")


def analyze_run(run: RunDir, layers: list[int], *, train: TrainConfig, rules: RowRules,
                release: ReleaseConfig) -> None:
    """Analyze every layer's trained SAE; refuses SAEs other than `train` asks for, and rules (a
    config) that would give other rows than the SAEs were trained on, before writing anything."""
    trained = {layer: load_trained(run, layer) for layer in layers}
    check_trained_matches(train, trained, read_manifest(run.store)["d_model"])
    verify_store(run.store, layers)  # every byte of the layers' shards, once, before any row is read
    rollouts = {r.rollout_id: r for r in read_rollouts(run.rollouts)}
    selection = trained_selection(run, layers, rules, {r: x.question_id for r, x in rollouts.items()})
    shutil.rmtree(run.analysis, ignore_errors=True)  # everything after analysis is made afresh
    save_selection(run.selection, selection)
    rows = sample_rows_of(selection, rollouts, rollout_labels(rollouts, release.unscored_rollouts))
    inputs = LayerInputs(rows, rollouts, StatisticsSettings(release.bootstrap, release.permutations, rules.seed))
    tokens = TokenTable({r: x.prompt_token_ids + x.response_token_ids for r, x in rollouts.items()})
    for layer in console.progress(iterable=layers, desc="analyze", unit="layer"):
        sae = trained[layer].sae
        sample = encode_sample(sae, StoreSource(run.store, layer, selection.rows), selection)
        result = analyze_layer(layer, sae, sample, inputs, revived=trained[layer].history["revived"])
        codes = SampleCodes(sample.values, sample.indices, selection.rollout_id, sample.position)
        result.features = layer_features(
            sae.W_dec.detach(), codes, tokens, top=release.top_contexts, width=release.context_tokens, per_bin=release.quantile_examples, seed=rules.seed)
        result.save(run.layer_analysis(layer))
        del sample  # its codes and held-out residuals: one layer's at a time
