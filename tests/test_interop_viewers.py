"""The SAEBench and Neuronpedia files, checked by those tools' own released code: SAEBench's core eval
output with its CoreEvalOutput and its own validator, a Neuronpedia batch with SAEDashboard's
NeuronpediaDashboardBatch. Both are built with qsae's writers (qsae.analysis.ecosystem) from a small
synthetic layer. sae-bench and sae-dashboard live only in the interop venv (`make test-interop`,
installed there without their dependencies); elsewhere these tests skip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qsae.analysis.ecosystem import (
    NEURONPEDIA_BATCH,
    NeuronpediaLayer,
    reconstruction_metrics,
    write_saebench,
)
from qsae.analysis.facts import ReleaseFacts
from qsae.analysis.feature_data import SampleCodes, TokenTable, layer_features, logit_tables
from qsae.analysis.results import LayerAnalysis
from qsae.config import ReleaseConfig
from qsae.sae import TopKSAE

D_MODEL, N_FEATURES, K, VOCAB = 16, 2 * NEURONPEDIA_BATCH + 40, 4, 50
N_ROLLOUTS, ROLLOUT_TOKENS = 40, 60
FIDELITY = {"ce_clean": 1.2345, "ce_spliced": 1.3456, "ce_zero": 4.5678, "ce_mean": 3.4567, "delta_ce": 0.1111,
            "delta_ce_ci": [0.0987, 0.1234], "ce_loss_recovered": 0.9667, "ce_loss_recovered_ci": [0.95, 0.97],
            "kl": 0.0789, "kl_ci": [0.0701, 0.0866], "kl_zero": 2.5, "n_tokens": 1234, "n_rollouts": 17}


def facts(layers: list[int], fidelity: dict | None) -> ReleaseFacts:
    return ReleaseFacts.from_dict({
        "model_id": "org/tiny-model", "model_revision": "0123abcd", "layers": layers, "d_model": D_MODEL,
        "n_features": N_FEATURES, "k": K, "architecture": "topk", "hook": "output of decoder layer L",
        "questions": {"source": "bundled-sample", "seed": 1, "thinking": False, "max_new_tokens": 256},
        "outcomes": {"n": N_ROLLOUTS}, "tokens": {}, "rows": {}, "split": {}, "recipe": {}, "statistics": {},
        "per_layer": {}, "fidelity": fidelity, "files": [], "charts": [], "wall_clock": {}, "engine": "hf",
        "qsae_version": "0.0.0"})


def synthetic_layer(layer: int, seed: int):
    """A random SAE, its codes on random residuals and the LayerAnalysis the release's writers read."""
    torch.manual_seed(seed)
    sae = TopKSAE(D_MODEL, N_FEATURES, K)
    rollout = np.repeat(np.arange(N_ROLLOUTS), ROLLOUT_TOKENS)
    position = np.tile(np.arange(ROLLOUT_TOKENS), N_ROLLOUTS)
    x = torch.randn(len(rollout), D_MODEL)
    with torch.no_grad():
        values, indices = sae.encode_topk(x)
        x_hat = sae.decode_topk(values, indices)
    values, indices = values.numpy(), indices.numpy()
    heldout = rollout >= N_ROLLOUTS - 8
    data = layer_features(sae.W_dec.detach(), SampleCodes(values, indices, rollout, position),
                          TokenTable({r: list(range(ROLLOUT_TOKENS)) for r in range(N_ROLLOUTS)}),
                          top=3, width=2, per_bin=1, seed=0)
    fired = np.zeros((N_ROLLOUTS, N_FEATURES), dtype=bool)
    np.logical_or.at(fired, (np.repeat(rollout, K), indices.reshape(-1)), values.reshape(-1) > 0)
    fire_rate = data.fire_count / len(rollout)
    analysis = LayerAnalysis(
        layer=layer,
        summary={"heldout_rows": int(heldout.sum()), "variance_explained": 0.5, "ve_ci": [0.4, 0.6],
                 "rollout_level": {"reason": "synthetic"}, "token_level": {"max_auroc": None}},
        feature_stats={"fire_rate": fire_rate.tolist()},
        core_metrics=reconstruction_metrics(x.numpy()[heldout], x_hat.numpy()[heldout], values[heldout]),
        rollouts_fired=fired.sum(axis=0), train_mean=np.zeros(D_MODEL), rollout_ids=np.arange(N_ROLLOUTS),
        rollout_labels=np.zeros(N_ROLLOUTS, dtype=np.uint8), rollout_max=np.zeros((N_ROLLOUTS, N_FEATURES)),
        dom_direction=None, features=data)
    return sae, analysis


