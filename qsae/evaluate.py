"""Evaluate stage: what needs the model itself after training. With each layer's SAE spliced in, the
fidelity in the model's loss on held-out rollouts (qsae.analysis.model_loss); and the output tokens
each decoder direction promotes and suppresses (feature_data.decoder_logits). A plain function of a
loaded model; the Ray layer runs it in tasks placed like capture replicas, one per group of layers,
and the results go to the run directory (analysis/fidelity.json, analysis/logits/)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qsae.analysis.feature_data import decoder_logits
from qsae.analysis.model_loss import FIDELITY_DEFINITION, RolloutTokens, fidelity_of_layers
from qsae.analysis.results import LayerAnalysis
from qsae.files import atomic_write, atomic_write_json
from qsae.rollout import Rollout, read_rollouts
from qsae.rundir import RunDir
from qsae.sae import TopKSAE
from qsae.sample import RowSelection, load_selection


@dataclass
class EvaluationInputs:
    """One group of layers' SAEs, their training means (the mean ablation) and the held-out rollouts
    the fidelity runs on (none: no fidelity, only the logit tables); and each layer's other SAEs of a
    sweep (shape name -> SAE), whose fidelity is measured in the same passes."""

    saes: dict[int, TopKSAE]
    means: dict[int, np.ndarray]
    rollouts: list[RolloutTokens]
    n_boot: int
    seed: int
    sweep: dict[int, dict[str, TopKSAE]] = field(default_factory=dict)


@dataclass
class Evaluation:
    fidelity: dict[int, dict] | None  # layer_fidelity entries; None without held-out rollouts
    logits: dict[int, dict[str, torch.Tensor]]  # logit_tables per layer


def fidelity_rollouts(selection: RowSelection, rollouts: dict[int, Rollout], limit: int | None,
                      seed: int) -> list[RolloutTokens]:
    """The held-out rollouts the model-loss fidelity runs on (a seeded sample of `limit` of them), each
    spliced at the positions of its rows that pass the masks; a response of one token predicts nothing."""
    ids = sorted(r for r in selection.heldout_positions if rollouts[r].n_response_tokens >= 2)
    if limit is not None and limit < len(ids):
        ids = sorted(np.random.default_rng(seed).choice(ids, size=limit, replace=False).tolist())
    return [RolloutTokens(r, rollouts[r].prompt_token_ids + rollouts[r].response_token_ids,
                          rollouts[r].n_prompt_tokens, selection.heldout_positions[r], rollouts[r].question_id)
            for r in ids]


def evaluation_inputs(run: RunDir, saes: dict[int, TopKSAE], *, limit: int | None, n_boot: int, seed: int,
                      sweep: dict[int, dict[str, TopKSAE]] | None = None) -> EvaluationInputs:
    """The evaluation of `saes` (layer -> SAE: the run's own, or any other of the store's width) and of
    a sweep's others (layer -> shape name -> SAE) with what it reads from the run directory: the
    analysis' training means, and the held-out rollouts (a seeded sample of `limit` of them)."""
    rollouts = {r.rollout_id: r for r in read_rollouts(run.rollouts)}
    return EvaluationInputs(
        saes=saes, means={layer: LayerAnalysis.load(run.layer_analysis(layer)).train_mean for layer in saes},
        rollouts=fidelity_rollouts(load_selection(run.selection), rollouts, limit, seed), n_boot=n_boot, seed=seed,
        sweep=sweep or {})


@torch.no_grad()
def evaluate_fidelity(model: nn.Module, inputs: EvaluationInputs) -> dict[int, dict] | None:
    """The fidelity of every layer's SAE (one clean pass per rollout shared by all layers' variants,
    a sweep's SAEs spliced in the same passes); None without held-out rollouts."""
    if not inputs.rollouts:
        return None
    return fidelity_of_layers(model, inputs.saes, inputs.means, inputs.rollouts, n_boot=inputs.n_boot,
                              seed=inputs.seed, sweep=inputs.sweep)


@torch.no_grad()
def evaluate_layers(model: nn.Module, inputs: EvaluationInputs) -> Evaluation:
    """The logit tables of every layer's decoder, and the fidelity of every layer's SAE."""
    logits = decoder_logits(model, {layer: sae.W_dec for layer, sae in inputs.saes.items()})
    return Evaluation(evaluate_fidelity(model, inputs), logits)


def save_evaluation(run: RunDir, evaluations: list[Evaluation]) -> None:
    """The groups' results in the run directory: fidelity.json (when computed; a sweep's SAEs under
    "sweep", layer -> shape name -> entry) and each layer's logit tables."""
    run.fidelity.unlink(missing_ok=True)
    fidelity = {layer: dict(entry) for e in evaluations for layer, entry in (e.fidelity or {}).items()}
    sweep = {str(layer): fidelity[layer].pop("sweep") for layer in sorted(fidelity) if "sweep" in fidelity[layer]}
    if any(e.fidelity is not None for e in evaluations):
        atomic_write_json(run.fidelity, {"definition": FIDELITY_DEFINITION,
                                         "layers": {str(layer): fidelity[layer] for layer in sorted(fidelity)},
                                         **({"sweep": sweep} if sweep else {})})
    for e in evaluations:
        for layer, tables in e.logits.items():
            tensors = {name: t.contiguous() for name, t in tables.items()}
            atomic_write(run.logits(layer), lambda tmp, tensors=tensors: save_file(tensors, tmp))


def load_fidelity(run: RunDir) -> dict[int, dict] | None:
    """Each layer's fidelity entry, or None where it was not computed."""
    if not run.fidelity.exists():
        return None
    return {int(layer): entry for layer, entry in json.loads(run.fidelity.read_text())["layers"].items()}


def load_sweep_fidelity(run: RunDir) -> dict[int, dict[str, dict]]:
    """Each layer's sweep SAEs' fidelity entries by shape name (empty where not computed)."""
    if not run.fidelity.exists():
        return {}
    return {int(layer): shapes for layer, shapes in json.loads(run.fidelity.read_text()).get("sweep", {}).items()}


def load_logits(run: RunDir, layer: int) -> dict[str, list] | None:
    """A layer's logit tables as lists (what the feature pages show), or None where not computed."""
    path = run.logits(layer)
    return {name: t.tolist() for name, t in load_file(str(path)).items()} if path.exists() else None
