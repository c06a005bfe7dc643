"""Analyze stage: every layer's statistics and feature data, from the rows its SAE was trained and held
out on, written to the run directory (analysis/) for the stages after it.

Per layer, its sample is streamed from the store once (qsae.analysis.layer: reconstruction, feature
health, token- and rollout-level correctness) and its codes are passed once through the feature-data
stream (qsae.analysis.feature_data: top contexts, quantile samples, histograms). Where the encode
pass ran (qsae.encode, release.every_token), the rollout pools and the feature data are its merged
every-token results instead. No model and no Ray: the stages that need the model come before
(qsae.encode) and after (qsae.evaluate, qsae.causal).
"""
from __future__ import annotations

import shutil

from qsae import console
from qsae.analysis.feature_data import SampleCodes, TokenTable, layer_features
from qsae.analysis.frontier import analyze_sweep_member
from qsae.analysis.layer import (
    EncodedSample,
    LayerInputs,
    StatisticsSettings,
    analyze_layer,
    encode_sample,
    rollout_labels,
    sample_rows_of,
)
from qsae.analysis.results import LayerAnalysis
from qsae.analysis.rollout_stats import RolloutPool
from qsae.config import MATRYOSHKA, ReleaseConfig, TrainConfig
from qsae.encode import EncodeSettings, encoded_features, encoded_layer, encoding_identity
from qsae.rollout import Rollout, read_rollouts
from qsae.rundir import RunDir
from qsae.sae import TopKSAE
from qsae.sample import RowRules, RowSelection, check_same_split, load_split, save_selection, trained_selection
from qsae.store import StoreError, read_manifest, verify_store
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
        if train.architecture == MATRYOSHKA and sae.prefixes.tolist() != train.prefixes():
            raise ValueError(f"layer {layer}: the trained SAE has matryoshka prefixes {sae.prefixes.tolist()}, but the "
                             f"config asks for {train.prefixes()}; analyze with the config it was trained with, or train again")
        if sae.d_in != d_model:  # e.g. the store was captured again from another model
            raise ValueError(f"layer {layer}: the trained SAE has d_in {sae.d_in} but the store's residuals have "
                             f"d_model {d_model}; train the layer again on this store")


def check_trained_saes(run: RunDir, layers: list[int], train: TrainConfig) -> None:
    """The trained SAEs are those `train` asks for and fit the store's rows (check_trained_matches)."""
    trained = {layer: load_trained(run, layer) for layer in layers}
    check_trained_matches(train, trained, read_manifest(run.store)["d_model"])


def check_trained_split(run: RunDir, layers: list[int], rules: RowRules) -> None:
    """The store is whole and the rules (a config) give the split the SAEs were trained with."""
    verify_store(run.store, layers)  # file checksums are remembered: analyze_run's own check reads nothing again
    check_same_split(load_split(run), rules, {r.rollout_id: r.question_id for r in read_rollouts(run.rollouts)})


def statistics_inputs(selection: RowSelection, rollouts: dict[int, Rollout], release: ReleaseConfig,
                      seed: int) -> LayerInputs:
    """What every layer's statistics share: the sampled rows, labelled, and how they resample."""
    labels = rollout_labels(rollouts, release.unscored_rollouts)
    return LayerInputs(sample_rows_of(selection, rollouts, labels), rollouts, labels,
                       StatisticsSettings(release.bootstrap, release.permutations, seed, release.probe_permutations))


def sae_statistics(run: RunDir, layer: int, sae: TopKSAE, inputs: LayerInputs, *, revived: int | None = None,
                   pool: RolloutPool | None = None) -> tuple[LayerAnalysis, EncodedSample]:
    """Every statistic of `sae` (the run's own, or any other of the store's width) over the layer's
    sampled rows in the run's store, and the encoded sample they came from; `revived` and `pool` as in
    analyze_layer."""
    selection = inputs.rows.selection
    sample = encode_sample(sae, StoreSource(run.store, layer, selection.rows), selection)
    return analyze_layer(layer, sae, sample, inputs, revived=revived, pool=pool), sample


def analyze_run(run: RunDir, layers: list[int], *, train: TrainConfig, rules: RowRules,
                release: ReleaseConfig, every_token: EncodeSettings | None = None) -> None:
    """Analyze every layer's trained SAE; refuses SAEs other than `train` asks for, and rules (a
    config) that would give other rows than the SAEs were trained on, before writing anything. With
    `every_token` (the encode pass's settings), the rollout pools and feature data come from the
    encode pass's files, which must cover the store."""
    trained = {layer: load_trained(run, layer) for layer in layers}
    check_trained_matches(train, trained, read_manifest(run.store)["d_model"])
    verify_store(run.store, layers)  # every byte of the layers' shards, once, before any row is read
    rollouts = {r.rollout_id: r for r in read_rollouts(run.rollouts)}
    selection = trained_selection(run, layers, rules, {r: x.question_id for r, x in rollouts.items()})
    identity = None if every_token is None else encoding_identity(run, layers, every_token)
    shutil.rmtree(run.analysis, ignore_errors=True)  # everything after analysis is made afresh
    save_selection(run.selection, selection)
    inputs = statistics_inputs(selection, rollouts, release, rules.seed)
    tokens = TokenTable({r: x.prompt_token_ids + x.response_token_ids for r, x in rollouts.items()})
    for layer in console.progress(iterable=layers, desc="analyze", unit="layer"):
        sae = trained[layer].sae
        encoded = None if identity is None else encoded_layer(run, layer, identity)
        if identity is not None and encoded is None:
            raise StoreError(f"the encode pass has not encoded every store shard with layer {layer}'s SAE; run the "
                             "pipeline (or qsae analyze) again to finish it")
        result, sample = sae_statistics(run, layer, sae, inputs, revived=trained[layer].history["revived"],
                                        pool=None if encoded is None else encoded.pool)
        W_dec = sae.W_dec.detach()
        if encoded is None:
            codes = SampleCodes(sample.values, sample.indices, selection.rollout_id, sample.position)
            result.features = layer_features(W_dec, codes, tokens, top=release.top_contexts,
                                             width=release.context_tokens, per_bin=release.quantile_examples,
                                             seed=rules.seed)
        else:
            result.features = encoded_features(W_dec, encoded, tokens, per_bin=release.quantile_examples,
                                               width=every_token.width)
        result.save(run.layer_analysis(layer))
        del sample, encoded  # one layer's codes, held-out residuals and pools at a time
        for member in trained[layer].sweep:  # the frontier: each of the layer's other SAEs on the same rows
            sample = encode_sample(member.sae, StoreSource(run.store, layer, selection.rows), selection)
            analyze_sweep_member(member.shape_name, member.sae, sample, inputs).save(
                run.sweep_analysis(layer, member.shape_name))
            del sample