@pytest.mark.filterwarnings("ignore:Using `@model_validator` with mode='after' on a classmethod")  # in sae_bench
def test_saebench_core_files_pass_saebenchs_own_validation(tmp_path):
    """Each layer's core eval output, with and without the fidelity in the model's loss (then SAEBench's
    -1 for the loss metrics), parses as SAEBench's CoreEvalOutput through SAEBench's own validator."""
    pytest.importorskip("sae_bench")
    from sae_bench.evals.core.eval_output import CoreEvalOutput
    from sae_bench.sae_bench_utils.testing_utils import validate_eval_output_format_file

    layers = {3: synthetic_layer(3, 0), 5: synthetic_layer(5, 1)}
    info = facts(list(layers), {"3": FIDELITY, "5": None})
    paths = write_saebench(tmp_path / "saebench", info, {layer: a for layer, (_, a) in layers.items()},
                           {layer: sae for layer, (sae, _) in layers.items()})
    assert len(paths) == 2
    for path in paths:
        validate_eval_output_format_file(str(path), CoreEvalOutput)  # raises pydantic's ValidationError
        written = json.loads(path.read_text())
        core = CoreEvalOutput(**written)  # and every field reads back as written
        quality = core.eval_result_metrics.reconstruction_quality
        assert quality.explained_variance_legacy == written["eval_result_metrics"]["reconstruction_quality"][
            "explained_variance_legacy"]
        assert len(core.eval_result_details) == N_FEATURES and core.eval_config.model_name == "org/tiny-model"
    loss = [json.loads(p.read_text())["eval_result_metrics"]["model_performance_preservation"] for p in paths]
    assert loss[0]["ce_loss_score"] == FIDELITY["ce_loss_recovered"] and loss[1]["ce_loss_score"] == -1


def test_neuronpedia_batches_build_saedashboards_batch(tmp_path):
    """Every batch file builds SAEDashboard's NeuronpediaDashboardBatch (its constructor takes exactly
    the runner's keys, so an unknown one fails), and the batch's to_dict gives back the file."""
    pytest.importorskip("sae_dashboard")
    from sae_dashboard.neuronpedia.neuronpedia_dashboard import NeuronpediaDashboardBatch

    sae, analysis = synthetic_layer(3, 2)
    head = torch.nn.Linear(D_MODEL, VOCAB, bias=False)
    logits = {name: t.tolist() for name, t in
              logit_tables(sae.W_dec.detach(), torch.ones(D_MODEL), head, top=5).items()}
    layer = NeuronpediaLayer(tmp_path, facts([3], None), ReleaseConfig(), layer=3, sae=sae, logits=logits)
    for feature in analysis.features.live.tolist():
        layer.add(analysis.features.record(feature, {}, token_text=lambda t: f"t{t}", outcome_of=str, logits=logits))
    layer.close()
    (folder,) = tmp_path.iterdir()
    batches = sorted(folder.glob("batch-*.json"))
    assert len(batches) == 3
    for path in batches:
        written = json.loads(path.read_text())
        batch = NeuronpediaDashboardBatch(**written)
        assert batch.layer == 3 and batch.model_id == "org/tiny-model" and batch.features
        back = batch.to_dict()
        for feature in back["features"]:
            assert feature.pop("vector") == []  # the runner's steering vector, for vector sets only
        assert back == written
        feature = batch.features[0]
        assert len(feature.pos_str) == 5 and feature.activations[0].tokens
